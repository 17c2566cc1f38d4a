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
    let pointed_slot = if pointer == dev.path("slots/a.img") {
        "a"
    } else {
        "b"
    };
    let pstate = s["slots"][pointed_slot]["state"].as_str().unwrap();
    assert!(
        pstate == "good" || pstate == "trial",
        "{failpoint}: pointer names {pointed_slot} in state {pstate}: {s:#}"
    );
    if pstate == "trial" {
        assert_eq!(
            dev.slot_bytes(pointed_slot),
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

/// Item j: a crash after the rollback switched `current` back but before it was recorded. Neither
/// `status` nor the next start may point `current` at the failed slot again.
#[test]
fn crash_while_reapplying_the_old_slot_never_repoints_at_the_failed_one() {
    let dev = Device::new(Options {
        health: Some("exit 1".into()),
        extra: String::new(),
        ..Options::default()
    });
    let marker = dev.path("cut");
    let apply = dev.path("apply-cut.sh");
    std::fs::write(
        &apply,
        format!(
            "#!/bin/sh\nif [ \"$FLIGHTNODE_SLOT\" = a ] && [ ! -e {m} ]; then touch {m}; kill -9 $FLIGHTNODE_AGENT_PID; exec sleep 5 >/dev/null 2>&1; fi\n",
            m = marker.display()
        ),
    )
    .unwrap();
    make_executable(&apply);
    let cfg = std::fs::read_to_string(&dev.config).unwrap();
    let cfg = cfg.replace(
        &format!("apply_command = \"{}\"", dev.path("apply.sh").display()),
        &format!("apply_command = \"{}\"", apply.display()),
    );
    std::fs::write(&dev.config, cfg).unwrap();
    let bundle = dev.bundle("v2", "2.0.0", 20_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert_eq!(
        o.status.signal(),
        Some(9),
        "killed while re-applying a: {}",
        text(&o)
    );
    assert_eq!(
        dev.pointer(),
        dev.path("slots/a.img"),
        "the rollback switched back"
    );

    let s = dev.status();
    assert_eq!(s["phase"], "rolling_back", "{s:#}");
    assert_eq!(
        dev.pointer(),
        dev.path("slots/a.img"),
        "status must not re-point current at the failed slot"
    );
    assert_eq!(dev.status(), s, "status must not change the state");

    let o = dev.run(&["resume"]);
    assert!(!o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "rolled_back", "{s:#}");
    assert_eq!(s["active_slot"], "a");
    assert_eq!(dev.pointer(), dev.path("slots/a.img"));
    dev.assert_bootable();
}

/// Item j: `status` on a fresh device reports the factory state without creating anything.
#[test]
fn status_on_a_fresh_device_writes_nothing() {
    let dev = Device::new(Options::default());
    let s = dev.status();
    assert_eq!(s["active_slot"], "a");
    assert_eq!(s["slots"]["a"]["state"], "good");
    assert!(!dev.path("state/db").exists(), "status created the state store");
    assert!(!dev.path("state/current").exists(), "status created the pointer");
}

/// Directories the agent fsynced while running `args` (strace, paths resolved with `-y`).
fn fsynced_dirs(dev: &Device, args: &[&str]) -> (std::process::Output, String) {
    let trace = dev.path("fsync.trace");
    let o = std::process::Command::new("strace")
        .args(["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(BIN)
        .arg("--config")
        .arg(&dev.config)
        .args(args)
        .output()
        .expect("strace (test.sh installs it)");
    (o, std::fs::read_to_string(&trace).unwrap_or_default())
}

/// Item m: a crash after `current` was renamed but before its directory was fsynced. The re-run
/// finds the link already naming the slot and must still make it durable.
#[test]
fn pointer_already_switched_is_still_made_durable() {
    let dev = Device::new(Options::default());
    let bundle = dev.bundle("v2", "2.0.0", 20_000, &[]);
    // The first start creates `current` (naming a); the failpoint then hits the switch to b.
    assert!(dev.run(&["resume"]).status.success());
    killed_at(&dev, &bundle, "pointer_renamed");
    assert_eq!(dev.pointer(), dev.path("slots/b.img"));
    let (o, trace) = fsynced_dirs(&dev, &["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let state_dir = format!("<{}>", dev.path("state").display());
    assert!(
        trace
            .lines()
            .any(|l| l.contains("fsync(") && l.contains(&state_dir)),
        "the state directory holding `current` was never fsynced:\n{trace}"
    );
    assert_eq!(dev.status()["last_upgrade"]["result"], "committed");
}

/// Item m: a newly created file slot is followed by an fsync of its directory.
#[test]
fn a_new_file_slot_is_made_durable_in_its_directory() {
    let dev = Device::new(Options::default());
    let bundle = dev.bundle("v2", "2.0.0", 200_000, &[]);
    assert!(!dev.path("slots/b.img").exists());
    let slots_dir = format!("<{}>", dev.path("slots").display());
    let (o, trace) = fsynced_dirs(&dev, &["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let first_dir_sync = trace
        .lines()
        .position(|l| l.contains("fsync(") && l.contains(&slots_dir));
    let first_slot_sync = trace.lines().position(|l| l.contains("b.img>"));
    assert!(
        matches!((first_dir_sync, first_slot_sync), (Some(d), Some(f)) if d < f),
        "the slot directory must be fsynced when the file is created, before the first checkpoint:\n{trace}"
    );
}
