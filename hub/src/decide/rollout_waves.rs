//! Waves, outcomes and the circuit breaker of a `FirmwareRollout`, as pure functions over the
//! [`Drone`]s the controller reads; [`super::rollout_plan::plan`] puts them together into one step.

use super::node_sync;
use crate::api::rollout::{Counts, FailureRule, WaveSpec};
use sha2::Digest;
use std::collections::BTreeMap;

/// A drone as the rollout sees it.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts read from its FlightNode"
)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drone {
    /// `FlightNode` name (its wave comes from a hash of it).
    pub name: String,
    /// Its `spec.firmware` is this rollout's target, written by this rollout.
    pub dispatched: bool,
    /// `spec.firmware.retry` of that target: how many new attempts a `retry` request made.
    pub retry: u32,
    /// When it was dispatched (unix seconds; 0 when not).
    pub dispatched_at: i64,
    /// Its `spec.firmware` was written by this rollout for an earlier target (another
    /// generation's version, url or selector): called back unless it is running, or dispatched
    /// again with the current target when its wave is open.
    pub stale: bool,
    /// A person owns its `spec.firmware` (set without a rollout, or edited after the dispatch).
    pub pinned: bool,
    /// A newer rollout selects this drone too (or wrote its `spec.firmware`): the drone is that
    /// one's, and this rollout yields it.
    pub superseded_by: Option<String>,
    /// Committed version is the rollout's version.
    pub on_target: bool,
    /// `status.firmwareSync.reason` for its current generation.
    pub sync_reason: Option<String>,
    /// Result of the upgrade named by `firmwareSync.upgradeId`, when it ended (CamelCase).
    pub last_result: Option<String>,
    /// The drone picked the upgrade up (reported it in flight, or finished it).
    pub started: bool,
    /// The drone reports the recorded upgrade in flight right now: it runs to its real end and
    /// is never called back. (A drone in `Retrying` started once but is not running.)
    pub running: bool,
    /// Why a gate holds it (offline, flight state, battery); `None`: it may start.
    pub blocked: Option<String>,
    /// Flights of its running image since it was committed (`status.firmware.flights`);
    /// `None` when it reports none.
    pub flights: Option<u32>,
    /// Airborne seconds over those flights (`status.firmware.flightTime`).
    pub flight_secs: Option<i64>,
}

/// Where a drone stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not dispatched.
    NotStarted,
    /// Dispatched, held by a gate or not yet picked up.
    Waiting,
    /// Working on it.
    InProgress,
    /// On the rollout's version.
    Succeeded,
    /// Failed after the node reconciler's retries.
    Failed,
    /// Rejected by the agent.
    Rejected,
    /// Rolled back by the agent.
    RolledBack,
    /// Not finished within the per-drone timeout.
    TimedOut,
    /// Someone else owns its `spec.firmware`.
    Pinned,
    /// A newer rollout's drone.
    Superseded,
}

impl Outcome {
    /// Finished one way or another (counts for the breaker's sample).
    pub fn finished(self) -> bool {
        matches!(
            self,
            Outcome::Succeeded
                | Outcome::Failed
                | Outcome::Rejected
                | Outcome::RolledBack
                | Outcome::TimedOut
        )
    }

    /// A result the drone reported (evidence about the build): not a timeout, which says
    /// nothing about it.
    pub fn is_result(self) -> bool {
        matches!(
            self,
            Outcome::Succeeded | Outcome::Failed | Outcome::Rejected | Outcome::RolledBack
        )
    }

    /// Counts towards a breaker rule of `kind`.
    pub fn is_kind(self, kind: &str) -> bool {
        match kind {
            "failed" => self == Outcome::Failed,
            "rejected" => self == Outcome::Rejected,
            "rolledBack" => self == Outcome::RolledBack,
            "timedOut" => self == Outcome::TimedOut,
            "any" => matches!(
                self,
                Outcome::Failed | Outcome::Rejected | Outcome::RolledBack | Outcome::TimedOut
            ),
            _ => false,
        }
    }
}

/// A drone's rank key: a stable hash of its name (Bottlerocket's wave seed, derived instead of
/// stored), so membership is deterministic and a drone keeps its place on every replica.
pub fn rank_key(name: &str) -> u64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Cumulative drone counts per wave for `total` drones; non-decreasing, the last one `total`
/// (a final 100 % wave is added when the spec's waves stop short).
pub fn wave_targets(total: u32, waves: &[WaveSpec]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = 0;
    for w in waves {
        let t = match (w.count, w.percent) {
            (Some(c), _) => c,
            (None, Some(p)) => {
                u32::try_from((u64::from(total) * u64::from(p.min(100))).div_ceil(100)).unwrap_or(total)
            }
            (None, None) => total,
        };
        let t = t.min(total).max(prev);
        out.push(t);
        prev = t;
    }
    if out.last().copied() != Some(total) || out.is_empty() {
        out.push(total);
    }
    out
}

/// The wave of every drone: rank by [`rank_key`], then the first wave whose target covers the
/// rank. A drone that joins later takes the place its hash gives it.
pub fn assign_waves<'a>(
    names: impl IntoIterator<Item = &'a str>,
    waves: &[WaveSpec],
) -> BTreeMap<String, usize> {
    let mut ranked: Vec<(u64, &str)> = names.into_iter().map(|n| (rank_key(n), n)).collect();
    ranked.sort_unstable();
    let targets = wave_targets(u32::try_from(ranked.len()).unwrap_or(u32::MAX), waves);
    ranked
        .iter()
        .enumerate()
        .map(|(rank, (_, name))| {
            let wave = targets
                .iter()
                .position(|t| (rank as u64) < u64::from(*t))
                .unwrap_or(targets.len() - 1);
            ((*name).to_owned(), wave)
        })
        .collect()
}

/// The outcome of one drone at `now`; `clock_start` is when its timeout clock started (its
/// dispatch, or the start of its wave when a gate kept it from being dispatched).
pub fn outcome(d: &Drone, now: i64, timeout_secs: Option<i64>, clock_start: Option<i64>) -> Outcome {
    if d.superseded_by.is_some() {
        return Outcome::Superseded;
    }
    if d.on_target {
        return Outcome::Succeeded;
    }
    if d.pinned {
        return Outcome::Pinned;
    }
    if d.stale {
        // Busy with an earlier target of this rollout: in flight until it ends, then free.
        return if d.running {
            Outcome::InProgress
        } else {
            Outcome::NotStarted
        };
    }
    if d.dispatched && d.sync_reason.as_deref() == Some(node_sync::reason::FAILED) {
        return match d.last_result.as_deref() {
            Some("Rejected") => Outcome::Rejected,
            Some("RolledBack") => Outcome::RolledBack,
            _ => Outcome::Failed,
        };
    }
    let timed_out = match (timeout_secs, clock_start) {
        (Some(t), Some(start)) => now - start >= t,
        _ => false,
    };
    if timed_out {
        return Outcome::TimedOut;
    }
    if !d.dispatched {
        return Outcome::NotStarted;
    }
    if d.started {
        Outcome::InProgress
    } else {
        Outcome::Waiting
    }
}

/// Counts per outcome.
pub fn count(outcomes: impl IntoIterator<Item = Outcome>) -> Counts {
    let mut c = Counts::default();
    for o in outcomes {
        c.total += 1;
        match o {
            Outcome::NotStarted => c.not_started += 1,
            Outcome::Waiting => c.waiting += 1,
            Outcome::InProgress => c.in_progress += 1,
            Outcome::Succeeded => c.succeeded += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Rejected => c.rejected += 1,
            Outcome::RolledBack => c.rolled_back += 1,
            Outcome::TimedOut => c.timed_out += 1,
            Outcome::Pinned => c.pinned += 1,
            Outcome::Superseded => c.superseded += 1,
        }
    }
    c.failed_total = c.failed + c.rejected + c.rolled_back + c.timed_out;
    c
}

/// The first rule that trips on `outcomes` (the breaker's sample), with the numbers that
/// tripped it.
pub fn breaker(rules: &[FailureRule], outcomes: &[Outcome]) -> Option<String> {
    let finished = outcomes.iter().filter(|o| o.finished()).count() as u64;
    for rule in rules {
        let bad = outcomes.iter().filter(|o| o.is_kind(&rule.kind)).count() as u64;
        if let Some(cap) = rule.max_count
            && bad >= u64::from(cap)
        {
            return Some(format!(
                "{} {bad} of {finished} finished drones reached the cap of {cap}",
                rule.kind
            ));
        }
        if let Some(pct) = rule.threshold_percent
            && finished > 0
            && finished >= u64::from(rule.min_finished)
            && bad * 100 >= u64::from(pct) * finished
        {
            return Some(format!(
                "{} {bad} of {finished} finished drones ({}%) reached the threshold of {pct}% \
                 (minimum sample {})",
                rule.kind,
                bad * 100 / finished,
                rule.min_finished
            ));
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rule(kind: &str, pct: u32, min: u32, cap: Option<u32>) -> FailureRule {
        FailureRule {
            kind: kind.into(),
            threshold_percent: Some(pct),
            min_finished: min,
            max_count: cap,
        }
    }

    /// A canary of 2 drones soaked for a minute, then half the fleet, then the rest.
    pub(crate) fn waves() -> Vec<WaveSpec> {
        vec![
            WaveSpec {
                count: Some(2),
                soak: Some("60s".into()),
                ..WaveSpec::default()
            },
            WaveSpec {
                percent: Some(50),
                ..WaveSpec::default()
            },
        ]
    }

    #[test]
    fn waves_are_cumulative_deterministic_and_stable_for_newcomers() {
        assert_eq!(wave_targets(10, &waves()), vec![2, 5, 10]);
        assert_eq!(wave_targets(3, &waves()), vec![2, 2, 3]);
        assert_eq!(wave_targets(0, &[]), vec![0]);
        let names: Vec<String> = (0..10).map(|i| format!("drone-{i:02}")).collect();
        let a = assign_waves(names.iter().map(String::as_str), &waves());
        let b = assign_waves(names.iter().rev().map(String::as_str), &waves());
        assert_eq!(a, b, "order of listing does not matter");
        assert_eq!(a.values().filter(|w| **w == 0).count(), 2);
        assert_eq!(a.values().filter(|w| **w <= 1).count(), 5);
        // Percent waves keep the canary share when the fleet grows.
        let pct = [WaveSpec {
            percent: Some(10),
            ..WaveSpec::default()
        }];
        let names: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
        let w = assign_waves(names.iter().map(String::as_str), &pct);
        assert_eq!(w.values().filter(|w| **w == 0).count(), 10);
    }

    #[test]
    fn breaker_trips_exactly_at_the_limit_not_below_and_not_before_the_sample() {
        use Outcome::*;
        let rules = [rule("rolledBack", 25, 4, None)];
        // 1 of 4 = 25 %: trips (inclusive).
        assert!(breaker(&rules, &[RolledBack, Succeeded, Succeeded, Succeeded]).is_some());
        // 1 of 5 = 20 %: does not.
        assert!(breaker(&rules, &[RolledBack, Succeeded, Succeeded, Succeeded, Succeeded]).is_none());
        // 2 of 3 is 66 %, but only 3 finished: below the minimum sample.
        assert!(breaker(&rules, &[RolledBack, RolledBack, Succeeded, InProgress]).is_none());
        // Other kinds do not count for a rolledBack rule; `any` counts them all.
        assert!(breaker(&rules, &[Rejected, Failed, Succeeded, Succeeded]).is_none());
        assert!(
            breaker(
                &[rule("any", 50, 4, None)],
                &[Rejected, TimedOut, Succeeded, Succeeded]
            )
            .is_some()
        );
        // The absolute cap ignores the sample.
        let capped = [rule("failed", 100, 1000, Some(2))];
        assert!(breaker(&capped, &[Failed, InProgress]).is_none());
        let why = breaker(&capped, &[Failed, Failed, InProgress]).unwrap_or_default();
        assert!(why.contains("cap of 2"), "{why}");
    }
}
