//! Reboot mode must never boot an image that is not known good (issue 11, engine side).
//!
//! The real agent binary against the real `fw_setenv`/`grub-editenv` and the example boot script;
//! the boot simulator plays RAUC's boot logic at every power-on. A "power cut" is a SIGKILL of the
//! agent (a failpoint, or a hook that kills it) followed by `power_on()`.

mod common;
use common::*;
use flightnode_tests::boot_sim::{SimBoot, SimKind};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

/// A reboot-mode device on `sim`. `reboot` is the reboot command: `kill -9` plays a reboot that
/// ends the agent; `true` plays one that never happens (the agent exits 3).
fn device(sim: &SimBoot, health: &str, reboot: &str) -> Device {
    Device::new(Options {
        health: Some(health.into()),
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"{reboot}\"\nreboot_wait = \"{}\"\n{}",
            if reboot == "true" { "100ms" } else { "30s" },
            sim.boot_toml()
        ),
        ..Options::default()
    })
}

const KILL: &str = "kill -9 $FLIGHTNODE_AGENT_PID";

fn vars(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(o.status.success(), "{cmd} {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether the bootloader could still pick `slot` (`'A'`/`'B'`) at some power-on without the
/// agent's help: in the order with attempts left (U-Boot), in the order and OK (GRUB), good
/// (script).
fn bootloader_may_boot(sim: &SimBoot, slot: char) -> bool {
    match sim.kind {
        SimKind::Uboot | SimKind::UbootQemu => {
            let v = vars(&tool("fw_printenv", &["-c", sim.env.to_str().unwrap()]));
            let order = v.get("BOOT_ORDER").cloned().unwrap_or_else(|| "A B".into());
            let left = v.get(&format!("BOOT_{slot}_LEFT")).map_or(3, |l| {
                u32::from_str_radix(l.trim().trim_start_matches("0x"), 16).unwrap()
            });
            order.split_whitespace().any(|s| s == slot.to_string()) && left > 0
        }
        SimKind::Grub => {
            let v = vars(&tool("grub-editenv", &[sim.env.to_str().unwrap(), "list"]));
            let order = v.get("ORDER").cloned().unwrap_or_else(|| "A B".into());
            order.split_whitespace().any(|s| s == slot.to_string())
                && v.get(&format!("{slot}_OK")).map(String::as_str) == Some("1")
        }
        SimKind::Script => {
            let state = tool(sim.env.to_str().unwrap(), &["get-state", &slot.to_string()]);
            state.trim() == "good"
        }
    }
}

/// Runs `args` and expects the reboot command to end the agent.
fn until_reboot(dev: &Device, args: &[&str], what: &str) {
    let o = dev.run(args);
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{what}: the reboot command ends the agent: {}",
        text(&o)
    );
}

fn killed_at(dev: &Device, args: &[&str], failpoint: &str) {
    let o = dev
        .cmd(args)
        .env("FLIGHTNODE_FAILPOINT", failpoint)
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(9), "failpoint {failpoint}: {}", text(&o));
}

/// Issue scenario 1 (items a, b): power cuts while slot B is written, each next boot cut again
/// while `resume` continues the download. Every power-on must start A; the upgrade then commits.
#[test]
fn power_cuts_during_a_long_download_always_boot_the_running_slot() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}: first boot");
        let bundle = dev.bundle("v2", "2.0.0", 600_000, &[]);
        killed_at(&dev, &["install", bundle.to_str().unwrap()], "download@70000");
        assert!(
            !bootloader_may_boot(&sim, 'B'),
            "{kind}: the half-written slot must not be bootable in the bootloader"
        );
        for (i, cut) in [150_000, 250_000, 350_000, 450_000].iter().enumerate() {
            assert_eq!(
                sim.power_on().unwrap(),
                'A',
                "{kind}: boot {} after the cut",
                i + 1
            );
            killed_at(&dev, &["resume"], &format!("download@{cut}"));
            assert!(!bootloader_may_boot(&sim, 'B'), "{kind}: boot {}", i + 1);
        }
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        until_reboot(&dev, &["resume"], &kind);
        assert_eq!(
            sim.power_on().unwrap(),
            'B',
            "{kind}: the trial boots the new slot"
        );
        let o = dev.run(&["resume"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "committed", "{kind}: {s:#}");
        assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", 600_000), "{kind}");
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
    }
}

/// Item a: a download that fails after the first byte leaves the target non-bootable in the
/// bootloader, not only in the agent's own state.
#[test]
fn a_failed_download_leaves_the_target_unbootable_in_the_bootloader() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        if sim.kind == SimKind::Grub {
            // A factory grubenv says B_OK=0 over the empty B; a B that an earlier upgrade
            // committed (or a factory flashed) says 1, and that is what the install must undo.
            tool("grub-editenv", &[sim.env.to_str().unwrap(), "set", "B_OK=1"]);
        }
        assert!(bootloader_may_boot(&sim, 'B'), "{kind}: the env lists B");
        let good = dev.bundle("v2", "2.0.0", 50_000, &[]);
        let mut bytes = std::fs::read(&good).unwrap();
        let n = bytes.len();
        bytes[n - 20_000] ^= 1;
        let bad = dev.path("bad.fnb");
        std::fs::write(&bad, bytes).unwrap();
        let o = dev.run(&["install", bad.to_str().unwrap()]);
        assert!(text(&o).contains("hash_mismatch"), "{kind}: {}", text(&o));
        assert!(
            !bootloader_may_boot(&sim, 'B'),
            "{kind}: a hash-mismatched slot must not stay a fallback"
        );
        assert!(bootloader_may_boot(&sim, 'A'), "{kind}");
        for _ in 0..3 {
            assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
            assert!(dev.run(&["resume"]).status.success(), "{kind}");
        }
    }
}

/// Issue scenario 2 (item d), and the status of a pending trial (item n): a trial staged whose
/// reboot never happened, then `mark-bad other`: the next power-on boots the old slot.
#[test]
fn mark_bad_of_a_pending_trial_cancels_it_in_the_bootloader() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", "true");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let bundle = dev.bundle("v2", "2.0.0", 20_000, &[]);
        let o = dev.run(&["install", bundle.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(3), "{kind}: reboot pending: {}", text(&o));

        let s = dev.status();
        assert_eq!(s["phase"], "testing", "{kind}: {s:#}");
        assert_eq!(
            s["active_slot"], "a",
            "{kind}: the running slot is the active one: {s:#}"
        );
        assert_eq!(s["booted_slot"], "a", "{kind}");
        assert_eq!(
            s["slots"]["b"]["state"], "trial",
            "{kind}: the trial is pending: {s:#}"
        );
        let human = text(&dev.run(&["status"]));
        assert!(human.contains("pending"), "{kind}: {human}");

        let o = dev.run(&["mark-bad", "other"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["phase"], "idle", "{kind}: {s:#}");
        assert_ne!(s["last_upgrade"]["result"], "committed", "{kind}");
        assert_eq!(s["active_slot"], "a", "{kind}");
        assert_eq!(s["slots"]["b"]["state"], "bad", "{kind}");
        assert!(!bootloader_may_boot(&sim, 'B'), "{kind}: the trial is canceled");
        for _ in 0..3 {
            assert_eq!(
                sim.power_on().unwrap(),
                'A',
                "{kind}: the rejected image never boots"
            );
            assert!(dev.run(&["resume"]).status.success(), "{kind}");
        }
        assert_eq!(dev.status()["committed_version"], "1.0.0", "{kind}");
    }
}

/// Item e: with a trial pending (reboot not happened), `mark-bad` of the running slot would leave
/// no good slot and `mark-good other` would commit an image that never booted: both refused,
/// nothing changes, and the trial then goes its normal way.
#[test]
fn mark_commands_guard_the_slot_that_runs() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", "true");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let bundle = dev.bundle("v2", "2.0.0", 20_000, &["--security-version", "3"]);
        let o = dev.run(&["install", bundle.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(3), "{kind}: {}", text(&o));
        let before = dev.status();

        let o = dev.run(&["mark-bad", "a"]);
        assert!(
            !o.status.success(),
            "{kind}: mark-bad of the running slot: {}",
            text(&o)
        );
        let o = dev.run(&["mark-bad", "booted"]);
        assert!(!o.status.success(), "{kind}: {}", text(&o));
        assert!(bootloader_may_boot(&sim, 'A'), "{kind}: A stays bootable");

        let o = dev.run(&["mark-good", "other"]);
        assert!(
            !o.status.success(),
            "{kind}: mark-good of a never-booted trial: {}",
            text(&o)
        );
        let o = dev.run(&["mark-good", "b"]);
        assert!(!o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s, before, "{kind}: refused commands change nothing");
        assert_eq!(s["security_floor"], 0, "{kind}");
        assert_eq!(s["committed_version"], "1.0.0", "{kind}");

        // Now the trial boot happens, and mark-good from inside it commits.
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        let o = dev.run(&["mark-good", "booted"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["last_upgrade"]["result"], "committed", "{kind}: {s:#}");
        assert_eq!(s["security_floor"], 3, "{kind}");
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
    }
}

/// Item c: a device running B whose state dir was lost adopts B as active and good, and the next
/// install writes A, never the running root.
#[test]
fn lost_state_adopts_the_booted_slot_and_never_writes_it() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let v2 = dev.bundle("v2", "2.0.0", 30_000, &[]);
        until_reboot(&dev, &["install", v2.to_str().unwrap()], &kind);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        assert_eq!(dev.status()["last_upgrade"]["result"], "committed", "{kind}");

        std::fs::remove_dir_all(dev.path("state")).unwrap();
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        let s = dev.status();
        assert_eq!(
            s["active_slot"], "b",
            "{kind}: fresh state adopts the booted slot: {s:#}"
        );
        assert_eq!(s["slots"]["b"]["state"], "good", "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");

        let v3 = dev.bundle("v3", "3.0.0", 30_000, &[]);
        until_reboot(&dev, &["install", v3.to_str().unwrap()], &kind);
        assert_eq!(
            dev.slot_bytes("b"),
            image_bytes("2.0.0", 30_000),
            "{kind}: running root untouched"
        );
        assert_eq!(dev.slot_bytes("a"), image_bytes("3.0.0", 30_000), "{kind}");
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        assert_eq!(dev.status()["last_upgrade"]["result"], "committed", "{kind}");
    }
}

/// Item c: when the persisted state names the booted slot as the target (the bootloader started
/// a slot the state does not know as good), the install is refused before a byte is written.
#[test]
fn the_booted_slot_is_never_the_target() {
    let root = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let dev = device(&sim, "true", KILL);
    assert!(dev.run(&["resume"]).status.success());
    // The board came up on B behind the agent's back (B holds no image the agent knows).
    std::fs::write(&sim.cmdline, "root=/dev/sim rauc.slot=B\n").unwrap();
    let v2 = dev.bundle("v2", "2.0.0", 30_000, &[]);
    let o = dev.run(&["install", v2.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("running"), "names the reason: {}", text(&o));
    assert!(
        dev.slot_bytes("b").is_empty(),
        "the booted slot must not be written"
    );
}

/// Item n: a power cut during the health check of a trial that booted fine is not a failed
/// trial boot: the agent re-arms the trial and runs the check again, then commits.
#[test]
fn power_cut_during_the_health_check_retries_the_trial() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let marker = root.path().join(format!("{kind}.cut"));
        let health = format!(
            "if [ \"$FLIGHTNODE_SLOT\" = b ] && [ ! -e {m} ]; then touch {m}; kill -9 $FLIGHTNODE_AGENT_PID; exec sleep 5 >/dev/null 2>&1; fi; true",
            m = marker.display()
        );
        let dev = device(&sim, &health, KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let v2 = dev.bundle("v2", "2.0.0", 30_000, &[]);
        until_reboot(&dev, &["install", v2.to_str().unwrap()], &kind);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}: trial boot");
        let o = dev.run(&["resume"]);
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{kind}: power cut in the health check: {}",
            text(&o)
        );
        assert!(marker.exists(), "{kind}");
        // The one trial attempt is used up: the bootloader returns to A.
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let o = dev.run(&["resume"]);
        let s = dev.status();
        assert_ne!(
            s["last_upgrade"]["error"]["code"],
            "trial_boot_failed",
            "{kind}: it booted fine: {}\n{s:#}",
            text(&o)
        );
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{kind}: the trial is re-armed: {}",
            text(&o)
        );
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}: second trial boot");
        let o = dev.run(&["resume"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        assert_eq!(dev.status()["last_upgrade"]["result"], "committed", "{kind}");
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
    }
}

/// Item k: a committed slot that later stops booting. After the bootloader falls back, the
/// committed version and the security floor describe the slot that runs.
#[test]
fn after_a_fallback_the_committed_version_is_the_running_one() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let v2 = dev.bundle("v2", "2.0.0", 30_000, &["--security-version", "3"]);
        until_reboot(&dev, &["install", v2.to_str().unwrap()], &kind);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        assert_eq!(dev.status()["security_floor"], 3, "{kind}");

        // B hangs at every boot from now on: the bootloader gives up on it and boots A.
        let mut boots = 0;
        while sim.power_on().unwrap() == 'B' {
            boots += 1;
            assert!(boots < 10, "{kind}: never fell back");
        }
        let o = dev.run(&["resume"]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let s = dev.status();
        assert_eq!(s["active_slot"], "a", "{kind}: {s:#}");
        assert_eq!(s["booted_slot"], "a", "{kind}");
        assert_eq!(s["committed_version"], "1.0.0", "{kind}: {s:#}");
        assert_eq!(s["security_floor"], 0, "{kind}: {s:#}");
        // 2.0.0 is not running: installing it again is a real install, not already_installed.
        let o = dev.run(&["install", v2.to_str().unwrap()]);
        assert!(!text(&o).contains("already installed"), "{kind}: {}", text(&o));
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{kind}: reinstalls and reboots: {}",
            text(&o)
        );
    }
}

/// Item e (allowed case) and k: `mark-bad` of the running slot while the other one is a good
/// fallback. Until the reboot nothing is installed over that fallback; after it the old slot is
/// active and committed again, and the next install goes to the slot marked bad.
#[test]
fn mark_bad_of_the_running_slot_with_a_good_fallback() {
    let root = tempfile::tempdir().unwrap();
    for sim in sims(root.path()) {
        let kind = format!("{:?}", sim.kind);
        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        let dev = device(&sim, "true", KILL);
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let v2 = dev.bundle("v2", "2.0.0", 30_000, &["--security-version", "2"]);
        until_reboot(&dev, &["install", v2.to_str().unwrap()], &kind);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");

        let o = dev.run(&["mark-bad", "booted"]);
        assert!(o.status.success(), "{kind}: A is a good fallback: {}", text(&o));
        assert!(!bootloader_may_boot(&sim, 'B'), "{kind}");
        let v3 = dev.bundle("v3", "3.0.0", 30_000, &["--security-version", "2"]);
        let o = dev.run(&["install", v3.to_str().unwrap()]);
        assert!(!o.status.success(), "{kind}: {}", text(&o));
        assert!(
            o.status.signal().is_none(),
            "{kind}: refused, no reboot: {}",
            text(&o)
        );
        assert_eq!(
            dev.slot_bytes("a"),
            b"factory image",
            "{kind}: the fallback is untouched"
        );

        assert_eq!(sim.power_on().unwrap(), 'A', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        let s = dev.status();
        assert_eq!(s["active_slot"], "a", "{kind}: {s:#}");
        assert_eq!(s["committed_version"], "1.0.0", "{kind}: {s:#}");
        assert_eq!(s["security_floor"], 0, "{kind}");
        until_reboot(&dev, &["install", v3.to_str().unwrap()], &kind);
        assert_eq!(sim.power_on().unwrap(), 'B', "{kind}");
        assert!(dev.run(&["resume"]).status.success(), "{kind}");
        assert_eq!(dev.status()["committed_version"], "3.0.0", "{kind}");
    }
}
