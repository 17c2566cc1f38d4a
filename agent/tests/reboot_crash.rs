//! Reboot mode: a power cut (SIGKILL of the agent, then a simulated power-on) at every journal
//! step, with the U-Boot, GRUB and script backends. Every power-on must start a good image (the
//! old slot, or the complete new image on its trial), and re-running `resume` after each boot
//! must converge to `committed` or `rolled_back` with the result that really happened.

mod common;
use common::*;
use flightnode_tests::boot_sim::SimBoot;
use std::os::unix::process::ExitStatusExt;

const IMAGE: usize = 200_000;

fn device(sim: &SimBoot, health: &str) -> Device {
    Device::new(Options {
        health: Some(health.into()),
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            sim.boot_toml()
        ),
        ..Options::default()
    })
}

fn sim(dir: &std::path::Path, kind: &str) -> SimBoot {
    let d = dir.join(kind);
    std::fs::create_dir_all(&d).unwrap();
    match kind {
        "uboot" => SimBoot::uboot(&d).unwrap(),
        "grub" => SimBoot::grub(&d).unwrap(),
        _ => SimBoot::script(&d).unwrap(),
    }
}

/// Powers on and checks the slot that came up holds a good image: the factory image in A, or
/// the complete new image in B (its trial).
fn power_on(dev: &Device, sim: &SimBoot, case: &str) -> char {
    let slot = sim
        .power_on()
        .unwrap_or_else(|e| panic!("{case}: no bootable slot: {e:#}"));
    if slot == 'B' {
        assert_eq!(
            dev.slot_bytes("b"),
            image_bytes("2.0.0", IMAGE),
            "{case}: booted B, which does not hold the complete new image"
        );
    } else {
        assert_eq!(dev.slot_bytes("a"), b"factory image", "{case}");
    }
    slot
}

/// `resume` after each power-on until the agent stops asking for reboots.
fn converge(dev: &Device, sim: &SimBoot, case: &str) {
    for _ in 0..6 {
        let o = dev.run(&["resume"]);
        if let Some(9) = o.status.signal() {
            power_on(dev, sim, case);
        } else {
            assert_eq!(dev.status()["phase"], "idle", "{case}: {}", text(&o));
            return;
        }
    }
    panic!("{case}: still rebooting after 6 boots: {:#}", dev.status());
}

#[test]
fn power_cut_at_every_step_in_reboot_mode() {
    let root = tempfile::tempdir().unwrap();
    // (failpoint, crash in the trial boot, health passes)
    let steps = [
        ("verified", false, true),
        ("download@60000", false, true),
        ("download@150000", false, true),
        ("staged", false, true),
        ("switching", false, true),
        ("switched", false, true),
        ("healthy", true, true),
        ("rolling_back", true, false),
    ];
    for kind in ["uboot", "grub", "script"] {
        for (failpoint, in_trial, healthy) in steps {
            let case = format!("{kind}/{failpoint}");
            let sim = sim(&root.path().join(failpoint.replace('@', "-")), kind);
            assert_eq!(sim.power_on().unwrap(), 'A', "{case}");
            let health = if healthy { "true" } else { "exit 1" };
            let dev = device(&sim, health);
            assert!(dev.run(&["resume"]).status.success(), "{case}: first boot");
            let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
            let install = ["install", bundle.to_str().unwrap()];
            if in_trial {
                let o = dev.run(&install);
                assert_eq!(o.status.signal(), Some(9), "{case}: reboot: {}", text(&o));
                assert_eq!(power_on(&dev, &sim, &case), 'B', "{case}: trial boot");
                let o = dev
                    .cmd(&["resume"])
                    .env("FLIGHTNODE_FAILPOINT", failpoint)
                    .output()
                    .unwrap();
                assert_eq!(o.status.signal(), Some(9), "{case}: failpoint: {}", text(&o));
            } else {
                let o = dev
                    .cmd(&install)
                    .env("FLIGHTNODE_FAILPOINT", failpoint)
                    .output()
                    .unwrap();
                assert_eq!(o.status.signal(), Some(9), "{case}: failpoint: {}", text(&o));
            }
            // The power cut: the next power-on, then the agent runs again after every boot.
            power_on(&dev, &sim, &case);
            converge(&dev, &sim, &case);

            let s = dev.status();
            let expected = if healthy { "committed" } else { "rolled_back" };
            assert_eq!(s["last_upgrade"]["result"], expected, "{case}: {s:#}");
            if !healthy {
                assert_eq!(
                    s["last_upgrade"]["error"]["code"], "health_check_failed",
                    "{case}"
                );
            }
            let active = if healthy { 'B' } else { 'A' };
            assert_eq!(
                s["active_slot"],
                active.to_ascii_lowercase().to_string(),
                "{case}: {s:#}"
            );
            assert_eq!(s["booted_slot"], s["active_slot"], "{case}");
            assert_eq!(
                s["committed_version"],
                if healthy { "2.0.0" } else { "1.0.0" },
                "{case}"
            );
            // It stays there, boot after boot.
            for _ in 0..2 {
                assert_eq!(power_on(&dev, &sim, &case), active, "{case}");
                let o = dev.run(&["resume"]);
                assert!(o.status.success(), "{case}: {}", text(&o));
            }
        }
    }
}
