//! `flightnode-demo`: the whole system on one machine, nothing installed beyond Rust.
//!
//! Starts the hub on its local store with its embedded MQTT broker and its controllers, N
//! simulated drones (real `flightnode-agent run` processes with file slots in a temp dir), makes a
//! key and bundles and serves them over loopback, then rolls firmware out with a
//! `FirmwareRollout` (`flightnode-hub apply -f`): a canary wave and a second wave. The bad build
//! 2.1.0 fails its health check on the canary, the breaker trips, the rest keep their firmware;
//! the good build 2.1.1 then rolls through every wave. Ends with a summary, exit code 0, and
//! nothing running.
//!
//! `--manual`: the earlier demo, one `flightnode-hub upgrade` per drone: drone 1 commits, drone 2
//! fails its health check and rolls back, drone 3 gets a corrupt bundle and rejects it. Drone 1 is
//! flying when its upgrade arrives: its flight controller (a small MAVLink sender in this binary)
//! reports it armed and in the air, so the upgrade waits; it lands, disarms, and the upgrade
//! completes.
//!
//! Both print the address of the hub's fleet page (`/ui`) once the hub runs: open it to watch the
//! demo live. `--linger SECS` keeps everything running that long after the end, for a look at
//! the page.

use anyhow::{Context, Result, bail};
use flightnode_tests::fleet::{Fleet, FleetOptions, condition};
use serde_json::Value;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What each drone (by index mod 3) should end with.
const EXPECTED: [&str; 3] = ["Committed", "RolledBack", "Rejected"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: flightnode-demo [--drones N] [--manual] [--linger SECS]   (default 6, 3 with --manual; build first: cargo build --profile release-quick --bin flightnode-demo --bin flightnode-hub --bin flightnode-agent)"
        );
        return ExitCode::SUCCESS;
    }
    let manual = args.iter().any(|a| a == "--manual");
    let drones = args
        .iter()
        .position(|a| a == "--drones")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if manual { 3usize } else { 6 })
        .max(1);
    let linger = Duration::from_secs(
        args.iter()
            .position(|a| a == "--linger")
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    );
    let run = if manual {
        demo(drones, linger)
    } else {
        rollout_demo(drones.max(4), linger)
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Drone 1's flight controller: streams HEARTBEAT, EXTENDED_SYS_STATE and BATTERY_STATUS at
/// 10 Hz to the agent's MAVLink port, as an ArduPilot autopilot does.
struct Vehicle {
    /// (armed, in the air)
    state: Arc<Mutex<(bool, bool)>>,
    stop: Arc<AtomicBool>,
}

impl Vehicle {
    fn start(port: u16) -> Result<Vehicle> {
        use mavlink::MavConnection;
        use mavlink::dialects::common::{
            BATTERY_STATUS_DATA, EXTENDED_SYS_STATE_DATA, HEARTBEAT_DATA, MavAutopilot, MavLandedState,
            MavMessage, MavModeFlag, MavState, MavType,
        };
        let conn = mavlink::connect::<MavMessage>(&format!("udpout:127.0.0.1:{port}"))
            .with_context(|| format!("MAVLink sender to port {port}"))?;
        let state = Arc::new(Mutex::new((true, true)));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, halt) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut header = mavlink::MavHeader {
                system_id: 1,
                component_id: 1,
                sequence: 0,
            };
            while !halt.load(Ordering::Relaxed) {
                let (armed, in_air) = st.lock().map_or((true, true), |s| *s);
                let mut base_mode = MavModeFlag::MAV_MODE_FLAG_CUSTOM_MODE_ENABLED;
                if armed {
                    base_mode |= MavModeFlag::MAV_MODE_FLAG_SAFETY_ARMED;
                }
                let messages = [
                    MavMessage::HEARTBEAT(HEARTBEAT_DATA {
                        custom_mode: 5,
                        mavtype: MavType::MAV_TYPE_QUADROTOR,
                        autopilot: MavAutopilot::MAV_AUTOPILOT_ARDUPILOTMEGA,
                        base_mode,
                        system_status: if armed {
                            MavState::MAV_STATE_ACTIVE
                        } else {
                            MavState::MAV_STATE_STANDBY
                        },
                        mavlink_version: 3,
                    }),
                    MavMessage::EXTENDED_SYS_STATE(EXTENDED_SYS_STATE_DATA {
                        landed_state: if in_air {
                            MavLandedState::MAV_LANDED_STATE_IN_AIR
                        } else {
                            MavLandedState::MAV_LANDED_STATE_ON_GROUND
                        },
                        ..EXTENDED_SYS_STATE_DATA::DEFAULT
                    }),
                    MavMessage::BATTERY_STATUS(BATTERY_STATUS_DATA {
                        battery_remaining: 76,
                        ..BATTERY_STATUS_DATA::DEFAULT
                    }),
                ];
                for m in &messages {
                    let _ = conn.send(&header, m);
                    header.sequence = header.sequence.wrapping_add(1);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Ok(Vehicle { state, stop })
    }

    fn set(&self, armed: bool, in_air: bool) {
        if let Ok(mut s) = self.state.lock() {
            *s = (armed, in_air);
        }
    }
}

impl Drop for Vehicle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
    // Why an upgrade waits: the UpgradeInProgress condition's reason (`WaitingInAir`, ...).
    let phase = match (st["phase"].as_str(), condition(f, "UpgradeInProgress")) {
        (Some("Waiting"), Some(c)) => s(&c["reason"]),
        _ => s(&st["phase"]),
    };
    format!(
        "{:<10} {:<8} {:<9} {:<18} {:<9} {:<5} {}",
        s(&f["metadata"]["name"]),
        ready,
        s(&st["observedState"]),
        phase,
        s(&st["firmware"]["committedVersion"]),
        s(&st["firmware"]["activeSlot"]),
        last
    )
}

fn demo(n: usize, linger: Duration) -> Result<()> {
    println!("starting the hub (local store, embedded MQTT broker) and {n} drones…");
    let mavlink_port = flightnode_tests::fc_standin::free_udp_port()?;
    let vehicle = Vehicle::start(mavlink_port)?;
    println!("drone-1's flight controller says: armed, in the air");
    let fleet = Fleet::start(FleetOptions {
        drones: n,
        embedded_broker: true,
        drone_extra: vec![format!(
            "[flight]\nmavlink = \"udpin:127.0.0.1:{mavlink_port}\"\nstale_after = \"2s\"\n"
        )],
        health: |i| {
            if i % 3 == 1 {
                "echo 'health check: flight controller does not answer' >&2; exit 1".into()
            } else {
                "true".into()
            }
        },
        ..FleetOptions::default()
    })?;
    print_page(&fleet);
    let (bundle, url) = fleet.bundle("firmware-2.0.0", "2.0.0", 24 * 1024 * 1024)?;
    let mut corrupt = std::fs::read(&bundle)?;
    let len = corrupt.len();
    corrupt[len - 1_000_000] ^= 0xff;
    fleet.bundles.put("/firmware-2.0.0-corrupt.fnb", corrupt);
    let corrupt_url = fleet.bundles.url("/firmware-2.0.0-corrupt.fnb");

    // Wait until every drone has reported once, so the table starts complete.
    let deadline = Instant::now() + Duration::from_mins(1);
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
        "{:<10} {:<8} {:<9} {:<18} {:<9} {:<5} LAST UPGRADE",
        "NAME", "READY", "FLIGHT", "PHASE", "FIRMWARE", "SLOT"
    );
    let mut last_table = Vec::new();
    // Drone 1's flight: waiting in the air, then landed (still armed), then disarmed.
    let mut waited_since: Option<Instant> = None;
    let mut flight_step = 0;
    let deadline = Instant::now() + Duration::from_mins(3);
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
        let waiting = nodes
            .iter()
            .find(|f| f["metadata"]["name"] == "drone-1")
            .is_some_and(|f| f["status"]["phase"] == "Waiting");
        if waiting && waited_since.is_none() {
            waited_since = Some(Instant::now());
        }
        if let Some(t) = waited_since {
            let held = t.elapsed();
            if flight_step == 0 && held > Duration::from_secs(4) {
                println!("  (drone-1 lands)");
                vehicle.set(true, false);
                flight_step = 1;
            } else if flight_step == 1 && held > Duration::from_secs(8) {
                println!("  (drone-1 disarms)");
                vehicle.set(false, false);
                flight_step = 2;
            }
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
    if waited_since.is_none() {
        ok = false;
        println!("  drone-1 never waited for its flight to end");
    }
    if !ok {
        bail!("a drone did not end as expected");
    }
    hold(&fleet, linger);
    println!("every drone ended where it should; stopping the hub, broker and drones");
    drop(fleet);
    Ok(())
}

fn print_page(fleet: &Fleet) {
    println!("fleet page: http://127.0.0.1:{}/ui", fleet.hub.http_port);
}

/// `--linger`: the fleet stays up a while after the end, for the fleet page.
fn hold(fleet: &Fleet, linger: Duration) {
    if !linger.is_zero() {
        println!(
            "(--linger: the fleet stays up {} s more; fleet page: http://127.0.0.1:{}/ui)",
            linger.as_secs(),
            fleet.hub.http_port
        );
        std::thread::sleep(linger);
    }
}

/// The bad build's health check fails (the agent passes the version being tried).
const BAD: &str = "2.1.0";
const GOOD: &str = "2.1.1";

fn rollout_yaml(version: &str, url: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fleet-2-1\nspec:\n\
         \x20 version: \"{version}\"\n  url: {url}\n\
         \x20 waves:\n    - count: 2        # the canary\n      soak: 3s\n    - percent: 50\n      soak: 3s\n\
         \x20 failurePolicy:\n    rules:\n      - kind: any\n        thresholdPercent: 50\n        minFinished: 2\n\
         \x20 droneTimeout: 3m\n"
    )
}

fn rollout_line(r: &Value) -> String {
    let s = &r["status"];
    let c = &s["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let halted = s["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted" && c["status"] == "True"))
        .map(|c| format!("  HALTED: {}", c["message"].as_str().unwrap_or("")))
        .unwrap_or_default();
    format!(
        "{} wave {:<4} succeeded {}  in progress {}  waiting {}  not started {}  rolled back {}  failed {}{halted}",
        r["spec"]["version"].as_str().unwrap_or("?"),
        s["wave"].as_str().unwrap_or("-"),
        n("succeeded"),
        n("inProgress"),
        n("waiting"),
        n("notStarted"),
        n("rolledBack"),
        n("failed") + n("rejected") + n("timedOut"),
    )
}

fn has_condition(r: &Value, type_: &str, generation: i64) -> bool {
    r["status"]["observedGeneration"].as_i64() == Some(generation)
        && r["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == type_ && c["status"] == "True"))
}

/// Follows the rollout, printing a line whenever it changes, until `type_` is True.
fn follow(fleet: &Fleet, type_: &str, generation: i64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_mins(5);
    let mut last = String::new();
    loop {
        if let Some(r) = fleet.hub.rollout("fleet-2-1") {
            let line = rollout_line(&r);
            if line != last {
                println!("  {line}");
                last = line;
            }
            if has_condition(&r, type_, generation) {
                return Ok(r);
            }
        }
        if Instant::now() > deadline {
            bail!("the rollout did not reach {type_} in time:\n{}", fleet.hub.log());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn committed(f: &Value) -> String {
    f["status"]["firmware"]["committedVersion"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

fn rollout_demo(n: usize, linger: Duration) -> Result<()> {
    println!("starting the hub (local store, embedded MQTT broker, controllers) and {n} drones…");
    let fleet = Fleet::start(FleetOptions {
        drones: n,
        embedded_broker: true,
        health: |_| {
            format!(
                "if [ \"$FLIGHTNODE_VERSION\" = {BAD} ]; then echo 'health check: {BAD} does not start the flight controller' >&2; exit 1; fi"
            )
        },
        hub_args: vec!["--controllers".into(), "--reconcile-interval".into(), "1s".into()],
        ..FleetOptions::default()
    })?;
    print_page(&fleet);
    let (_, bad_url) = fleet.bundle("firmware-2.1.0", BAD, 4 * 1024 * 1024)?;
    let (_, good_url) = fleet.bundle("firmware-2.1.1", GOOD, 4 * 1024 * 1024)?;
    let deadline = Instant::now() + Duration::from_mins(1);
    while fleet.hub.flightnodes()?.len() < n {
        if Instant::now() > deadline {
            bail!("not every drone reported to the hub:\n{}", fleet.hub.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    println!("\nflightnode-hub apply -f rollout.yaml   (version {BAD}: canary of 2, then 50 %, then all)");
    fleet.hub.apply(&rollout_yaml(BAD, &bad_url))?;
    let r = follow(&fleet, "Halted", 1)?;
    let nodes = fleet.hub.flightnodes()?;
    let rolled_back = r["status"]["counts"]["rolledBack"].as_u64().unwrap_or(0);
    let on_bad = nodes.iter().filter(|f| committed(f) == BAD).count();
    let untouched = nodes.iter().filter(|f| committed(f) == "1.0.0").count();
    println!(
        "the breaker tripped in the canary: {rolled_back} rolled back, {untouched} of {n} drones still on 1.0.0"
    );
    if rolled_back != 2 || on_bad != 0 || untouched != n || r["status"]["currentWave"].as_u64() != Some(0) {
        bail!("expected the canary (2 drones) to roll back and every drone to stay on 1.0.0: {r}");
    }

    println!("\nflightnode-hub apply -f rollout.yaml   (version {GOOD}: a new generation resumes)");
    fleet.hub.apply(&rollout_yaml(GOOD, &good_url))?;
    follow(&fleet, "Complete", 2)?;
    let nodes = fleet.hub.flightnodes()?;
    println!("\nsummary:");
    for f in &nodes {
        println!(
            "  {:<10} running {} in slot {}",
            f["metadata"]["name"].as_str().unwrap_or("?"),
            committed(f),
            f["status"]["firmware"]["activeSlot"].as_str().unwrap_or("?"),
        );
    }
    println!("events:");
    for e in fleet.hub.rollout_events("fleet-2-1")? {
        println!(
            "  {:<8} {:<13} {}",
            e["type"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            e["note"].as_str().unwrap_or("")
        );
    }
    if nodes.iter().any(|f| committed(f) != GOOD) {
        bail!("a drone is not on {GOOD}");
    }
    hold(&fleet, linger);
    println!("every drone runs {GOOD}; stopping the hub, broker and drones");
    drop(fleet);
    Ok(())
}
