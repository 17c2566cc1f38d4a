//! The state dir is shared by both slots' images: the agent opens the state of every earlier
//! release, and the state a newer agent left behind when its image failed and the board fell
//! back to this one (fixtures in `fixtures/state/`, the rule in `agent/src/state.rs`).

mod common;
use common::*;
use flightnode_tests::boot_sim::SimBoot;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/state")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Puts `record` in the device's store as the saved device state, as an agent would have.
fn plant(dev: &Device, record: &[u8]) {
    let state = dev.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let db = sled::open(state.join("db")).unwrap();
    db.insert(b"device", record).unwrap();
    db.flush().unwrap();
}

fn command_device() -> Device {
    Device::new(Options::default())
}

#[test]
fn every_earlier_release_state_opens() {
    // (fixture, phase shown, committed version)
    let cases = [
        ("format1-first-release.json", "downloading", "1.1.0"),
        ("format1-flight-gate.json", "waiting", "1.0.0"),
        ("format1-trial-floor.json", "testing", "1.0.0"),
        ("format1-chunked.json", "idle", "1.0.0"),
        ("format1-chunk-context.json", "downloading", "1.0.0"),
        ("format2.json", "waiting", "1.0.0"),
    ];
    for (name, phase, committed) in cases {
        let dev = command_device();
        plant(&dev, &fixture(name));
        let s = dev.status();
        assert_eq!(s["phase"], phase, "{name}: {s:#}");
        assert_eq!(s["committed_version"], committed, "{name}: {s:#}");
    }
}

#[test]
fn a_newer_agents_upgrade_is_dropped_and_the_next_one_installs() {
    let dev = command_device();
    plant(&dev, &fixture("newer-unknown-phase.json"));
    let s = dev.status();
    assert_eq!(s["phase"], "idle", "{s:#}");
    assert_eq!(s["last_upgrade"]["upgrade_id"], "up-newer", "{s:#}");

    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "failed", "{s:#}");
    assert_eq!(s["last_upgrade"]["error"]["code"], "state_too_new", "{s:#}");
    let message = s["last_upgrade"]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("newer agent") && message.contains("attesting"),
        "{message}"
    );
    assert_eq!(s["active_slot"], "a", "{s:#}");
    assert_eq!(s["slots"]["a"]["state"], "good", "{s:#}");
    assert_eq!(s["slots"]["b"]["state"], "bad", "{s:#}");
    dev.assert_bootable();

    let bundle = dev.bundle("v3", "3.0.0", 20_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "committed", "{s:#}");
    assert_eq!(s["committed_version"], "3.0.0", "{s:#}");
    assert_eq!(dev.slot_bytes("b"), image_bytes("3.0.0", 20_000));
}

fn fw_var(sim: &SimBoot, name: &str) -> String {
    let o = std::process::Command::new("fw_printenv")
        .arg("-c")
        .arg(&sim.env)
        .arg("-n")
        .arg(name)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Image 2.0.0's agent runs its trial on B, records its upgrade in a phase 1.0.0 does not know,
/// and never passes its health check; the board falls back to A. 1.0.0's daemon must open that
/// store, confirm A with the bootloader, report the dropped upgrade and take the next one.
#[test]
fn rollback_onto_an_older_agent_confirms_it_and_upgrades_again() {
    let root = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let dev = Device::new(Options {
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            sim.boot_toml()
        ),
        ..Options::default()
    });
    let v2 = dev.bundle("v2", "2.0.0", 10_000, &[]);
    let o = dev.run(&["install", v2.to_str().unwrap()]);
    assert_eq!(o.status.signal(), Some(9), "rebooted: {}", text(&o));
    assert_eq!(sim.power_on().unwrap(), 'B', "the trial boots");
    // The newer agent's record, then its image keeps failing until U-Boot gives up on B.
    plant(&dev, &fixture("newer-unknown-phase.json"));
    let mut booted = 'B';
    for _ in 0..4 {
        booted = sim.power_on().unwrap();
        if booted == 'A' {
            break;
        }
    }
    assert_eq!(booted, 'A', "U-Boot falls back to A");
    let left_before = fw_var(&sim, "BOOT_A_LEFT");

    let mut daemon = Daemon::start(&dev);
    dev.wait_log("start-up recovery done");
    let s = dev.status();
    assert_eq!(s["phase"], "idle", "{s:#}");
    assert_eq!(s["last_upgrade"]["upgrade_id"], "up-newer", "{s:#}");
    assert_eq!(s["last_upgrade"]["error"]["code"], "state_too_new", "{s:#}");
    assert_eq!(
        (&s["active_slot"], &s["booted_slot"]),
        (&"a".into(), &"a".into()),
        "{s:#}"
    );
    assert_eq!(s["slots"]["b"]["state"], "bad", "{s:#}");
    assert!(dev.log().contains("state_too_new"), "{}", dev.log());
    // Confirmed: A's attempts are full again and B is out of the boot order.
    assert_eq!(fw_var(&sim, "BOOT_A_LEFT"), "3", "was {left_before}");
    assert_eq!(fw_var(&sim, "BOOT_ORDER"), "A", "B is out of the order");
    daemon.stop();

    let v3 = dev.bundle("v3", "3.0.0", 10_000, &[]);
    let o = dev.run(&["install", v3.to_str().unwrap()]);
    assert_eq!(o.status.signal(), Some(9), "rebooted: {}", text(&o));
    assert_eq!(sim.power_on().unwrap(), 'B', "the new trial boots");
    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "committed", "{s:#}");
    assert_eq!(s["committed_version"], "3.0.0", "{s:#}");
}
