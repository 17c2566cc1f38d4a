//! `flightnode-bench`: measurements that print tables, each against a baseline measured in the
//! same run. Build with `cargo build --release --workspace` first; see docs/src/measurements.md.
//!
//! - `install [--size-mib 256] [--runs 3]`: bundle download + verify + write into a file slot over
//!   loopback HTTP, vs `curl | tee >(sha256sum) > slot` and a minimal Rust GET + sha256 + write;
//!   plus raw single-core sha256 throughput, the physical limit.
//! - `chunks [--size-mib 256] [--level L] [--window-kib W] [--segment-kib S] [--chunk-kib C] [--runs 3]
//!   [--no-baselines] [--bsdiff] [--old V1.img --new V2.img | --real-files DIR,...] [--chunk-workers N]` (L, W, S, C:
//!   `bundle create`'s defaults unless given): bytes the server sends for a full plain download,
//!   a full chunked download and a chunked update over the older slot of an ext4 image
//!   (generated, or the pair given, such as `tests/bench/debian-pair.sh`'s) or of a tar of
//!   `--size-mib` of real files, next to `zstd -19` and `xdelta3`/`bsdiff` deltas where
//!   installed; install time and CPU time (median of the runs) and the agent's own peak RSS.
//!   `--chunk-workers N` installs format 2 with `[download] chunk_workers` = 1 and = N, side by
//!   side in the same alternating rounds.
//! - `footprint [--idle-secs 60] [--size-mib 64]`: idle and peak RSS of `flightnode-agent run`
//!   connected to mosquitto and the hub, idle and during an install, next to a `mosquitto_sub`
//!   connected to the same broker; stripped binary sizes.
//! - `hub [--drones 1000,10000] [--seconds 40] [--interval 10] [--wave 50] [--wave-secs 20] [--channels 12]`:
//!   N simulated drones over gRPC against a real `flightnode-hub serve --store kube` whose API
//!   server is the fake Kubernetes API, vs the same generator against a no-op tonic
//!   `HubService` (the transport's ceiling); `--wave` drones upgrade, their starts spread over
//!   `--wave-secs` from a quarter into the run; the drones share `--channels` HTTP/2
//!   connections (one per drone measures what connections cost).
//! - `rate [--size-mib 8] [--rates 262144,1048576,2097152]`: installs over loopback HTTP with
//!   `[download] max_rate` set to each rate, and prints the rate the server measured against it.
//! - `rollout [--drones 1000] [--api-qps 200] [--api-burst 400] [--interval 30] [--soak 5s]
//!   [--max-per-minute 3000] [--timeout-secs 900]`: N simulated drones (gRPC heartbeats, MQTT
//!   commands, no agents) through a FirmwareRollout (`spec.dispatchRate.maximumPerMinute` set to
//!   `--max-per-minute`) on the real Kubernetes API server (`FLIGHTNODE_K8S_DIR`) with the real
//!   `flightnode-hub serve --store kube --controllers`, next to the same rollout with N/10
//!   drones: controller step time, API requests per dispatched drone, hub peak memory, and the
//!   times from `spec.firmware` to the command and to `Synced`.
mod chunks;
mod footprint;
mod hub;
mod install;
mod prom;
mod rate;
mod rollout;
mod rollout_drones;
mod rollout_report;

use anyhow::Result;
use chunks::chunks;

use footprint::footprint;
use hub::{HubPlan, hub_bench};
use install::install;
use std::str::FromStr;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        usage();
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("install") => install(flag(&args, "--size-mib", 256), flag(&args, "--runs", 3)),
        Some("chunks") => chunks(&chunks::Options {
            size_mib: flag(&args, "--size-mib", 256),
            level: given(&args, "--level")?,
            window_kib: given(&args, "--window-kib")?,
            segment_kib: given(&args, "--segment-kib")?,
            chunk_kib: given(&args, "--chunk-kib")?,
            runs: flag(&args, "--runs", 3),
            baselines: !args.iter().any(|a| a == "--no-baselines"),
            bsdiff: args.iter().any(|a| a == "--bsdiff"),
            images: match (
                flag(&args, "--old", String::new()),
                flag(&args, "--new", String::new()),
            ) {
                (old, new) if old.is_empty() && new.is_empty() => None,
                (old, new) if !old.is_empty() && !new.is_empty() => Some((old.into(), new.into())),
                _ => anyhow::bail!("chunks: give both --old V1.img and --new V2.img, or neither"),
            },
            real_files: given::<String>(&args, "--real-files")?
                .map(|dirs| dirs.split(',').map(std::path::PathBuf::from).collect()),
            chunk_workers: given(&args, "--chunk-workers")?,
        }),
        Some("child-rusage") => chunks::child_rusage(&args[1..]),
        Some("footprint") => footprint(flag(&args, "--idle-secs", 60), flag(&args, "--size-mib", 64)),
        Some("hub") => {
            let drones: Vec<usize> = args
                .iter()
                .position(|a| a == "--drones")
                .and_then(|i| args.get(i + 1))
                .map_or_else(
                    || vec![1000, 10000],
                    |v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
                );
            let seconds = flag(&args, "--seconds", 40);
            let wave = flightnode_tests::load::Wave {
                drones: flag(&args, "--wave", 50),
                start_at: std::time::Duration::from_secs(seconds / 4),
                spread: std::time::Duration::from_secs(flag(&args, "--wave-secs", 20)),
                step: std::time::Duration::from_millis(500),
            };
            let plan = HubPlan {
                seconds,
                interval: flag(&args, "--interval", 10),
                wave,
                channels: flag(&args, "--channels", 12_usize).max(1),
            };
            hub_bench(&drones, plan)
        }
        Some("rate") => {
            let rates: Vec<u64> = flag(&args, "--rates", "262144,1048576,2097152".to_owned())
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect();
            rate::rate(flag(&args, "--size-mib", 8), &rates)
        }
        Some("rollout") => rollout::rollout_bench(&rollout::RolloutPlan {
            drones: flag(&args, "--drones", 1000_usize).max(1),
            api_qps: flag(&args, "--api-qps", 200.0),
            api_burst: flag(&args, "--api-burst", 400),
            interval: std::time::Duration::from_secs(flag(&args, "--interval", 30_u64).max(1)),
            soak: flag(&args, "--soak", "5s".to_owned()),
            max_per_minute: flag(&args, "--max-per-minute", 3000_u32).max(1),
            timeout: std::time::Duration::from_secs(flag(&args, "--timeout-secs", 900)),
        }),
        _ => {
            usage();
            std::process::exit(2);
        }
    }
}

fn usage() {
    eprintln!("usage: flightnode-bench install [--size-mib N] [--runs N]");
    eprintln!(
        "       flightnode-bench chunks [--size-mib 256] [--level L] [--window-kib W] [--segment-kib S] [--chunk-kib C] [--runs 3] [--no-baselines] [--bsdiff] [--old V1.img --new V2.img | --real-files DIR,...] [--chunk-workers N]"
    );
    eprintln!("         (L, W, S, C: `flightnode-agent bundle create`'s defaults unless given)");
    eprintln!("       flightnode-bench footprint [--idle-secs N] [--size-mib N]");
    eprintln!(
        "       flightnode-bench hub [--drones 1000,10000] [--seconds 40] [--interval 10] [--wave 50] [--wave-secs 20] [--channels 12]"
    );
    eprintln!("       flightnode-bench rate [--size-mib 8] [--rates 262144,1048576,2097152]");
    eprintln!(
        "       flightnode-bench rollout [--drones 1000] [--api-qps 200] [--api-burst 400] [--interval 30] [--soak 5s] [--max-per-minute 3000] [--timeout-secs 900]"
    );
    eprintln!("Build with `cargo build --release --workspace` first; see docs/src/measurements.md.");
}

/// The value after `name`, if given; an error when it is given but does not parse.
fn given<T: FromStr>(args: &[String], name: &str) -> Result<Option<T>> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    let v = args
        .get(i + 1)
        .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
    v.parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{name} {v}: not a number"))
}

/// The value after `name` on the command line, or `default` when it is missing or unparsable.
fn flag<T: FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes in a MiB.
pub(crate) const MIB: u64 = 1 << 20;

/// `bytes` in MiB, for tables.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

pub(crate) fn mib_s(bytes: u64, secs: f64) -> f64 {
    mib(bytes) / secs.max(1e-9)
}

/// Median of the runs.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
