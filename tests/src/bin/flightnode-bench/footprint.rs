//! `footprint`: idle and peak RSS of the agent, next to a `mosquitto_sub`; binary sizes.

use crate::{MIB, mib};
use anyhow::{Context, Result, bail};
use flightnode_tests::agent::binary;
use std::path::Path;
use std::time::Instant;

pub(crate) fn footprint(idle_secs: u64, size_mib: u64) -> Result<()> {
    use flightnode_tests::fleet::{Broker, Fleet, FleetOptions, rss_kib};
    let fleet = Fleet::start(FleetOptions::default())?;
    let drone = &fleet.drones[0];
    let pid = drone.pid().context("the drone is not running")?;
    let Broker::Mosquitto(broker) = &fleet.broker else {
        bail!("footprint runs against mosquitto")
    };
    let sub = broker.subscriber("firmware/#")?;
    eprintln!("idling {idle_secs} s with broker and hub connected");
    std::thread::sleep(std::time::Duration::from_secs(idle_secs));
    let (idle, _) = rss_kib(pid).context("agent gone")?;
    let sub_rss = sub.pid().and_then(rss_kib).map_or(0, |(r, _)| r);
    let size = usize::try_from(size_mib * MIB).context("--size-mib is too large for this host")?;
    let (_, url) = fleet.bundle("big", "2.0.0", size)?;
    broker.publish("firmware/drone-1/upgrade", url.as_bytes(), false)?;
    let t = Instant::now();
    let mut peak = 0;
    while t.elapsed() < std::time::Duration::from_mins(10) {
        if let Some((_, hwm)) = rss_kib(pid) {
            peak = hwm;
        }
        let s = drone.status()?;
        if s["last_upgrade"]["result"] == "committed" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (after, hwm) = rss_kib(pid).context("agent gone")?;
    peak = peak.max(hwm);
    println!("agent footprint (RSS), {idle_secs} s idle then a {size_mib} MiB install");
    println!("{:<52} {:>10}", "process", "RSS MiB");
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, idle (MQTT + hub connected)",
        idle as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, peak during install",
        peak as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, after install",
        after as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "baseline: mosquitto_sub on the same broker",
        sub_rss as f64 / 1024.0
    );
    let agent = binary("flightnode-agent")?;
    println!(
        "{:<52} {:>10.1}",
        "stripped x86_64 binary size (MiB)",
        mib(std::fs::metadata(&agent)?.len())
    );
    let arm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/aarch64-unknown-linux-musl/release/flightnode-agent");
    match std::fs::metadata(&arm) {
        Ok(m) => println!(
            "{:<52} {:>10.1}",
            "stripped aarch64 binary size (MiB)",
            mib(m.len())
        ),
        Err(_) => println!("aarch64 binary: run cross/build-aarch64.sh first"),
    }
    Ok(())
}
