//! `install.require_charging`: the switch waits (reason `not_charging`) until the vehicle
//! reports BATTERY_STATUS `charge_state` CHARGING, streamed by the pymavlink stand-in, or until
//! the dock command says so.

mod common;
use common::flight::{Gated, WAIT};
use common::{Daemon, Device, Options};
use flightnode_tests::fc_standin::{Vehicle, free_udp_port};
use flightnode_tests::http_server::BundleServer;
use flightnode_tests::mosquitto::Mosquitto;

#[test]
fn the_switch_waits_until_the_vehicle_reports_charging() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&format!(
        "mavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\n[install]\nrequire_charging = true\n"
    ));
    // Disarmed on the ground, battery fine: only the charger is missing.
    let mut v = Vehicle::start(port, &[]).unwrap();
    let install = g.install("2.0.0");
    g.assert_held("not_charging");
    let s = g.dev.status();
    assert_eq!(
        s["slots"]["b"]["version"], "2.0.0",
        "downloaded, not switched: {s:#}"
    );
    g.wait_log_line(&["not_charging", "charge_state other than charging"]);

    v.send("charging").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn no_charge_state_heard_counts_as_not_charging() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&format!(
        "mavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\nunknown = \"allow\"\n[install]\nrequire_charging = true\n"
    ));
    // It charges, but nothing reaches the agent: the flight gate would allow an unknown
    // state here, the charging hold does not.
    let mut v = Vehicle::start(port, &["--charging"]).unwrap();
    v.send("silence").unwrap();
    // Past `stale_after`: what was heard before the silence no longer counts.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let install = g.install("2.0.0");
    g.assert_held("not_charging");
    g.wait_log_line(&["not_charging", "no BATTERY_STATUS charge_state"]);
    v.send("resume").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn the_dock_command_says_when_it_charges() {
    let dock = tempfile::tempdir().unwrap();
    let docked = dock.path().join("docked");
    let g = Gated::new(&format!(
        "gate_command = \"true\"\n[install]\nrequire_charging = true\ncharging_command = \"test -e {}\"\n",
        docked.display()
    ));
    let install = g.install("2.0.0");
    g.assert_held("not_charging");
    g.wait_log_line(&["not_charging", "charging command"]);
    std::fs::write(&docked, b"").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn a_mavlink_1_vehicle_cannot_say_it_charges() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&format!(
        "mavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\n[install]\nrequire_charging = true\n"
    ));
    // charge_state is a MAVLink 2 extension field: a MAVLink 1 BATTERY_STATUS carries none.
    let _v = Vehicle::start(port, &["--mavlink1", "--charging"]).unwrap();
    let _install = g.install("2.0.0");
    g.assert_held("not_charging");
}

#[test]
fn the_hold_reaches_the_mqtt_status_report() {
    let broker = Mosquitto::start().unwrap();
    let port = free_udp_port().unwrap();
    let dev = Device::new(Options {
        extra: format!(
            "[install]\nrequire_charging = true\n[commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n[flight]\nmavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\n",
            broker.url()
        ),
        ..Options::default()
    });
    let sub = broker.subscriber("firmware/drone-test/status").unwrap();
    let bundle = dev.bundle("v2", "2.0.0", 100_000, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let _daemon = Daemon::start_subscribed(&dev);
    let mut v = Vehicle::start(port, &[]).unwrap();
    let command = format!(
        r#"{{"type":"upgrade","upgrade_id":"up-chg","url":"{}"}}"#,
        srv.url("/fw.fnb")
    );
    broker
        .publish("firmware/drone-test/upgrade", command.as_bytes(), false)
        .unwrap();
    assert!(
        sub.wait_for(r#""phase":"waiting","wait_reason":"not_charging""#, WAIT),
        "{}\ndaemon log:\n{}",
        sub.output(),
        dev.log()
    );
    v.send("charging").unwrap();
    assert!(
        sub.wait_for(r#""result":"committed""#, WAIT),
        "{}\ndaemon log:\n{}",
        sub.output(),
        dev.log()
    );
}
