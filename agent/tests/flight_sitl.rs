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
    // Armed and flying means the autopilot has GPS, and with it the time: its SYSTEM_TIME is the
    // agent's trusted clock (what hub-signed commands expire by).
    let deadline = std::time::Instant::now() + WAIT;
    while g.dev.status()["clock"]["source"] != "gps" {
        assert!(
            std::time::Instant::now() < deadline,
            "the trusted clock never took SITL's GPS time: {:#}",
            g.dev.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let install = g.install("3.0.0");
    g.assert_held("in_air");

    pilot
        .land()
        .unwrap_or_else(|e| panic!("{e:#}\nSITL:\n{}", sitl.log()));
    install.committed(&g, WAIT);
    g.dev.assert_bootable();
}

/// The arming interlock against the real autopilot, through the Lua script the package ships
/// (`SCR_ENABLE 1`): while the new image is on trial the autopilot refuses to arm and says why;
/// with the agent killed mid-trial it still refuses (fails closed); after the commit it arms,
/// flies, and the flight counts for the new image.
#[test]
fn the_autopilot_refuses_to_arm_during_an_install_and_flies_after_the_commit() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ardupilot/flightnode_arming.lua");
    let Some(sitl) = Sitl::start_with(10, "SCR_ENABLE 1", &[script]).unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut g = Gated::with(
        &format!("mavlink = \"{}\"\n", sitl.agent_address()),
        common::Options {
            // The trial lasts until the test says so.
            health: Some(format!("while [ ! -e {} ]; do sleep 0.1; done", go.display())),
            health_timeout: Some("10m".into()),
            ..common::Options::default()
        },
    );
    g.wait_log_line(&["landed state changed", "on_ground"]);
    let mut pilot = sitl.pilot().unwrap();
    let _install = g.install("2.0.0");
    let locked = |g: &Gated, reason: &str| {
        let on_trial = || g.dev.status()["arm_lock"]["reason"] == reason;
        assert!(
            flightnode_tests::fleet::wait_until(WAIT, std::time::Duration::from_millis(100), on_trial),
            "no {reason} lock: {:#}\n{}",
            g.dev.status(),
            g.dev.log()
        );
    };
    locked(&g, "trial");
    assert_eq!(
        g.dev.status()["arm_lock"]["message"],
        "2.0.0 in slot b is on trial, not yet confirmed"
    );
    pilot
        .arm_refused("Arm: flightnode: firmware on trial")
        .unwrap_or_else(|e| panic!("{e:#}\nagent:\n{}\nSITL:\n{}", g.dev.log(), sitl.log()));

    // The agent dies mid-trial: the autopilot keeps the vehicle on the ground.
    g.daemon.0.kill().unwrap();
    g.daemon.0.wait().unwrap();
    pilot
        .arm_refused("Arm: flightnode: firmware on trial, agent lost")
        .unwrap_or_else(|e| panic!("{e:#}\nSITL:\n{}", sitl.log()));

    // Back up, the trial goes on; the health check passes and the image commits.
    g.daemon = common::Daemon::start_with(&g.dev, &[("RUST_LOG", "info")]);
    locked(&g, "trial");
    std::fs::write(&go, b"").unwrap();
    let committed = || g.dev.status()["committed_version"] == "2.0.0" && g.dev.status()["arm_lock"].is_null();
    assert!(
        flightnode_tests::fleet::wait_until(WAIT, std::time::Duration::from_millis(100), committed),
        "{:#}\n{}",
        g.dev.status(),
        g.dev.log()
    );
    pilot.take_off(5).unwrap_or_else(|e| {
        panic!(
            "arming after the commit: {e:#}\nagent:\n{}\nSITL:\n{}",
            g.dev.log(),
            sitl.log()
        )
    });
    g.wait_log_line(&["landed state changed", "in_air"]);
    pilot
        .land()
        .unwrap_or_else(|e| panic!("{e:#}\nSITL:\n{}", sitl.log()));
    // The flight is counted for the committed image, from the real autopilot's landed state.
    let flown = || g.dev.status()["flights"]["flights"] == 1;
    assert!(
        flightnode_tests::fleet::wait_until(WAIT, std::time::Duration::from_millis(100), flown),
        "{:#}\n{}",
        g.dev.status(),
        g.dev.log()
    );
    assert!(g.dev.status()["flights"]["airborne_secs"].as_u64() > Some(0));
}
