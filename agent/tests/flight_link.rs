//! The MAVLink link against the pymavlink stand-in, making the faults a real autopilot cannot: a
//! second MAVLink system on the same link, MAVLink 1, a vehicle that sends no landed state. The
//! upgrades go through `flightnode-agent install` and the running daemon's flight gate.

mod common;
use common::flight::{Gated, WAIT};
use flightnode_tests::fc_standin::{Vehicle, free_udp_port};

/// `[flight]` listening on `port`, plus `extra`.
fn flight(port: u16, extra: &str) -> String {
    format!("mavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\n{extra}")
}

#[test]
fn a_second_system_saying_disarmed_does_not_open_the_gate() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&flight(port, ""));
    let mut vehicle = Vehicle::start(port, &["--in-air"]).unwrap();
    g.wait_log_line(&["flight state changed", "in-air"]);
    // A ground station or a fleet-mate behind the same router, or a spoofed datagram: an autopilot
    // HEARTBEAT, disarmed and on the ground, ten times a second.
    let _other = Vehicle::start(port, &["--sysid", "2"]).unwrap();
    let install = g.install("2.0.0");
    g.assert_held("in_air");
    assert!(g.dev.log().contains("ignoring system 2"), "{}", g.dev.log());
    vehicle.send("land").unwrap();
    vehicle.send("disarm").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn with_system_id_set_a_system_that_speaks_first_is_not_believed() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&flight(port, "system_id = 1"));
    let _other = Vehicle::start(port, &["--sysid", "2"]).unwrap();
    g.dev.wait_log("ignoring system 2");
    let mut vehicle = Vehicle::start(port, &["--in-air"]).unwrap();
    let install = g.install("2.0.0");
    g.assert_held("in_air");
    vehicle.send("land").unwrap();
    vehicle.send("disarm").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn armed_without_a_landed_state_counts_as_in_the_air() {
    let port = free_udp_port().unwrap();
    // Armed on the ground is allowed, but nothing says this vehicle is on the ground.
    let g = Gated::new(&flight(port, "allowed_states = [\"disarmed\", \"armed\"]"));
    let mut vehicle = Vehicle::start(port, &["--armed", "--no-landed-state"]).unwrap();
    let install = g.install("2.0.0");
    g.assert_held("in_air");
    vehicle.send("disarm").unwrap();
    install.committed(&g, WAIT);
}

#[test]
fn a_mavlink_1_vehicle_is_heard() {
    let port = free_udp_port().unwrap();
    let g = Gated::new(&flight(port, ""));
    let _vehicle = Vehicle::start(port, &["--mavlink1"]).unwrap();
    g.wait_log_line(&["flight state changed", "disarmed"]);
    g.wait_log_line(&["landed state changed", "on_ground"]);
    g.install("2.0.0").committed(&g, WAIT);
}
