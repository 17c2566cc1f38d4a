//! `flightnode-demo`: the whole system on one machine, nothing installed beyond Rust.
//!
//! Starts the hub on its local store with its embedded MQTT broker, N simulated drones (real
//! `flightnode-agent run` processes with file slots in a temp dir), makes a key and bundles and
//! serves them over loopback, then upgrades: drone 1 commits, drone 2 fails its health check and
//! rolls back, drone 3 gets a corrupt bundle and rejects it (and so on round-robin for more drones).
//! Shows a live table of the FlightNodes, ends with a summary, exit code 0, and nothing running.

use anyhow::{Result, bail};
use flightnode_tests::fleet::{Fleet, FleetOptions, condition};
use serde_json::Value;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What each drone (by index mod 3) should end with.
const EXPECTED: [&str; 3] = ["Committed", "RolledBack", "Rejected"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: flightnode-demo [--drones N]   (default 3; build first: cargo build --release --workspace)"
        );
        return ExitCode::SUCCESS;
    }
    let drones = args
        .iter()
        .position(|a| a == "--drones")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    match demo(drones) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn row(f: &Value) -> String {
    let st = &f["status"];
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let ready = condition(f, "Ready").map_or("-".into(), |c| s(&c["status"]));
    let last = match (
        st["lastUpgrade"]["result"].as_str(),
        st["lastUpgrade"]["errorCode"].as_str(),
    ) {
        (Some(r), Some(c)) => format!("{r} ({c})"),
        (Some(r), None) => r.to_owned(),
        _ => "-".into(),
    };
    format!(
        "{:<10} {:<8} {:<12} {:<9} {:<5} {}",
        s(&f["metadata"]["name"]),
        ready,
        s(&st["phase"]),
        s(&st["firmware"]["committedVersion"]),
        s(&st["firmware"]["activeSlot"]),
        last
    )
}

fn demo(n: usize) -> Result<()> {
    println!("starting the hub (local store, embedded MQTT broker) and {n} drones…");
    let fleet = Fleet::start(FleetOptions {
        drones: n,
        embedded_broker: true,
        health: |i| {
            if i % 3 == 1 {
                "echo 'health check: flight controller does not answer' >&2; exit 1".into()
            } else {
                "true".into()
            }
        },
        ..FleetOptions::default()
    })?;
    let (bundle, url) = fleet.bundle("firmware-2.0.0", "2.0.0", 24 * 1024 * 1024)?;
    let mut corrupt = std::fs::read(&bundle)?;
    let len = corrupt.len();
    corrupt[len - 1_000_000] ^= 0xff;
    fleet.bundles.put("/firmware-2.0.0-corrupt.fnb", corrupt);
    let corrupt_url = fleet.bundles.url("/firmware-2.0.0-corrupt.fnb");

    // Wait until every drone has reported once, so the table starts complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.hub.flightnodes()?.len() < n {
        if Instant::now() > deadline {
            bail!("not every drone reported to the hub:\n{}", fleet.hub.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, d) in fleet.drones.iter().enumerate() {
        let source = if i % 3 == 2 { &corrupt_url } else { &url };
        fleet.hub_upgrade(&d.id, &["--url", source])?;
    }
    println!("published upgrades to 2.0.0 (drone 3 gets a corrupt bundle)\n");
    println!(
        "{:<10} {:<8} {:<12} {:<9} {:<5} LAST UPGRADE",
        "NAME", "READY", "PHASE", "FIRMWARE", "SLOT"
    );
    let mut last_table = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let outcome = loop {
        let mut nodes = fleet.hub.flightnodes()?;
        nodes.sort_by_key(|f| {
            f["metadata"]["name"]
                .as_str()
                .map(|s| s.trim_start_matches("drone-").parse::<usize>().unwrap_or(0))
        });
        let table: Vec<String> = nodes.iter().map(row).collect();
        if table != last_table {
            for (i, line) in table.iter().enumerate() {
                if last_table.get(i) != Some(line) {
                    println!("{line}");
                }
            }
            last_table = table;
        }
        let done = nodes.len() >= n
            && nodes
                .iter()
                .all(|f| f["status"]["lastUpgrade"]["result"].is_string() && f["status"]["phase"] == "Idle");
        if done {
            break nodes;
        }
        if Instant::now() > deadline {
            bail!("the upgrades did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("\nsummary:");
    let mut ok = true;
    for (i, f) in outcome.iter().enumerate() {
        let got = f["status"]["lastUpgrade"]["result"].as_str().unwrap_or("-");
        let want = EXPECTED[i % 3];
        ok &= got == want;
        println!(
            "  {:<10} {:<11} running {} in slot {}{}",
            f["metadata"]["name"].as_str().unwrap_or("?"),
            got,
            f["status"]["firmware"]["committedVersion"]
                .as_str()
                .unwrap_or("?"),
            f["status"]["firmware"]["activeSlot"].as_str().unwrap_or("?"),
            if got == want {
                String::new()
            } else {
                format!("   (expected {want})")
            }
        );
    }
    if !ok {
        bail!("a drone did not end as expected");
    }
    println!("every drone ended where it should; stopping the hub, broker and drones");
    drop(fleet);
    Ok(())
}
