//! Commands only the hub can issue, attacked from outside: an outsider holds the broker
//! credentials (it publishes on `firmware/<id>/upgrade` with mosquitto) but no hub key. Every
//! attack is refused with its own code on the drone's status topic, and the drone keeps running
//! its firmware. The hub's own commands (signed with `--command-key`) still install, also on a
//! drone whose clock was set back a year (run under `faketime`): its trusted time comes from
//! the hub's signed heartbeat time and says so, or from the flight controller's GPS time (the
//! pymavlink stand-in's SYSTEM_TIME) when there is one.

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use flightnode_proto::mqtt::sign_command;
use flightnode_proto::mqtt::{Command, UpgradeCommand};
use flightnode_tests::agent::agent_a_year_behind;
use flightnode_tests::fc_standin::{Vehicle, free_udp_port};
use flightnode_tests::fleet::{Fleet, FleetOptions, wait_until};
use flightnode_tests::mosquitto::{Mosquitto, Subscriber};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_mins(1);
const MIB: usize = 1024 * 1024;

fn mosquitto(fleet: &Fleet) -> &Mosquitto {
    match &fleet.broker {
        flightnode_tests::fleet::Broker::Mosquitto(m) => m,
        flightnode_tests::fleet::Broker::Embedded { .. } => panic!("these tests use mosquitto"),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn key(path: &Path) -> SigningKey {
    SigningKey::from_pkcs8_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn upgrade(id: &str, url: &str) -> Command {
    Command::Upgrade(UpgradeCommand {
        upgrade_id: id.into(),
        url: url.into(),
        version: None,
        allow_downgrade: false,
    })
}

/// Waits for the drone's report on `upgrade_id` and returns its error code ("" for none).
fn refusal(status: &Subscriber, upgrade_id: &str) -> String {
    let needle = format!("\"upgrade_id\":\"{upgrade_id}\"");
    assert!(
        status.wait_for(&needle, WAIT),
        "no report on {upgrade_id}:\n{}",
        status.output()
    );
    let line = status
        .output()
        .lines()
        .find(|l| l.contains(&needle))
        .map(str::to_owned)
        .unwrap();
    let json: Value = serde_json::from_str(line.split_once(' ').unwrap().1).unwrap();
    json["error"]["code"].as_str().unwrap_or("").to_owned()
}

fn assert_untouched(fleet: &Fleet) {
    let s = fleet.drones[0].status().unwrap();
    assert_eq!(s["active_slot"], "a", "{s:#}");
    assert_eq!(s["slots"]["a"]["version"], "1.0.0", "{s:#}");
    assert_eq!(s["phase"], "idle", "{s:#}");
}

#[test]
fn an_outsider_with_broker_access_cannot_command_a_drone() {
    let fleet = Fleet::start(FleetOptions::default()).unwrap();
    let (_, url) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    let broker = mosquitto(&fleet);
    let status = broker.subscriber("firmware/drone-1/status").unwrap();
    let topic = "firmware/drone-1/upgrade";
    let hub = key(&fleet.command_key());
    let t = now();

    // A bare URL and plain JSON, the unsigned forms.
    broker.publish(topic, url.as_bytes(), false).unwrap();
    let bare_id = flightnode_proto::mqtt::derive_upgrade_id(&url);
    assert_eq!(refusal(&status, &bare_id), "command_unsigned");
    let plain = upgrade("plain-1", &url).to_json(Some("drone-1"));
    broker.publish(topic, plain.as_bytes(), false).unwrap();
    assert_eq!(refusal(&status, "plain-1"), "command_unsigned");

    // Signed, but with the outsider's own key.
    let outsider = SigningKey::from_bytes(&[42; 32]);
    let forged = sign_command(&upgrade("forged-1", &url), "drone-1", t, t + 600, &outsider);
    broker.publish(topic, forged.as_bytes(), false).unwrap();
    assert_eq!(refusal(&status, "forged-1"), "command_untrusted");

    // A genuine hub command captured on another drone's topic.
    let other = sign_command(&upgrade("other-1", &url), "drone-2", t, t + 600, &hub);
    broker.publish(topic, other.as_bytes(), false).unwrap();
    assert_eq!(refusal(&status, "other-1"), "command_wrong_device");

    // A genuine hub command captured two hours ago, valid for one.
    let stale = sign_command(&upgrade("stale-1", &url), "drone-1", t - 7200, t - 3600, &hub);
    broker.publish(topic, stale.as_bytes(), false).unwrap();
    assert_eq!(refusal(&status, "stale-1"), "command_expired");
    assert_untouched(&fleet);

    // The hub's command installs; its id replayed with another bundle does not.
    fleet
        .hub_upgrade("drone-1", &["--url", &url, "--upgrade-id", "r-1"])
        .unwrap();
    assert!(
        wait_until(WAIT, Duration::from_millis(200), || {
            fleet.drones[0]
                .status()
                .is_ok_and(|s| s["slots"]["b"]["version"] == "2.0.0" && s["phase"] == "idle")
        }),
        "{}",
        fleet.drones[0].log()
    );
    let (_, old_url) = fleet.bundle("v1b", "1.5.0", MIB).unwrap();
    let replay = sign_command(&upgrade("r-1", &old_url), "drone-1", t - 60, t + 600, &hub);
    let before = status.output().matches("\"upgrade_id\":\"r-1\"").count();
    broker.publish(topic, replay.as_bytes(), false).unwrap();
    assert!(
        wait_until(WAIT, Duration::from_millis(100), || {
            status.output().matches("\"upgrade_id\":\"r-1\"").count() > before
        }),
        "{}",
        status.output()
    );
    let last = status
        .output()
        .lines()
        .rfind(|l| l.contains("\"upgrade_id\":\"r-1\""))
        .map(str::to_owned)
        .unwrap();
    assert!(last.contains("\"code\":\"command_replayed\""), "{last}");
    let s = fleet.drones[0].status().unwrap();
    assert_eq!(s["active_slot"], "b", "{s:#}");
    assert_eq!(s["slots"]["b"]["version"], "2.0.0", "{s:#}");
}

/// Publishes a hub command that expired an hour ago (still in the future by a clock a year
/// behind) and returns the refusal's report line.
fn stale_command_refused(fleet: &Fleet) -> String {
    let (_, url) = fleet.bundle("v2", "2.0.0", MIB).unwrap();
    let hub = key(&fleet.command_key());
    let t = now();
    let status = mosquitto(fleet).subscriber("firmware/drone-1/status").unwrap();
    let stale = sign_command(&upgrade("stale-1", &url), "drone-1", t - 7200, t - 3600, &hub);
    mosquitto(fleet)
        .publish("firmware/drone-1/upgrade", stale.as_bytes(), false)
        .unwrap();
    assert_eq!(refusal(&status, "stale-1"), "command_expired");
    assert_untouched(fleet);
    status.output()
}

/// Waits until the drone's trusted clock reads from `source`, and checks it is the real time.
fn wait_clock(fleet: &Fleet, source: &str) {
    let before = fleet.drones[0].status().unwrap();
    assert!(
        wait_until(WAIT, Duration::from_millis(200), || {
            fleet.drones[0]
                .status()
                .is_ok_and(|s| s["clock"]["source"] == source)
        }),
        "before: {before:#}\n{}",
        fleet.drones[0].log()
    );
    let s = fleet.drones[0].status().unwrap();
    let trusted = s["clock"]["unix_ms"].as_u64().unwrap();
    let wall = now() * 1000;
    assert!(trusted.abs_diff(wall) < 120_000, "trusted {trusted}, real {wall}");
    // The operator sees it on the FlightNode too.
    fleet
        .wait_flightnode("drone-1", WAIT, |f| f["status"]["clockSource"] == source)
        .unwrap();
}

#[test]
fn a_drone_whose_clock_was_set_back_a_year_trusts_the_hub_time() {
    let dir = tempfile::tempdir().unwrap();
    let Some(agent) = agent_a_year_behind(dir.path()).unwrap() else {
        return;
    };
    let fleet = Fleet::start(FleetOptions {
        agent_bin: Some(agent),
        ..FleetOptions::default()
    })
    .unwrap();
    // The drone hears the hub's signed time with every heartbeat (one a second).
    wait_clock(&fleet, "hub");
    let out = stale_command_refused(&fleet);
    assert!(out.contains("by the hub clock"), "{out}");

    // The hub's fresh command installs.
    let (_, url) = fleet.bundle("v3", "3.0.0", MIB).unwrap();
    fleet.hub_upgrade("drone-1", &["--url", &url]).unwrap();
    assert!(
        wait_until(WAIT, Duration::from_millis(200), || {
            fleet.drones[0]
                .status()
                .is_ok_and(|s| s["slots"]["b"]["version"] == "3.0.0" && s["phase"] == "idle")
        }),
        "{}",
        fleet.drones[0].log()
    );
}

#[test]
fn gps_time_from_the_flight_controller_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let Some(agent) = agent_a_year_behind(dir.path()).unwrap() else {
        return;
    };
    let port = free_udp_port().unwrap();
    let mut vehicle = Vehicle::start(port, &[]).unwrap();
    let fleet = Fleet::start(FleetOptions {
        agent_bin: Some(agent),
        drone_extra: vec![format!(
            "[flight]\nmavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"2s\"\n"
        )],
        ..FleetOptions::default()
    })
    .unwrap();
    // SYSTEM_TIME with 0 (no GPS fix yet) is not taken.
    wait_clock(&fleet, "hub");
    vehicle.send(&format!("gpstime {}", now())).unwrap();
    wait_clock(&fleet, "gps");
    let out = stale_command_refused(&fleet);
    assert!(out.contains("by the gps clock"), "{out}");
}
