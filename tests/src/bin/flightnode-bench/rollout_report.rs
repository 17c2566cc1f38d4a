//! `rollout`'s table: one row per run, then what each row's requests were.

use crate::prom::Histogram;
use crate::rollout::{FROM, GROUPS, RolloutPlan, TO};
use std::collections::BTreeMap;
use std::time::Duration;

/// One row of the table.
pub(crate) struct Row {
    /// Drones of the run.
    pub(crate) drones: usize,
    /// Complete within the timeout (else `took` is the timeout and the row is partial).
    pub(crate) complete: bool,
    /// `status.counts.succeeded` and `status.wave` at the end.
    pub(crate) succeeded: u64,
    pub(crate) wave: String,
    /// Drones that received an upgrade command.
    pub(crate) dispatched: usize,
    /// Upgrade commands received (a redelivery counts again).
    pub(crate) commands: usize,
    /// From applying the rollout to Complete (or to the timeout).
    pub(crate) took: Duration,
    /// From applying the rollout to every drone seen Synced (`None`: not within 5 min of Complete).
    pub(crate) all_synced: Option<Duration>,
    /// The hub's rollout controller passes in the window.
    pub(crate) rollout_step: Histogram,
    /// The hub's node reconciler passes in the window.
    pub(crate) node_pass: Histogram,
    /// API requests in the window by (verb, resource[/subresource]).
    pub(crate) requests: BTreeMap<(String, String), f64>,
    /// The heartbeat side's status writes in the window (hub metric).
    pub(crate) heartbeat_writes: f64,
    /// The hub's VmHWM at the end.
    pub(crate) hwm_kib: u64,
    /// The hub's VmRSS when the rollout was applied.
    pub(crate) rss_before_kib: u64,
    /// Sorted signed µs: spec.firmware seen -> command received.
    pub(crate) spec_to_cmd: Vec<i64>,
    /// Sorted signed µs: command received -> firmwareSync record seen.
    pub(crate) cmd_to_record: Vec<i64>,
    /// Sorted signed µs: command received -> Synced seen.
    pub(crate) cmd_to_synced: Vec<i64>,
    /// Sorted signed µs: spec.firmware seen -> Synced seen (dispatch to the status showing it).
    pub(crate) spec_to_synced: Vec<i64>,
    /// Dispatched drones never seen Synced for their command.
    pub(crate) never_synced: usize,
    /// 1-min load average during the rollout, largest and mean of 2-s samples.
    pub(crate) load_max: f64,
    pub(crate) load_mean: f64,
    /// Heartbeats answered with an error over the whole run.
    pub(crate) heartbeat_errors: u64,
}

/// Writes that are not reads or watches.
const WRITE_VERBS: [&str; 6] = ["APPLY", "PATCH", "POST", "PUT", "CREATE", "UPDATE"];

/// Percentile `p` of sorted signed µs, in ms.
fn pct_ms(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let last = sorted.len() - 1;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank in 0..=last"
    )]
    let i = ((p / 100.0) * last as f64).round() as usize;
    sorted[i.min(last)] as f64 / 1000.0
}

fn p50_p99(v: &[i64]) -> String {
    format!("{:.0} / {:.0}", pct_ms(v, 50.0), pct_ms(v, 99.0))
}

/// Mean, then the bucket bounds of p50, p99 and the largest observation, in ms (each quantile
/// is at most its bound); `>B` past the largest bucket `B`.
fn ms_mean_p50_p99_max(h: &Histogram) -> String {
    let bound = |q: f64| {
        let b = h.quantile_bound(q);
        if b.is_finite() {
            format!("{}", b * 1000.0)
        } else {
            format!(">{:.0}", h.largest_bound() * 1000.0)
        }
    };
    format!(
        "{:.1} / {} / {} / {}",
        h.mean() * 1000.0,
        bound(0.5),
        bound(0.99),
        bound(1.0)
    )
}

impl Row {
    /// API requests of the window by kind (the bench's own one APPLY of the rollout taken out).
    fn count(&self, write: bool) -> f64 {
        let n: f64 = self
            .requests
            .iter()
            .filter(|((verb, _), _)| verb != "WATCH" && WRITE_VERBS.contains(&verb.as_str()) == write)
            .map(|(_, v)| v)
            .sum();
        if write { n - 1.0 } else { n }
    }
}

pub(crate) fn print_table(plan: &RolloutPlan, rows: &[Row]) {
    println!(
        "rollout of N simulated drones (no agents) on the real kube-apiserver + etcd: one FirmwareRollout \
         {FROM} -> {TO}, waves 1 % (soak {soak}), 10 % (soak {soak}), 100 %, maxConcurrent unset, \
         dispatchRate.maximumPerMinute {per_minute} (the hub's default: 600); each drone \
         heartbeats every {i} s over gRPC and answers its MQTT upgrade command at once with a heartbeat \
         reporting {TO} committed; hub `serve --store kube --controllers --api-qps {qps} --api-burst {burst}`",
        soak = plan.soak,
        per_minute = plan.max_per_minute,
        i = plan.interval.as_secs(),
        qps = plan.api_qps,
        burst = plan.api_burst,
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>28} {:>28} {:>6} {:>9} {:>8} {:>8} {:>8} {:>15} {:>15} {:>11}",
        "drones",
        "dispatched",
        "Complete s",
        "Synced s",
        "rollout step ms",
        "node pass ms",
        "steps",
        "writes/dr",
        "ctrl/dr",
        "reads/dr",
        "hub HWM",
        "spec->Synced ms",
        "spec->cmd ms",
        "load1"
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>28} {:>28} {:>6} {:>9} {:>8} {:>8} {:>8} {:>15} {:>15} {:>11}",
        "",
        "",
        "",
        "",
        "mean / p50 / p99 / max<=",
        "mean / p50 / p99 / max<=",
        "",
        "",
        "",
        "",
        "MiB",
        "p50 / p99",
        "p50 / p99",
        "mean / max"
    );
    for r in rows {
        let d = r.dispatched.max(1) as f64;
        println!(
            "{:>6} {:>10} {:>10} {:>10} {:>28} {:>28} {:>6.0} {:>9.2} {:>8.2} {:>8.2} {:>8.1} {:>15} {:>15} {:>11}",
            r.drones,
            r.dispatched,
            if r.complete {
                format!("{:.1}", r.took.as_secs_f64())
            } else {
                format!(">{:.0}", r.took.as_secs_f64())
            },
            r.all_synced
                .map_or_else(|| "-".to_owned(), |t| format!("{:.1}", t.as_secs_f64())),
            ms_mean_p50_p99_max(&r.rollout_step),
            ms_mean_p50_p99_max(&r.node_pass),
            r.rollout_step.count,
            r.count(true) / d,
            (r.count(true) - r.heartbeat_writes) / d,
            r.count(false) / d,
            crate::mib(r.hwm_kib * 1024),
            p50_p99(&r.spec_to_synced),
            p50_p99(&r.spec_to_cmd),
            format!("{:.1} / {:.1}", r.load_mean, r.load_max),
        );
    }
    println!(
        "Complete s: applying the rollout -> its Complete condition; Synced s: -> every drone seen Synced. \
         spec->Synced: the bench's watch first shows spec.firmware.version {TO} (the dispatch) -> the watch \
         first shows status.firmwareSync {{upgradeId: the drone's command's, reason: Synced}}; spec->cmd: -> \
         the drone receives its upgrade command. Step times: bucket bounds of the hub's \
         flightnode_hub_reconcile_duration_seconds (x2 buckets from 0.5 ms). Steps: rollout controller passes in the window (each \
         followed by one node pass). API requests: apiserver_request_total of groups {} between the last \
         drone Online and every drone Synced, per dispatched drone, watches not counted; ctrl/dr: the writes \
         less the heartbeat side's status writes (the hub's flightnode_hub_status_writes_total).",
        GROUPS.join(", ")
    );
    for r in rows.iter().filter(|r| !r.complete) {
        println!(
            "{} drones: NOT Complete after {:.0} s: wave {}, {} succeeded, {} dispatched; the figures are up to then",
            r.drones,
            r.took.as_secs_f64(),
            r.wave,
            r.succeeded,
            r.dispatched
        );
    }
    for r in rows {
        let d = r.dispatched.max(1) as f64;
        let list: Vec<String> = r
            .requests
            .iter()
            .filter(|((verb, _), _)| verb != "WATCH")
            .map(|((verb, res), v)| format!("{verb} {res} {v:.0} ({:.2})", v / d))
            .collect();
        println!(
            "{} drones: requests (per dispatched drone): {}",
            r.drones,
            list.join(", ")
        );
        println!(
            "{} drones: of those, heartbeat status writes (hub's flightnode_hub_status_writes_total) {:.0} ({:.2}); \
             bench's own: 1 APPLY firmwarerollouts (taken out of writes/dr); commands received {} for {} drones; \
             cmd->firmwareSync record visible p50 / p99 {} ms; cmd->Synced p50 / p99 {} ms (negative: the record shows before the command \
             arrives); never Synced {}; heartbeat errors {}; hub RSS before the rollout {:.1} MiB",
            r.drones,
            r.heartbeat_writes,
            r.heartbeat_writes / d,
            r.commands,
            r.dispatched,
            p50_p99(&r.cmd_to_record),
            p50_p99(&r.cmd_to_synced),
            r.never_synced,
            r.heartbeat_errors,
            crate::mib(r.rss_before_kib * 1024),
        );
    }
}
