//! A `FirmwareRollout` over a fleet of 20 real agents (`flightnode-agent run` processes with file
//! slots), real mosquitto and the real hub binary (`serve --controllers`): a bad build whose
//! health check fails on a share of the drones halts in the right wave with the right counts and
//! leaves every drone outside the dispatched waves on its old firmware; a good build then passes
//! through every wave, with the hub killed (SIGKILL) and restarted in the middle: no drone
//! installs twice, no outcome is lost.
//!
//! Store: the hub's embedded local store, not the real kube-apiserver. What this test adds is the
//! real agents and the MQTT path (commands, health checks, rollbacks, heartbeats back into the
//! outcome counts); the same controllers against the real API server (CRDs, the least-privilege
//! Role, field managers, Leases, a failover mid-wave) are covered by `hub/tests/controllers.rs`.
//! Twenty agents next to etcd, kube-apiserver and the hub would triple the load of this test on
//! a 2-core CI machine for no path the two tests do not already cover between them.
//!
//! Determinism: waves come from a stable hash of each drone's name (SHA-256, first 8 bytes, big
//! endian; the README's contract), computed here from the names the hub shows, and the drones
//! that fail are picked by their rank. The breaker rule only looks at the sample once every drone
//! dispatched so far has finished (`minFinished` = the size of the first two waves), so it trips
//! at exactly one point whatever the order the drones finish in. No wall-clock assertions; every
//! wait has a generous timeout.

use flightnode_tests::agent::binary;
use flightnode_tests::fleet::{Fleet, FleetOptions, condition, wait_until};
use serde_json::Value;
use sha2::Digest;
use std::collections::BTreeMap;
use std::time::Duration;

const DRONES: usize = 20;
const OLD: &str = "1.0.0";
const BAD: &str = "2.0.0";
const GOOD: &str = "2.0.1";
/// Cumulative waves: a canary of 2, then up to 8, then everyone.
const CANARY: usize = 2;
const SECOND: usize = 8;
const WAIT: Duration = Duration::from_secs(300);
/// The drone whose id is not a valid Kubernetes name (its object is `drone_20` → derived).
const ODD_ID: &str = "Drone_20";

fn rank_key(name: &str) -> u64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn rollout_yaml(version: &str, url: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fleet\nspec:\n\
         \x20 version: \"{version}\"\n  url: {url}\n\
         \x20 waves:\n    - count: {CANARY}\n      soak: 1s\n    - count: {SECOND}\n      soak: 1s\n\
         \x20 failurePolicy:\n    rules:\n      - kind: rolledBack\n        thresholdPercent: 25\n\
         \x20       minFinished: {SECOND}\n\
         \x20 droneTimeout: 30m\n"
    )
}

fn committed(f: &Value) -> &str {
    f["status"]["firmware"]["committedVersion"].as_str().unwrap_or("")
}

fn is_true(r: &Value, type_: &str, generation: i64) -> bool {
    r["status"]["observedGeneration"].as_i64() == Some(generation)
        && r["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == type_ && c["status"] == "True"))
}

fn counts(r: &Value) -> BTreeMap<String, u64> {
    r["status"]["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        })
        .unwrap_or_default()
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Waits until the rollout has `type_` True for `generation`.
fn wait_rollout(fleet: &Fleet, type_: &str, generation: i64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, Duration::from_millis(500), || {
        if let Some(r) = fleet.hub.rollout("fleet") {
            let done = is_true(&r, type_, generation);
            last = r;
            return done;
        }
        false
    });
    assert!(
        ok,
        "the rollout never reached {type_} in generation {generation}; last seen:\n{last:#}\nhub log tail:\n{}",
        tail(&fleet.hub.log())
    );
    last
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// `flightnode-hub rollout status fleet --once`: (exit code, stdout, stderr).
fn rollout_status(fleet: &Fleet) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(binary("flightnode-hub").unwrap())
        .args(["rollout", "status", "fleet", "--once", "--server"])
        .arg(format!("http://127.0.0.1:{}", fleet.hub.http_port))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn twenty_agents_a_bad_build_halts_in_the_second_wave_then_a_good_build_rolls_through() {
    let mut fleet = Fleet::start(FleetOptions {
        drones: DRONES,
        device_id: |i| {
            if i + 1 == DRONES {
                ODD_ID.to_owned()
            } else {
                format!("drone-{}", i + 1)
            }
        },
        // A drone fails its health check for version V when its slots directory holds a file
        // `unhealthy-V` (placed below, once the waves are known).
        health: |_| r#"test ! -e "$(dirname "$FLIGHTNODE_SLOT_PATH")/unhealthy-$FLIGHTNODE_VERSION""#.into(),
        hub_args: vec![
            "--offline-after".into(),
            "60s".into(),
            "--controllers".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--retry-backoff".into(),
            "2s".into(),
        ],
        ..FleetOptions::default()
    })
    .unwrap();
    let (_, bad_url) = fleet.bundle("bad", BAD, 64 * 1024).unwrap();
    let (_, good_url) = fleet.bundle("good", GOOD, 64 * 1024).unwrap();

    // Every drone registered, online, on the factory version; object name → drone index.
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    let registered = wait_until(WAIT, Duration::from_millis(500), || {
        let Ok(nodes) = fleet.hub.flightnodes() else {
            return false;
        };
        by_name.clear();
        for f in &nodes {
            let online = condition(f, "Online").is_some_and(|c| c["status"] == "True");
            let id = f["status"]["deviceId"].as_str().unwrap_or("");
            let index = fleet.drones.iter().position(|d| d.id == id);
            if let (true, OLD, Some(i)) = (online, committed(f), index) {
                by_name.insert(f["metadata"]["name"].as_str().unwrap_or("").to_owned(), i);
            }
        }
        by_name.len() == DRONES
    });
    assert!(
        registered,
        "not every drone registered:\n{}",
        tail(&fleet.hub.log())
    );
    let odd_name = by_name
        .iter()
        .find(|(_, i)| fleet.drones[**i].id == ODD_ID)
        .map(|(n, _)| n.clone())
        .unwrap();
    assert_ne!(odd_name, ODD_ID, "{ODD_ID} is no valid object name");

    // Drone indices by rank: the first CANARY are the canary, up to SECOND the second wave.
    let mut ranked: Vec<(u64, &String)> = by_name.keys().map(|n| (rank_key(n), n)).collect();
    ranked.sort();
    let ranked: Vec<usize> = ranked.iter().map(|(_, n)| by_name[*n]).collect();
    let mark = |i: usize, version: &str| {
        let slots = fleet.drones[i].dir.join("slots");
        std::fs::write(slots.join(format!("unhealthy-{version}")), b"").unwrap();
    };
    // The bad build: three drones of the second wave fail; the canary passes. 3 of 8 finished
    // (37 %) is over 25 %, evaluated only once all 8 finished: the breaker trips in wave 2.
    let bad_ones = &ranked[CANARY..CANARY + 3];
    for &i in bad_ones {
        mark(i, BAD);
    }
    // The good build: one drone of the last wave fails; 1 of ≥ 8 finished never reaches 25 %.
    let good_fails = *ranked[SECOND..]
        .iter()
        .find(|&&i| fleet.drones[i].id != ODD_ID)
        .unwrap();
    mark(good_fails, GOOD);

    fleet.hub.apply(&rollout_yaml(BAD, &bad_url)).unwrap();
    let r = wait_rollout(&fleet, "Halted", 1);
    let halted = r["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted"))
        .cloned()
        .unwrap();
    assert_eq!(halted["reason"], "CircuitBreakerTripped", "{r:#}");
    assert!(
        halted["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("rolledBack 3 of 8 finished drones (37%) reached the threshold of 25%"),
        "{halted:#}"
    );
    assert_eq!(r["status"]["currentWave"], 1, "halted in the second wave: {r:#}");
    assert_eq!(r["status"]["wave"], "2/3");
    assert_eq!(
        counts(&r),
        expect(&[
            ("total", 20),
            ("succeeded", 5),
            ("rolledBack", 3),
            ("failedTotal", 3),
            ("notStarted", 12),
        ]),
        "{r:#}"
    );

    // Give the controllers a few more passes: nothing new is dispatched after the halt.
    std::thread::sleep(Duration::from_secs(4));
    let r = fleet.hub.rollout("fleet").unwrap();
    assert_eq!(counts(&r)["notStarted"], 12, "{r:#}");
    let nodes = fleet.hub.flightnodes().unwrap();
    for f in &nodes {
        let name = f["metadata"]["name"].as_str().unwrap_or("");
        let i = by_name[name];
        let rank = ranked.iter().position(|&x| x == i).unwrap();
        let drone = &fleet.drones[i];
        let want = if rank >= SECOND || bad_ones.contains(&i) {
            OLD
        } else {
            BAD
        };
        assert_eq!(committed(f), want, "{name} (rank {rank}): {f:#}");
        if rank >= SECOND {
            assert!(f["spec"]["firmware"].is_null(), "{name} was dispatched: {f:#}");
            assert!(drone.slot("b").is_empty(), "{name}: slot b was written");
            assert!(
                drone.status().unwrap()["last_upgrade"].is_null(),
                "{name} saw an upgrade"
            );
        }
        if bad_ones.contains(&i) {
            assert_eq!(f["status"]["lastUpgrade"]["result"], "RolledBack", "{f:#}");
            assert_eq!(f["status"]["lastUpgrade"]["errorCode"], "health_check_failed");
            assert_eq!(f["status"]["firmware"]["activeSlot"], "a", "{f:#}");
        }
    }
    let (code, out, err) = rollout_status(&fleet);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("rolled back 3"), "{out}");
    assert!(
        err.contains("rollout fleet is halted: rolledBack 3 of 8"),
        "{err}"
    );
    let events: Vec<String> = fleet
        .hub
        .rollout_events("fleet")
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(events, ["WaveAdvanced", "Halted"]);

    // The good build, a new generation of the same rollout: through every wave. The hub is
    // killed (SIGKILL) once the second wave has started and restarted on the same store.
    fleet.hub.apply(&rollout_yaml(GOOD, &good_url)).unwrap();
    let second_wave = wait_until(WAIT, Duration::from_millis(100), || {
        fleet.hub.rollout("fleet").is_some_and(|r| {
            r["status"]["observedGeneration"] == 2 && r["status"]["currentWave"].as_u64() >= Some(1)
        })
    });
    assert!(second_wave, "{:#?}", fleet.hub.rollout("fleet"));
    fleet.hub.kill();
    fleet.hub.start().unwrap();
    let r = wait_rollout(&fleet, "Complete", 2);
    assert_eq!(r["status"]["wave"], "3/3", "{r:#}");
    assert!(!is_true(&r, "Halted", 2), "{r:#}");
    assert_eq!(
        counts(&r),
        expect(&[
            ("total", 20),
            ("succeeded", 19),
            ("rolledBack", 1),
            ("failedTotal", 1)
        ]),
        "{r:#}"
    );
    for f in fleet.hub.flightnodes().unwrap() {
        let name = f["metadata"]["name"].as_str().unwrap_or("");
        let i = by_name[name];
        let want = if i == good_fails { OLD } else { GOOD };
        assert_eq!(committed(&f), want, "{name}: {f:#}");
    }
    // One install per drone per generation that reached it, across the restart: every upgrade
    // id a drone switched to is distinct, and there are as many as generations that reached it.
    for (name, &i) in &by_name {
        let rank = ranked.iter().position(|&x| x == i).unwrap();
        let installs = if rank < SECOND { 2 } else { 1 };
        let mut switched: Vec<String> = Vec::new();
        let ok = wait_until(WAIT, Duration::from_millis(500), || {
            switched = fleet
                .hub
                .events(name)
                .unwrap_or_default()
                .iter()
                .filter(|e| e["phase"] == "Switching")
                .map(|e| e["upgradeId"].as_str().unwrap_or("").to_owned())
                .collect();
            switched.len() >= installs
        });
        assert!(ok, "{name}: switched {switched:?}");
        let distinct: std::collections::BTreeSet<&String> = switched.iter().collect();
        assert_eq!(
            distinct.len(),
            switched.len(),
            "{name} installed twice: {switched:?}"
        );
        assert_eq!(switched.len(), installs, "{name}: {switched:?}");
    }
    let odd = fleet.hub.flightnode(&odd_name).unwrap();
    assert_eq!(committed(&odd), GOOD, "{ODD_ID} got its command: {odd:#}");
    let (code, out, err) = rollout_status(&fleet);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("succeeded 19"), "{out}");
    let events: Vec<String> = fleet
        .hub
        .rollout_events("fleet")
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        events,
        [
            "WaveAdvanced",
            "Halted",
            "WaveAdvanced",
            "WaveAdvanced",
            "Completed"
        ]
    );
}
