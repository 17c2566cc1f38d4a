//! End-to-end: mosquitto, the hub and drones as real processes; assertions on what an operator
//! sees (FlightNode objects, `firmware/<id>/status`) and on the drones' slots.

use flightnode_tests::fleet::{Fleet, FleetOptions, condition, wait_until};
use flightnode_tests::http_server::Fault;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(1);
const MIB: usize = 1024 * 1024;

fn last_result(f: &Value) -> &str {
    f["status"]["lastUpgrade"]["result"].as_str().unwrap_or("")
}

fn committed(f: &Value) -> &str {
    f["status"]["firmware"]["committedVersion"].as_str().unwrap_or("")
}

fn broker(fleet: &mut Fleet) -> &mut flightnode_tests::mosquitto::Mosquitto {
    match &mut fleet.broker {
        flightnode_tests::fleet::Broker::Mosquitto(m) => m,
        flightnode_tests::fleet::Broker::Embedded { .. } => panic!("these tests use mosquitto"),
    }
}

#[test]
fn s1_hub_upgrade_commits_and_firmware_is_synced() {
    // Signed commands only: `flightnode-hub upgrade --command-key` signs for the drone.
    let fleet = Fleet::start(FleetOptions::default()).unwrap();
    let (bundle, _) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| committed(f) == "1.0.0")
        .unwrap();
    let base = fleet.bundles.url("/");
    fleet
        .hub_upgrade(
            "drone-1",
            &[
                "--bundle",
                bundle.to_str().unwrap(),
                "--base-url",
                base.trim_end_matches('/'),
            ],
        )
        .unwrap();
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    assert_eq!(f["status"]["phase"], "Idle");
    assert_eq!(f["status"]["firmware"]["activeSlot"], "b");
    let synced = fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "FirmwareSynced").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
    assert_eq!(condition(&synced, "Online").unwrap()["status"], "True");
    let s = fleet.drones[0].status().unwrap();
    assert_eq!(s["active_slot"], "b");
    assert_eq!(s["slots"]["b"]["version"], "2.0.0");
}

#[test]
fn s2_bare_url_from_mosquitto_pub_commits() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    let (_, url) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", url.as_bytes(), false)
        .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    let status = broker(&mut fleet)
        .subscribe_once("firmware/drone-1/status", Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let status: Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["result"], "committed");
    assert_eq!(status["running"]["version"], "2.0.0");
}

#[test]
fn s3_s4_corrupt_and_forged_bundles_are_rejected_with_the_old_version_running() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        drones: 2,
        ..FleetOptions::default()
    })
    .unwrap();
    let (bundle, _) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    let bytes = std::fs::read(&bundle).unwrap();
    let mut corrupt = bytes.clone();
    let n = corrupt.len();
    corrupt[n - MIB / 2] ^= 0x80;
    fleet.bundles.put("/corrupt.fnb", corrupt);
    let mut forged = bytes;
    let at = forged.windows(9).position(|w| w == b"signature").unwrap() + 16;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    fleet.bundles.put("/forged.fnb", forged);

    let corrupt_url = fleet.bundles.url("/corrupt.fnb");
    let forged_url = fleet.bundles.url("/forged.fnb");
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", corrupt_url.as_bytes(), false)
        .unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-2/upgrade", forged_url.as_bytes(), false)
        .unwrap();
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| last_result(f) == "Rejected")
        .unwrap();
    assert_eq!(f["status"]["lastUpgrade"]["errorCode"], "hash_mismatch", "{f:#}");
    assert_eq!(committed(&f), "1.0.0");
    let f = fleet
        .wait_flightnode("drone-2", WAIT, |f| last_result(f) == "Rejected")
        .unwrap();
    assert_eq!(
        f["status"]["lastUpgrade"]["errorCode"], "signature_invalid",
        "{f:#}"
    );
    for d in &fleet.drones {
        let s = d.status().unwrap();
        assert_eq!(s["active_slot"], "a");
        assert_eq!(s["slots"]["a"]["state"], "good");
    }
}

#[test]
fn s5_failed_health_rolls_back() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        health: |_| "test \"$FLIGHTNODE_VERSION\" != 2.0.0".into(),
        ..FleetOptions::default()
    })
    .unwrap();
    let (_, url) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", url.as_bytes(), false)
        .unwrap();
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| last_result(f) == "RolledBack")
        .unwrap();
    assert_eq!(f["status"]["lastUpgrade"]["errorCode"], "health_check_failed");
    assert_eq!(committed(&f), "1.0.0");
    assert_eq!(f["status"]["firmware"]["activeSlot"], "a");
}

#[test]
fn s6_cut_mid_download_and_sigkill_resume_and_commit_with_little_refetch() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    let size = 4 * MIB;
    let (bundle, url) = fleet.bundle("v2", "2.0.0", size).unwrap();
    let len = std::fs::metadata(&bundle).unwrap().len();
    // The connection stalls halfway; the agent is killed while it waits.
    fleet
        .bundles
        .set_fault("/v2.fnb", Fault::Stall { after: len / 2 });
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", url.as_bytes(), false)
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = fleet.drones[0].status().unwrap();
        if s["progress"]["bytes"].as_u64().unwrap_or(0) > (len / 4) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fleet.drones[0].kill();
    fleet.bundles.clear_fault("/v2.fnb");
    fleet.drones[0].start().unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    let sent = fleet.bundles.bytes_sent_for("/v2.fnb");
    assert!(
        sent < size as u64 * 3 / 2,
        "downloaded {sent} bytes for a {size}-byte image"
    );
    assert_eq!(fleet.drones[0].slot("b").len(), size);
}

/// The node reconciler's command goes out while the broker has stopped answering (SIGSTOP), and
/// the broker then dies and comes back empty. rumqttc's new session drops what was in flight, so
/// a command that was only handed over is no delivery: it must go out again as soon as the broker
/// is back, not after the one-minute redelivery delay.
#[test]
fn s7_a_command_in_flight_when_the_broker_dies_goes_out_when_it_is_back() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        hub_args: [
            "--offline-after",
            "60s",
            "--controllers",
            "--reconcile-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec(),
        ..FleetOptions::default()
    })
    .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| committed(f) == "1.0.0")
        .unwrap();
    let (_, url) = fleet.bundle("v2", "2.0.0", 64 * 1024).unwrap();
    broker(&mut fleet).freeze().unwrap();
    fleet
        .hub
        .apply(&format!(
            "apiVersion: edge.drone.io/v1\nkind: FlightNode\nmetadata: {{name: drone-1}}\n\
             spec: {{firmware: {{version: 2.0.0, url: \"{url}\"}}}}\n"
        ))
        .unwrap();
    // The reconciler handed the command over (or gave up waiting for its PUBACK).
    assert!(
        wait_until(WAIT, Duration::from_millis(200), || {
            let log = fleet.hub.log();
            log.contains("command sent") || log.contains("not acknowledged by the broker")
        }),
        "the reconciler never tried:\n{}",
        fleet.hub.log()
    );
    broker(&mut fleet).kill().unwrap();
    broker(&mut fleet).start_again().unwrap();
    // Well inside the redelivery delay (60 s) a command lost with the broker used to wait for.
    let f = fleet
        .wait_flightnode("drone-1", Duration::from_secs(40), |f| committed(f) == "2.0.0")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(committed(&f), "2.0.0");
}

#[test]
fn s7_broker_then_hub_restarted_mid_upgrade_converges() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    let (bundle, url) = fleet.bundle("v2", "2.0.0", 4 * MIB).unwrap();
    let len = std::fs::metadata(&bundle).unwrap().len();
    fleet
        .bundles
        .set_fault("/v2.fnb", Fault::Stall { after: len / 2 });
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", url.as_bytes(), false)
        .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| f["status"]["phase"] == "Downloading")
        .unwrap();
    broker(&mut fleet).restart().unwrap();
    fleet.hub.kill();
    fleet.hub.start().unwrap();
    fleet.bundles.clear_fault("/v2.fnb");
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    let retained = broker(&mut fleet)
        .subscribe_once("firmware/drone-1/status", Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let retained: Value = serde_json::from_slice(&retained).unwrap();
    assert_eq!(retained["result"], "committed", "{retained:#}");
}

#[test]
fn s9_stopped_drone_goes_offline_and_comes_back() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
    fleet.drones[0].stop();
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "False")
        })
        .unwrap();
    assert_eq!(condition(&f, "Online").unwrap()["reason"], "HeartbeatTimeout");
    assert_eq!(condition(&f, "Ready").unwrap()["status"], "Unknown");
    fleet.drones[0].start().unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
}

/// Sessions live in the hub's memory: a hub restarted while its drone goes dark must still mark
/// the drone offline (from its stored heartbeat time), or it passes every online gate forever.
#[test]
fn s9_a_drone_that_went_dark_while_the_hub_restarted_goes_offline() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        hub_args: ["--offline-after", "3s", "--status-refresh", "3s"]
            .map(String::from)
            .to_vec(),
        ..FleetOptions::default()
    })
    .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
    fleet.hub.kill();
    fleet.drones[0].kill();
    fleet.hub.start().unwrap();
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "False")
        })
        .unwrap();
    assert_eq!(
        condition(&f, "Online").unwrap()["reason"],
        "HeartbeatTimeout",
        "{f:#}"
    );
    assert_eq!(condition(&f, "Ready").unwrap()["status"], "Unknown", "{f:#}");
    // What the drone last reported stays.
    assert_eq!(committed(&f), "1.0.0", "{f:#}");
    fleet.drones[0].start().unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            condition(f, "Online").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
}

#[test]
fn s8_hub_down_for_a_whole_upgrade_then_every_transition_arrives() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| committed(f) == "1.0.0")
        .unwrap();
    fleet.hub.kill();
    let (_, url) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", url.as_bytes(), false)
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while fleet.drones[0].status().unwrap()["last_upgrade"]["result"] != "committed" {
        assert!(
            std::time::Instant::now() < deadline,
            "the upgrade must finish without the hub"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.hub.start().unwrap();
    fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let events = fleet.hub.events("drone-1").unwrap();
        let phases: Vec<String> = events
            .iter()
            .map(|e| {
                format!(
                    "{}{}",
                    e["phase"].as_str().unwrap_or(""),
                    e["result"].as_str().map(|r| format!(":{r}")).unwrap_or_default()
                )
            })
            .collect();
        let want = ["Downloading", "Staged", "Switching", "Testing"];
        if want.iter().all(|w| phases.iter().any(|p| p == w)) && phases.iter().any(|p| p == "Idle:Committed")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing transitions at the hub: {phases:?}\n{events:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn s10_reboot_mode_with_uboot_commits_a_good_image_and_returns_from_a_bad_one() {
    let bootdir = tempfile::tempdir().unwrap();
    let sim = flightnode_tests::boot_sim::SimBoot::uboot(bootdir.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        health: |_| "test \"$FLIGHTNODE_VERSION\" != 3.0.0".into(),
        agent_extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\n{}",
            sim.boot_toml()
        ),
        ..FleetOptions::default()
    })
    .unwrap();
    let reboot = |fleet: &mut Fleet, expect: char| {
        let deadline = std::time::Instant::now() + WAIT;
        while fleet.drones[0].running() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reboot command never ran:\n{}",
                fleet.drones[0].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(sim.power_on().unwrap(), expect);
        fleet.drones[0].start().unwrap();
    };

    // A good image: trial boot into b, healthy, broker and hub reachable → committed.
    let (_, good) = fleet.bundle("v2", "2.0.0", 256 * 1024).unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", good.as_bytes(), false)
        .unwrap();
    reboot(&mut fleet, 'B');
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| {
            last_result(f) == "Committed" && committed(f) == "2.0.0"
        })
        .unwrap();
    assert_eq!(f["status"]["firmware"]["bootedSlot"], "b");
    assert_eq!(sim.power_on().unwrap(), 'B', "the committed slot keeps booting");
    fleet.drones[0].kill();
    fleet.drones[0].start().unwrap();

    // A bad image: trial boot into a, health fails, marked bad, reboot back into b.
    let (_, bad) = fleet.bundle("v3", "3.0.0", 256 * 1024).unwrap();
    broker(&mut fleet)
        .publish("firmware/drone-1/upgrade", bad.as_bytes(), false)
        .unwrap();
    reboot(&mut fleet, 'A');
    reboot(&mut fleet, 'B');
    let f = fleet
        .wait_flightnode("drone-1", WAIT, |f| last_result(f) == "RolledBack")
        .unwrap();
    assert_eq!(f["status"]["lastUpgrade"]["errorCode"], "health_check_failed");
    assert_eq!(committed(&f), "2.0.0");
    assert_eq!(f["status"]["firmware"]["bootedSlot"], "b");
}
