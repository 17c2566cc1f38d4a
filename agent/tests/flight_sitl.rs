//! The flight gate against a real autopilot: ArduPilot Copter SITL (`flightnode_tests::sitl`),
//! flown by a pymavlink pilot on its second port while the agent watches the first. Skipped, with
//! a message, where SITL is not available.

mod common;
use common::flight::{Gated, WAIT};
use flightnode_tests::sitl::Sitl;

#[test]
fn on_the_ground_it_upgrades_in_the_air_it_waits_after_landing_it_upgrades() {
    // Speedup 10: arming needs the EKF on GPS, about 40 s of sim time.
    let Some(sitl) = Sitl::start(10).unwrap() else {
        return;
    };
    let g = Gated::new(&format!("mavlink = \"{}\"\n", sitl.agent_address()));
    // SITL sends nothing but HEARTBEAT until asked: a landed state and a battery level mean the
    // agent asked for them.
    g.wait_log_line(&["landed state changed", "on_ground"]);
    g.wait_log_line(&["battery level known", "Some(100)"]);
    g.install("2.0.0").committed(&g, WAIT);

    let mut pilot = sitl.pilot().unwrap();
    pilot
        .take_off(5)
        .unwrap_or_else(|e| panic!("{e:#}\nSITL:\n{}", sitl.log()));
    g.wait_log_line(&["landed state changed", "in_air"]);
    let install = g.install("3.0.0");
    g.assert_held("in_air");

    pilot
        .land()
        .unwrap_or_else(|e| panic!("{e:#}\nSITL:\n{}", sitl.log()));
    install.committed(&g, WAIT);
    g.dev.assert_bootable();
}
