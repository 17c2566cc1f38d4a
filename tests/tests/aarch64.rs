//! The agent as flashed onto the boards: the static release build (`aarch64-unknown-linux-musl`,
//! the binary the arm64 `.deb` and the release ship) run under qemu-user — `--version`,
//! `bundle verify`, scenario 1 against the x86_64 hub and mosquitto, and an upgrade held by the
//! flight gate while a pymavlink flight controller flies.
//!
//! The build is [`release::build`]'s, shared with the packaging test (one release build per
//! target per CI run). Needs `rustup target add aarch64-unknown-linux-musl` and the Debian
//! packages `gcc-aarch64-linux-gnu qemu-user-static` (`./test.sh` installs them).
//! Set `FLIGHTNODE_SKIP_AARCH64=1` to skip it on a machine without them.

use flightnode_tests::fc_standin::{Vehicle, free_udp_port};
use flightnode_tests::fleet::{Fleet, FleetOptions};
use flightnode_tests::release::{self, AARCH64};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn skip() -> bool {
    std::env::var_os("FLIGHTNODE_SKIP_AARCH64").is_some()
}

/// The release aarch64 agent, and a wrapper that runs it under qemu-user. Static: qemu needs no
/// `-L` sysroot, as a board needs no particular libc.
fn aarch64_agent() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let build = release::build(AARCH64).unwrap_or_else(|e| {
                panic!("{e:#}\n(or FLIGHTNODE_SKIP_AARCH64=1 on a machine without the cross tools)")
            });
            let kind = release::file_type(&build.agent).unwrap();
            assert!(
                kind.contains("aarch64") && kind.contains("statically linked"),
                "not a static aarch64 binary: {kind}"
            );
            let wrapper = release::target_dir().join("flightnode-agent-aarch64-qemu");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec qemu-aarch64-static {} \"$@\"\n",
                    build.agent.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            wrapper
        })
        .clone()
}

#[test]
fn aarch64_agent_runs_under_qemu_and_upgrades_against_the_x86_64_hub() {
    if skip() {
        eprintln!("FLIGHTNODE_SKIP_AARCH64 set: skipped");
        return;
    }
    let agent = aarch64_agent();
    let out = Command::new(&agent).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("flightnode-agent "));

    let fleet = Fleet::start(FleetOptions {
        agent_bin: Some(agent.clone()),
        ..FleetOptions::default()
    })
    .unwrap();
    let (bundle, _) = fleet.bundle("v2", "2.0.0", 256 * 1024).unwrap();
    let out = Command::new(&agent)
        .args(["bundle", "verify", "--key"])
        .arg(fleet.dir.path().join("keys/release.pub"))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"version\": \"2.0.0\""));

    let base = fleet.bundles.url("/");
    fleet
        .hub_upgrade(
            "drone-1",
            &[
                "--bundle",
                bundle.to_str().unwrap(),
                "--base-url",
                base.trim_end_matches('/'),
            ],
        )
        .unwrap();
    let f = fleet
        .wait_flightnode("drone-1", Duration::from_mins(2), |f| {
            f["status"]["lastUpgrade"]["result"] == "Committed"
                && f["status"]["firmware"]["committedVersion"] == "2.0.0"
        })
        .unwrap();
    assert_eq!(f["status"]["firmware"]["activeSlot"], "b");
}

/// The flight gate on the board's architecture: the aarch64 agent reads a pymavlink flight
/// controller over UDP, holds the upgrade while the vehicle flies, and completes once it landed
/// and disarmed; the FlightNode says why it waited.
#[test]
fn aarch64_agent_holds_the_upgrade_while_the_vehicle_flies() {
    if skip() {
        eprintln!("FLIGHTNODE_SKIP_AARCH64 set: skipped");
        return;
    }
    let agent = aarch64_agent();
    let port = free_udp_port().unwrap();
    let mut vehicle = Vehicle::start(port, &["--in-air"]).unwrap();
    let fleet = Fleet::start(FleetOptions {
        agent_bin: Some(agent),
        drone_extra: vec![format!(
            "[flight]\nmavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"3s\"\n"
        )],
        ..FleetOptions::default()
    })
    .unwrap();
    let (bundle, _) = fleet.bundle("v2", "2.0.0", 128 * 1024).unwrap();
    let base = fleet.bundles.url("/");
    fleet
        .hub_upgrade(
            "drone-1",
            &[
                "--bundle",
                bundle.to_str().unwrap(),
                "--base-url",
                base.trim_end_matches('/'),
            ],
        )
        .unwrap();
    let f = fleet
        .wait_flightnode("drone-1", Duration::from_mins(2), |f| {
            f["status"]["phase"] == "Waiting" && f["status"]["observedState"] == "in-air"
        })
        .unwrap();
    assert_eq!(f["status"]["waitReason"], "in_air", "{f:#}");
    assert_eq!(f["status"]["firmware"]["committedVersion"], "1.0.0");
    let reason = flightnode_tests::fleet::condition(&f, "UpgradeInProgress").unwrap()["reason"].clone();
    assert_eq!(reason, "WaitingInAir", "{f:#}");
    std::thread::sleep(Duration::from_secs(2));
    let d = fleet.drones[0].status().unwrap();
    assert_eq!(d["phase"], "waiting", "still waiting in the air: {d:#}");

    vehicle.send("land").unwrap();
    vehicle.send("disarm").unwrap();
    let f = fleet
        .wait_flightnode("drone-1", Duration::from_mins(2), |f| {
            // The heartbeat's flight state is refreshed every 100 ms, apart from the gate's read:
            // the commit's own heartbeat may still say "armed".
            f["status"]["lastUpgrade"]["result"] == "Committed" && f["status"]["observedState"] == "disarmed"
        })
        .unwrap();
    assert_eq!(f["status"]["firmware"]["committedVersion"], "2.0.0");
    assert_eq!(f["status"]["flight"]["autopilot"], "ardupilotmega", "{f:#}");
}
