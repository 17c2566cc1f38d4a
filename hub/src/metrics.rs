//! Prometheus metrics (prometheus-client), served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Most distinct firmware versions `drones_by_version` shows; the rest are summed under
/// [`OTHER_VERSIONS`]. Versions come from the drones, so a bound keeps one odd fleet (or a
/// misbehaving agent) from growing the series without end.
pub const MAX_VERSION_SERIES: usize = 20;

/// The `version` label of the drones beyond the [`MAX_VERSION_SERIES`] most common versions.
pub const OTHER_VERSIONS: &str = "other";

/// Label of write results: `ok`, `throttled`, `retryable`, `not_found`, `permanent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result.
    pub result: String,
}

/// Labels of the drones-by-condition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    /// Condition type.
    pub condition: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
}

/// Label of per-controller metrics: `node`, `rollout`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// The controller.
    pub controller: String,
}

/// Labels of the rollout drone gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutOutcomeLabel {
    /// Rollout name.
    pub rollout: String,
    /// `succeeded`, `failed`, `rolled_back`, `in_progress`, …
    pub outcome: String,
}

/// Label of the drones-by-version gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// Committed firmware version, `unknown` when the drone reports none.
    pub version: String,
}

/// Label of the drones-by-phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Upgrade phase (`Idle`, `Downloading`, …), `unknown` when the drone reports none.
    pub phase: String,
}

/// Label of per-rollout gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabel {
    /// Rollout name.
    pub rollout: String,
}

/// One rollout's gauges after a controller step. Plain values, so this module needs nothing of
/// the rollout controller that fills them in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutGauges {
    /// Rollout name.
    pub rollout: String,
    /// Drones per outcome label (`succeeded`, `failed`, `rolled_back`, `in_progress`, …).
    pub drones: std::collections::BTreeMap<&'static str, i64>,
    /// Current wave (0 = canary).
    pub wave: u32,
    /// The `Halted` condition is True.
    pub halted: bool,
    /// `Progressing` is False with reason `ProgressDeadlineExceeded`.
    pub deadline_exceeded: bool,
    /// `spec.paused`: halted by a person, not by the circuit breaker.
    pub paused: bool,
}

type HistogramFamily = Family<ControllerLabel, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every hub metric.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Heartbeats received, by result (`ok`, `invalid`, `denied`).
    pub heartbeats: Family<ResultLabel, Counter>,
    /// Status writes, by result.
    pub status_writes: Family<ResultLabel, Counter>,
    /// Status write latency.
    pub write_duration: Histogram,
    /// Drones by condition (set at scrape time).
    pub drones: Family<ConditionLabel, Gauge>,
    /// Drones with a pending write.
    pub queue_depth: Gauge,
    /// Writes that found no `FlightNode`.
    pub missing: Counter,
    /// `FlightNode`s created by auto-registration.
    pub registered: Counter,
    /// Duration of one reconcile pass, per controller.
    pub reconcile_duration: HistogramFamily,
    /// Drones per rollout and outcome.
    pub rollout_drones: Family<RolloutOutcomeLabel, Gauge>,
    /// Current wave per rollout (0 = canary).
    pub rollout_wave: Family<RolloutLabel, Gauge>,
    /// 1 while a rollout is halted.
    pub rollout_halted: Family<RolloutLabel, Gauge>,
    /// 1 while a rollout is paused (`spec.paused`).
    pub rollout_paused: Family<RolloutLabel, Gauge>,
    /// 1 while a rollout made no progress for its `progressDeadline`.
    pub rollout_deadline_exceeded: Family<RolloutLabel, Gauge>,
    /// Drones by committed firmware version (set at scrape time).
    pub drones_by_version: Family<VersionLabel, Gauge>,
    /// Drones by upgrade phase (set at scrape time).
    pub drones_by_phase: Family<PhaseLabel, Gauge>,
    /// The status-write budget, `--api-qps`.
    pub write_budget_qps: Gauge<f64, AtomicU64>,
    /// 1 while this replica holds the controller Lease.
    pub leader: Gauge,
    /// Drones the node reconciler read and decided afresh (unchanged drones are skipped).
    pub node_decisions: Counter,
    /// Drones the rollout controller read afresh (unchanged drones are reused).
    pub rollout_drone_reads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flightnode_hub");
        let heartbeats = Family::<ResultLabel, Counter>::default();
        let status_writes = Family::<ResultLabel, Counter>::default();
        let write_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let drones = Family::<ConditionLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let missing = Counter::default();
        let registered = Counter::default();
        let reconcile_duration: HistogramFamily = Family::new_with_constructor(reconcile_histogram);
        let rollout_drones = Family::<RolloutOutcomeLabel, Gauge>::default();
        let rollout_wave = Family::<RolloutLabel, Gauge>::default();
        let rollout_halted = Family::<RolloutLabel, Gauge>::default();
        let rollout_deadline_exceeded = Family::<RolloutLabel, Gauge>::default();
        let rollout_paused = Family::<RolloutLabel, Gauge>::default();
        let drones_by_version = Family::<VersionLabel, Gauge>::default();
        let drones_by_phase = Family::<PhaseLabel, Gauge>::default();
        let write_budget_qps = Gauge::<f64, AtomicU64>::default();
        let leader = Gauge::default();
        let node_decisions = Counter::default();
        let rollout_drone_reads = Counter::default();
        registry.register(
            "rollout_drone_reads",
            "Drones the FirmwareRollout controller read afresh; a step reuses drones unchanged since it last read them",
            rollout_drone_reads.clone(),
        );
        registry.register(
            "node_decisions",
            "Drones the node reconciler decided afresh; a pass skips drones unchanged since their last decision",
            node_decisions.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile pass, per controller",
            reconcile_duration.clone(),
        );
        registry.register(
            "rollout_drones",
            "Drones of a FirmwareRollout by outcome",
            rollout_drones.clone(),
        );
        registry.register(
            "rollout_current_wave",
            "Current wave of a FirmwareRollout (0 = canary)",
            rollout_wave.clone(),
        );
        registry.register(
            "rollout_halted",
            "1 while a FirmwareRollout is halted",
            rollout_halted.clone(),
        );
        registry.register(
            "rollout_paused",
            "1 while a FirmwareRollout is paused by spec.paused (it also counts as halted)",
            rollout_paused.clone(),
        );
        registry.register(
            "rollout_progress_deadline_exceeded",
            "1 while a FirmwareRollout made no progress for its progressDeadline (Progressing=False, ProgressDeadlineExceeded)",
            rollout_deadline_exceeded.clone(),
        );
        registry.register(
            "drones_by_version",
            "Drones served here by committed firmware version",
            drones_by_version.clone(),
        );
        registry.register(
            "drones_by_phase",
            "Drones served here by upgrade phase",
            drones_by_phase.clone(),
        );
        registry.register(
            "write_budget_qps",
            "Sustained FlightNode status writes per second this replica may make (--api-qps)",
            write_budget_qps.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the controller Lease",
            leader.clone(),
        );
        registry.register(
            "heartbeats_received",
            "Heartbeats received, by result",
            heartbeats.clone(),
        );
        registry.register(
            "status_writes",
            "FlightNode status writes, by result",
            status_writes.clone(),
        );
        registry.register(
            "status_write_duration_seconds",
            "Latency of FlightNode status writes",
            write_duration.clone(),
        );
        registry.register("drones", "Drones by condition and status", drones.clone());
        registry.register(
            "write_queue_depth",
            "Drones with a status write pending",
            queue_depth.clone(),
        );
        registry.register(
            "flightnode_missing",
            "Status writes that found no FlightNode",
            missing.clone(),
        );
        registry.register(
            "flightnodes_registered",
            "FlightNodes created by auto-registration",
            registered.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            heartbeats,
            status_writes,
            write_duration,
            drones,
            queue_depth,
            missing,
            registered,
            reconcile_duration,
            rollout_drones,
            rollout_wave,
            rollout_halted,
            rollout_deadline_exceeded,
            rollout_paused,
            drones_by_version,
            drones_by_phase,
            write_budget_qps,
            leader,
            node_decisions,
            rollout_drone_reads,
        }
    }

    /// Records one reconcile pass of `controller`.
    pub fn reconcile_done(&self, controller: &str, took: std::time::Duration) {
        self.reconcile_duration
            .get_or_create(&ControllerLabel {
                controller: controller.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets the rollout gauges from one rollout step (rollouts not listed are dropped).
    pub fn set_rollouts(&self, rollouts: &[RolloutGauges]) {
        self.rollout_drones.clear();
        self.rollout_wave.clear();
        self.rollout_halted.clear();
        self.rollout_deadline_exceeded.clear();
        self.rollout_paused.clear();
        for r in rollouts {
            for (outcome, n) in &r.drones {
                self.rollout_drones
                    .get_or_create(&RolloutOutcomeLabel {
                        rollout: r.rollout.clone(),
                        outcome: (*outcome).to_owned(),
                    })
                    .set(*n);
            }
            let label = RolloutLabel {
                rollout: r.rollout.clone(),
            };
            self.rollout_wave.get_or_create(&label).set(i64::from(r.wave));
            self.rollout_halted.get_or_create(&label).set(i64::from(r.halted));
            self.rollout_deadline_exceeded
                .get_or_create(&label)
                .set(i64::from(r.deadline_exceeded));
            self.rollout_paused.get_or_create(&label).set(i64::from(r.paused));
        }
    }

    /// Sets the drones-by-version and drones-by-phase gauges (drones not counted are dropped).
    /// Beyond [`MAX_VERSION_SERIES`] versions, the least common are summed as [`OTHER_VERSIONS`].
    pub fn set_fleet(&self, versions: &BTreeMap<String, i64>, phases: &BTreeMap<String, i64>) {
        self.drones_by_version.clear();
        for (version, n) in bounded_versions(versions) {
            self.drones_by_version
                .get_or_create(&VersionLabel { version })
                .set(n);
        }
        self.drones_by_phase.clear();
        for (phase, n) in phases {
            self.drones_by_phase
                .get_or_create(&PhaseLabel { phase: phase.clone() })
                .set(*n);
        }
    }

    /// The status-writes counter for one result.
    pub fn writes(&self, result: &str) -> Counter {
        self.status_writes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .clone()
    }

    /// The heartbeats counter for one result.
    pub fn heartbeat(&self, result: &str) -> Counter {
        self.heartbeats
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .clone()
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The [`MAX_VERSION_SERIES`] most common versions (ties by name), the rest as one
/// [`OTHER_VERSIONS`] series.
fn bounded_versions(versions: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let mut by_count: Vec<(&String, i64)> = versions.iter().map(|(v, n)| (v, *n)).collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut out = BTreeMap::new();
    for (i, (version, n)) in by_count.into_iter().enumerate() {
        let key = if i < MAX_VERSION_SERIES {
            version.clone()
        } else {
            OTHER_VERSIONS.to_owned()
        };
        *out.entry(key).or_insert(0) += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_beyond_the_bound_are_summed_as_other() {
        let versions: BTreeMap<String, i64> = (0..30).map(|i| (format!("1.{i}.0"), 100 - i)).collect();
        let shown = bounded_versions(&versions);
        assert_eq!(shown.len(), MAX_VERSION_SERIES + 1);
        assert!(shown.contains_key("1.0.0") && shown.contains_key("1.19.0"));
        assert!(!shown.contains_key("1.20.0"));
        let rest: i64 = (20..30).map(|i| 100 - i).sum();
        assert_eq!(shown[OTHER_VERSIONS], rest);
        assert_eq!(shown.values().sum::<i64>(), versions.values().sum::<i64>());
    }
}
