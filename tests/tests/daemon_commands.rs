//! The daemon's own records, against the real agent, mosquitto and hub: an MQTT install the
//! broker already counts as delivered and a hub-bound event not yet delivered live only in the
//! agent's store, so they must survive a power cut; a refused command is reported on the status
//! topic and to the hub with its code.
//!
//! Only the agent's sled store lives on the power-cut layer (`flightnode_tests::powercut`; the
//! control socket cannot: the layer has no sockets). The agent keeps `sync_file_range(2)`, as on
//! a real board: sled's `flush()` then reaches no disk barrier, and only what the store fsyncs
//! survives the cut.

use flightnode_tests::fleet::{Broker, Drone, Fleet, FleetOptions, Proc, wait_until};
use flightnode_tests::http_server::Fault;
use flightnode_tests::mosquitto::Mosquitto;
use flightnode_tests::powercut::{Durability, PowerCut};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(1);
const ID: &str = "drone-1";
const UPGRADE: &str = "firmware/drone-1/upgrade";
const STATUS: &str = "firmware/drone-1/status";

fn upgrade_json(id: &str, url: &str) -> String {
    format!(r#"{{"type":"upgrade","upgrade_id":"{id}","url":"{url}"}}"#)
}

fn mosquitto(fleet: &Fleet) -> &Mosquitto {
    match &fleet.broker {
        Broker::Mosquitto(m) => m,
        Broker::Embedded { .. } => unreachable!("these tests run mosquitto"),
    }
}

/// One drone whose store can lose power.
struct Rig {
    fleet: Fleet,
    drone: Drone,
    disk: PathBuf,
    mnt: PathBuf,
    layer: Option<PowerCut>,
}

impl Rig {
    fn new() -> Self {
        let fleet = Fleet::start(FleetOptions {
            unsigned_commands: true,
            drones: 0,
            ..FleetOptions::default()
        })
        .unwrap();
        let drone = fleet.make_drone(ID, "true", "").unwrap();
        let (disk, mnt) = (drone.dir.join("disk"), drone.dir.join("layer"));
        std::fs::create_dir_all(disk.join("db")).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(drone.dir.join("state")).unwrap();
        std::os::unix::fs::symlink(mnt.join("db"), drone.dir.join("state/db")).unwrap();
        let mut rig = Rig {
            fleet,
            drone,
            disk,
            mnt,
            layer: None,
        };
        rig.power_on();
        rig
    }

    fn power_on(&mut self) {
        self.layer = Some(PowerCut::mount(&self.disk, &self.mnt, Durability::Journal).unwrap());
    }

    /// The agent is dead already; drops every write it did not fsync, then powers on again.
    fn power_cycle(&mut self) {
        self.drone.kill();
        self.layer.take().expect("powered").cut().unwrap();
        self.power_on();
    }

    /// Starts `run` with `FLIGHTNODE_FAILPOINT=failpoint` and waits for its subscription.
    fn start_failing_at(&self, failpoint: &str) -> Proc {
        self.start_with(&[("FLIGHTNODE_FAILPOINT", failpoint)])
    }

    /// Starts `run` with `env` and waits for its subscription.
    fn start_with(&self, env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(&self.fleet.agent);
        cmd.arg("--config")
            .arg(&self.drone.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn(cmd, &self.drone.dir.join("agent.log")).unwrap();
        mosquitto(&self.fleet)
            .wait_subscribed(ID, WAIT, || {
                (!proc.running()).then(|| format!("the agent exited:\n{}", proc.log()))
            })
            .unwrap();
        proc
    }

    fn start(&mut self) {
        self.drone.start().unwrap();
    }

    fn publish(&self, payload: &str) {
        mosquitto(&self.fleet)
            .publish(UPGRADE, payload.as_bytes(), false)
            .unwrap();
    }

    fn status(&self) -> Value {
        self.drone.status().unwrap()
    }

    /// Waits until the hub recorded an event of `upgrade_id` for which `pred` holds.
    fn wait_hub_event(&self, upgrade_id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let ok = wait_until(WAIT, Duration::from_millis(200), || {
            let events = self.fleet.hub.events(ID).unwrap_or_default();
            found = events
                .into_iter()
                .find(|e| e["upgradeId"] == upgrade_id && pred(e));
            found.is_some()
        });
        assert!(
            ok,
            "the hub never recorded the event of {upgrade_id}: {:#?}\nagent log:\n{}",
            self.fleet.hub.events(ID).unwrap_or_default(),
            self.drone.log()
        );
        found.unwrap_or_default()
    }
}

/// The broker has its PUBACK, so nothing sends an accepted command again: the power fails right
/// after the agent kept it, before its install started, and it must run after the power-on.
#[test]
fn an_accepted_command_survives_a_power_cut_and_runs() {
    let mut rig = Rig::new();
    let (_, url) = rig.fleet.bundle("v2", "2.0.0", 200_000).unwrap();
    let mut agent = rig.start_failing_at("command_queued");
    rig.publish(&upgrade_json("pc-1", &url));
    assert!(
        wait_until(WAIT, Duration::from_millis(50), || !agent.running()),
        "the agent never reached the failpoint:\n{}",
        agent.log()
    );
    assert!(
        mosquitto(&rig.fleet)
            .log()
            .contains(&format!("Received PUBACK from {ID}")),
        "the broker must have its PUBACK before the cut:\n{}",
        mosquitto(&rig.fleet).log()
    );
    rig.power_cycle();

    rig.start();
    let ok = wait_until(WAIT, Duration::from_millis(200), || {
        rig.status()["committed_version"] == "2.0.0"
    });
    assert!(
        ok,
        "the command accepted before the power cut never ran: {:#}\nagent log:\n{}",
        rig.status(),
        rig.drone.log()
    );
    assert_eq!(rig.status()["last_upgrade"]["upgrade_id"], "pc-1");
    assert!(
        rig.drone
            .log()
            .contains("taking up a command accepted before the restart"),
        "{}",
        rig.drone.log()
    );
}

/// A cancel that arrives after the engine thread took the command up, but before the engine saved
/// its first phase (an offline drone gets its queued upgrade and the cancel back to back), still
/// wins: nothing is written and the upgrade ends canceled.
#[test]
fn a_cancel_right_after_the_engine_took_the_command_up_wins() {
    let rig = Rig::new();
    let (_, url) = rig.fleet.bundle("v2", "2.0.0", 200_000).unwrap();
    let release = rig.drone.dir.join("release");
    let mut agent = rig.start_with(&[
        ("FLIGHTNODE_FAILPOINT", "hold:install_taken"),
        ("FLIGHTNODE_FAILPOINT_RELEASE", release.to_str().unwrap()),
    ]);
    rig.publish(&upgrade_json("cx-1", &url));
    assert!(
        wait_until(WAIT, Duration::from_millis(50), || agent
            .log()
            .contains("failpoint install_taken: holding")),
        "the engine never took the command up:\n{}",
        agent.log()
    );
    rig.publish(r#"{"type":"cancel","upgrade_id":"cx-1"}"#);
    assert!(
        wait_until(WAIT, Duration::from_millis(50), || agent.log().contains("cancel")),
        "the cancel never reached the agent:\n{}",
        agent.log()
    );
    std::fs::write(&release, "").unwrap();
    let mut status = Value::Null;
    let ended = wait_until(WAIT, Duration::from_millis(200), || {
        status = rig.status();
        !status["last_upgrade"].is_null()
    });
    assert!(ended, "the upgrade never ended: {status:#}\n{}", agent.log());
    assert_eq!(
        (
            &status["last_upgrade"]["upgrade_id"],
            &status["last_upgrade"]["result"]
        ),
        (&Value::from("cx-1"), &Value::from("canceled")),
        "{status:#}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(status["committed_version"], "1.0.0", "{status:#}");
    agent.kill();
}

/// The hub is down while an install ends: its events wait in the outbox. The power fails; after
/// the power-on every one of them, the last (committed) included, reaches the hub.
#[test]
fn an_undelivered_hub_event_survives_a_power_cut_and_is_delivered() {
    let mut rig = Rig::new();
    let (_, url) = rig.fleet.bundle("v2", "2.0.0", 200_000).unwrap();
    rig.fleet.hub.kill();
    rig.start();
    mosquitto(&rig.fleet).wait_subscribed(ID, WAIT, || None).unwrap();
    rig.publish(&upgrade_json("pc-2", &url));
    let ok = wait_until(WAIT, Duration::from_millis(200), || {
        rig.status()["last_upgrade"]["result"] == "committed"
    });
    assert!(ok, "the install never ended:\n{}", rig.drone.log());
    rig.power_cycle();

    rig.fleet.hub.start().unwrap();
    rig.start();
    let e = rig.wait_hub_event("pc-2", |e| e["result"] == "Committed");
    assert_eq!(e["phase"], "Idle", "{e:#}");
}

/// Every refused command reaches the status topic and the hub with its code, against the upgrade
/// id it named: a rollout sees the refusal at once, not through its timeout.
#[test]
fn refused_commands_are_reported_on_the_status_topic_and_to_the_hub() {
    let mut fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    let sub = mosquitto(&fleet).subscriber(STATUS).unwrap();
    let publish = |payload: &str| {
        mosquitto(&fleet)
            .publish(UPGRADE, payload.as_bytes(), false)
            .unwrap();
    };
    let wait_report = |needle: &str| {
        assert!(
            sub.wait_for(needle, WAIT),
            "never saw {needle} on the status topic:\n{}",
            sub.output()
        );
    };
    let wait_hub = |fleet: &Fleet, id: &str, code: &str| {
        let mut events = Vec::new();
        let ok = wait_until(WAIT, Duration::from_millis(200), || {
            events = fleet.hub.events(ID).unwrap_or_default();
            events
                .iter()
                .any(|e| e["upgradeId"] == id && e["errorCode"] == code && e["result"] == "Rejected")
        });
        assert!(ok, "the hub never saw {id} refused with {code}: {events:#?}");
        // The drone's status names the refusal as its last upgrade: a rollout waiting on this
        // command learns of it at once, not at its timeout.
        let mut last = Value::Null;
        let ok = wait_until(WAIT, Duration::from_millis(200), || {
            last = fleet
                .hub
                .flightnode(ID)
                .map(|n| n["status"]["lastUpgrade"].clone())
                .unwrap_or_default();
            last["id"] == id && last["result"] == "Rejected" && last["errorCode"] == code
        });
        assert!(
            ok,
            "status.lastUpgrade never named {id} refused with {code}: {last:#}"
        );
    };

    // A payload that is not a valid command but names its upgrade.
    publish(r#"{"type":"upgrade","upgrade_id":"bad-1","url":"ftp://fw.example/b.fnb"}"#);
    wait_report(
        r#""upgrade_id":"bad-1","phase":"idle","progress":null,"result":"rejected","error":{"code":"malformed""#,
    );
    wait_hub(&fleet, "bad-1", "malformed");

    // Busy: an install stalls halfway, a second one is refused.
    let (bundle, url) = fleet.bundle("v2", "2.0.0", 1_000_000).unwrap();
    let len = std::fs::metadata(&bundle).unwrap().len();
    fleet
        .bundles
        .set_fault("/v2.fnb", Fault::Stall { after: len / 2 });
    publish(&upgrade_json("up-a", &url));
    wait_report(r#""upgrade_id":"up-a","phase":"downloading""#);
    publish(&upgrade_json("up-b", &url));
    wait_report(
        r#""upgrade_id":"up-b","phase":"downloading","progress":null,"result":"rejected","error":{"code":"busy""#,
    );
    wait_hub(&fleet, "up-b", "busy");
    fleet.drones[0].kill();
}

/// A cancel that overtakes its upgrade (the hub sends it again while the upgrade still sits in a
/// broker's queue, or the broker lost the first cancel but kept the upgrade): the drone ends the
/// upgrade canceled without running it, the hub's status names it canceled as the last upgrade
/// (the hub's sign that its cancel arrived), and the upgrade, when it comes after all, never
/// installs.
#[test]
fn a_cancel_of_an_upgrade_not_arrived_yet_is_acknowledged_and_the_upgrade_never_installs() {
    let fleet = Fleet::start(FleetOptions {
        unsigned_commands: true,
        ..FleetOptions::default()
    })
    .unwrap();
    let sub = mosquitto(&fleet).subscriber(STATUS).unwrap();
    let publish = |payload: &str| {
        mosquitto(&fleet)
            .publish(UPGRADE, payload.as_bytes(), false)
            .unwrap();
    };
    let (_, url) = fleet.bundle("v2", "2.0.0", 200_000).unwrap();
    publish(r#"{"type":"cancel","upgrade_id":"late-1"}"#);
    assert!(
        sub.wait_for(
            r#""upgrade_id":"late-1","phase":"idle","progress":null,"result":"canceled""#,
            WAIT
        ),
        "no canceled report on the status topic:\n{}\nagent log:\n{}",
        sub.output(),
        fleet.drones[0].log()
    );
    let mut last = Value::Null;
    let ok = wait_until(WAIT, Duration::from_millis(200), || {
        last = fleet
            .hub
            .flightnode(ID)
            .map(|n| n["status"]["lastUpgrade"].clone())
            .unwrap_or_default();
        last["id"] == "late-1" && last["result"] == "Canceled"
    });
    assert!(ok, "status.lastUpgrade never named late-1 canceled: {last:#}");

    // The upgrade arrives after its cancel: answered with its end, not installed.
    publish(&upgrade_json("late-1", &url));
    assert!(
        wait_until(WAIT, Duration::from_millis(100), || fleet.drones[0]
            .log()
            .contains("upgrade delivered again; republishing its state")),
        "the late upgrade was not recognised:\n{}",
        fleet.drones[0].log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let node = fleet.hub.flightnode(ID).unwrap_or_default();
    assert_eq!(
        node["status"]["firmware"]["committedVersion"], "1.0.0",
        "{node:#}"
    );
    assert!(
        node["status"]["currentUpgrade"].is_null(),
        "it started the canceled upgrade: {node:#}"
    );
    assert!(
        !fleet.drones[0].log().contains("upgrade accepted"),
        "{}",
        fleet.drones[0].log()
    );
}
