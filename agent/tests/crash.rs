//! SIGKILL at every journal step, then restart: the device is consistent and bootable, and
//! re-running finishes the upgrade.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;

fn killed_at(dev: &Device, bundle: &std::path::Path, failpoint: &str) {
    let o = dev
        .cmd(&["install", bundle.to_str().unwrap()])
        .env("FLIGHTNODE_FAILPOINT", failpoint)
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "failpoint {failpoint} must SIGKILL the agent: {}",
        text(&o)
    );
}

/// After a crash the state must be readable and name a slot holding a complete, verified image.
fn assert_consistent(dev: &Device, failpoint: &str) {
    let s = dev.status();
    let active = s["active_slot"].as_str().unwrap().to_owned();
    let state = s["slots"][&active]["state"].as_str().unwrap().to_owned();
    assert!(
        state == "good" || state == "trial",
        "{failpoint}: active slot {active} is {state}: {s:#}"
    );
    let pointer = dev.pointer();
    let pointed = if pointer == dev.path("slots/a.img") {
        "a"
    } else {
        "b"
    };
    let pstate = s["slots"][pointed]["state"].as_str().unwrap();
    assert!(
        pstate == "good" || pstate == "trial",
        "{failpoint}: pointer names {pointed} in state {pstate}: {s:#}"
    );
    if pstate == "trial" {
        assert_eq!(
            dev.slot_bytes(pointed),
            image_bytes("2.0.0", 200_000),
            "{failpoint}: trial slot must be complete"
        );
    }
}

#[test]
fn sigkill_at_every_journal_step_then_rerun_commits() {
    for failpoint in [
        "verified",
        "download@70000",
        "download@150000",
        "staged",
        "switching",
        "switched",
        "healthy",
    ] {
        let dev = Device::new(Options::default());
        let bundle = dev.bundle("v2", "2.0.0", 200_000, &[]);
        killed_at(&dev, &bundle, failpoint);
        assert_consistent(&dev, failpoint);
        let o = dev.run(&["install", bundle.to_str().unwrap()]);
        assert!(o.status.success(), "{failpoint}: re-run: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "committed", "{failpoint}: {s:#}");
        assert_eq!(s["active_slot"], "b", "{failpoint}");
        assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", 200_000), "{failpoint}");
        dev.assert_bootable();
        // A second start in the same state does nothing new.
        let before = dev.status();
        let o = dev.run(&["resume"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            dev.status(),
            before,
            "{failpoint}: resume after the end must change nothing"
        );
    }
}

#[test]
fn sigkill_during_rollback_then_resume_finishes_the_rollback() {
    for failpoint in ["rolling_back", "switched"] {
        let dev = Device::new(Options {
            health: Some("exit 1".into()),
            ..Options::default()
        });
        let bundle = dev.bundle("v2", "2.0.0", 200_000, &[]);
        killed_at(&dev, &bundle, failpoint);
        assert_consistent(&dev, failpoint);
        let o = dev.run(&["resume"]);
        assert!(!o.status.success(), "{}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "rolled_back", "{failpoint}: {s:#}");
        assert_eq!(s["active_slot"], "a");
        dev.assert_bootable();
    }
}
