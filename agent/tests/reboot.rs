//! Reboot mode against the real `fw_setenv`/`grub-editenv` and the example boot script, with the
//! boot simulator doing what the bootloader does at power-on, and against real U-Boot under
//! qemu. The reboot command SIGKILLs the agent, as a real reboot would end it.

mod common;
use common::*;
use flightnode_tests::boot_sim::SimBoot;
use std::os::unix::process::ExitStatusExt;

fn reboot_device(sim: &SimBoot, health: &str) -> Device {
    Device::new(Options {
        health: Some(health.into()),
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            sim.boot_toml()
        ),
        ..Options::default()
    })
}

/// `install` ends in a reboot: the agent is killed by its reboot command.
fn install_until_reboot(dev: &Device, bundle: &std::path::Path) {
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert_eq!(
        o.status.signal(),
        Some(9),
        "the reboot command ends the agent: {}",
        text(&o)
    );
    assert_eq!(dev.status()["phase"], "testing");
}

#[test]
fn good_image_commits_after_the_trial_boot() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = reboot_device(&sim, "true");
        assert!(dev.run(&["resume"]).status.success(), "{kind}: first boot");
        let bundle = dev.bundle("v2", "2.0.0", 100_000, &[]);
        install_until_reboot(&dev, &bundle);

        assert_eq!(
            sim.power_on().unwrap(),
            'B',
            "{kind}: the trial boots the new slot"
        );
        let o = dev.run(&["resume"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "committed", "{kind}: {s:#}");
        assert_eq!(s["booted_slot"], "b", "{kind}");
        assert_eq!(s["active_slot"], "b", "{kind}");
        assert_eq!(s["slots"]["b"]["state"], "good", "{kind}");
        assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", 100_000), "{kind}");

        // Committed: it keeps booting, as long as each boot is confirmed (the daemon does this).
        for _ in 0..3 {
            assert_eq!(
                sim.power_on().unwrap(),
                'B',
                "{kind}: committed slot keeps booting"
            );
            assert!(dev.run(&["resume"]).status.success());
        }
    }
}

#[test]
fn unhealthy_image_comes_back_on_the_old_slot() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A');
        let dev = reboot_device(&sim, "test \"$FLIGHTNODE_VERSION\" != 2.0.0");
        let bundle = dev.bundle("v2", "2.0.0", 10_000, &[]);
        install_until_reboot(&dev, &bundle);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        // Health fails: the slot is marked bad and the agent reboots back (killed again).
        let o = dev.run(&["resume"]);
        assert_eq!(o.status.signal(), Some(9), "{kind}: reboots back: {}", text(&o));
        assert_eq!(
            sim.power_on().unwrap(),
            'A',
            "{kind}: the bootloader returns to the old slot"
        );
        let o = dev.run(&["resume"]);
        assert!(!o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "rolled_back", "{kind}: {s:#}");
        assert_eq!(
            s["last_upgrade"]["error"]["code"], "health_check_failed",
            "{kind}"
        );
        assert_eq!(s["active_slot"], "a", "{kind}");
        assert_eq!(s["slots"]["a"]["state"], "good", "{kind}");
        assert_eq!(s["slots"]["b"]["state"], "bad", "{kind}");
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}: stays on the old slot");
    }
}

#[test]
fn trial_that_never_comes_up_is_reported_after_the_fallback() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A');
        let dev = reboot_device(&sim, "true");
        let bundle = dev.bundle("v2", "2.0.0", 10_000, &[]);
        install_until_reboot(&dev, &bundle);
        // The new image hangs before the agent starts; the watchdog resets the board.
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        assert_eq!(
            sim.power_on().unwrap(),
            'A',
            "{kind}: the attempt counter brings the old slot back"
        );
        let o = dev.run(&["resume"]);
        assert!(!o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(
            s["last_upgrade"]["error"]["code"], "trial_boot_failed",
            "{kind}: {s:#}"
        );
        assert_eq!(s["last_upgrade"]["result"], "rolled_back", "{kind}");
        assert_eq!(s["active_slot"], "a");
        assert_eq!(s["booted_slot"], "a");
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        // A second start in the same state changes nothing.
        let before = dev.status();
        assert!(dev.run(&["resume"]).status.success());
        assert_eq!(dev.status(), before);
    }
}

/// GRUB: a power cut in the middle of a grubenv write. The agent writes a complete new file and
/// renames it into place, so at every step the grubenv GRUB would read is the old or the new
/// one, never a torn mix, and the next power-on boots the good slot. Cut points: after the new
/// file is fsynced (not yet renamed) and after the rename (directory not yet fsynced).
#[test]
fn grubenv_cut_mid_write_is_old_or_new_and_boots_the_good_slot() {
    for failpoint in ["grubenv-synced", "grubenv-renamed"] {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimBoot::grub(dir.path()).unwrap();
        assert_eq!(sim.power_on().unwrap(), 'A');
        let dev = reboot_device(&sim, "true");
        assert!(dev.run(&["resume"]).status.success(), "{failpoint}: first boot");
        let before = std::fs::read(&sim.env).unwrap();
        let o = dev
            .cmd(&["mark-bad", "b"])
            .env("FLIGHTNODE_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert_eq!(o.status.signal(), Some(9), "{failpoint}: {}", text(&o));
        let now = std::fs::read(&sim.env).unwrap();
        assert_eq!(now.len(), 1024, "{failpoint}: a whole environment block");
        let list = std::process::Command::new("grub-editenv")
            .arg(&sim.env)
            .arg("list")
            .output()
            .unwrap();
        let vars = String::from_utf8_lossy(&list.stdout).into_owned();
        assert!(list.status.success(), "{failpoint}: grubenv readable");
        if failpoint == "grubenv-synced" {
            assert_eq!(
                now, before,
                "{failpoint}: not renamed yet, the old file is in place"
            );
        } else {
            // A factory grubenv already says B_OK=0: B leaving ORDER is what shows the new file.
            assert!(
                vars.contains("B_OK=0") && vars.lines().any(|l| l == "ORDER=A"),
                "{failpoint}: the new file is in place: {vars}"
            );
        }
        assert_eq!(sim.power_on().unwrap(), 'A', "{failpoint}: {vars}");
        // The next run finishes the job and leaves no temporary file behind.
        let o = dev.run(&["mark-bad", "b"]);
        assert!(o.status.success(), "{failpoint}: {}", text(&o));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("grubenv"))
            .collect();
        assert_eq!(names, ["grubenv"], "{failpoint}");
        assert_eq!(sim.power_on().unwrap(), 'A', "{failpoint}");
    }
}

/// Issue 21 item h: with one copy of the U-Boot environment (one line in `fw_env.config`) a power
/// cut during `fw_setenv` can make U-Boot boot A on its default environment, which the agent would
/// take for a fallback. The agent refuses to start in reboot mode on such a config, says what to
/// do, and writes nothing; the operator's explicit opt-in or a second copy lets it start.
#[test]
fn single_copy_u_boot_environment_is_refused_at_start_unless_allowed() {
    let root = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let redundant = std::fs::read_to_string(&sim.env).unwrap();
    let first_line = redundant.lines().next().unwrap();
    std::fs::write(&sim.env, format!("# the board's only copy\n{first_line}\n")).unwrap();
    let env_files: Vec<_> = ["uboot.env", "uboot-redund.env"]
        .iter()
        .map(|f| std::fs::read(root.path().join(f)).unwrap())
        .collect();

    let dev = reboot_device(&sim, "true");
    for args in [&["resume"][..], &["run"]] {
        let o = dev.run(args);
        let said = text(&o);
        assert!(!o.status.success(), "{args:?} must refuse to start: {said}");
        for needle in [
            "single copy",
            "allow_single_copy_env",
            &*sim.env.to_string_lossy(),
        ] {
            assert!(said.contains(needle), "{args:?}: no {needle:?} in: {said}");
        }
    }
    let after: Vec<_> = ["uboot.env", "uboot-redund.env"]
        .iter()
        .map(|f| std::fs::read(root.path().join(f)).unwrap())
        .collect();
    assert!(after == env_files, "nothing may be written to the environment");

    // The operator accepts the risk explicitly.
    let config = std::fs::read_to_string(&dev.config).unwrap();
    std::fs::write(
        &dev.config,
        config.replace("[boot]\n", "[boot]\nallow_single_copy_env = true\n"),
    )
    .unwrap();
    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "opted in: {}", text(&o));

    // A redundant environment needs no opt-in.
    std::fs::write(&dev.config, &config).unwrap();
    std::fs::write(&sim.env, &redundant).unwrap();
    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "two copies: {}", text(&o));
    assert_eq!(dev.status()["booted_slot"], "a");
}
