//! The agent as flashed onto the boards: built for aarch64 with Debian's cross gcc and run under
//! qemu-user — `--version`, `bundle verify`, and scenario 1 against the x86_64 hub and mosquitto.
//!
//! Needs `rustup target add aarch64-unknown-linux-gnu` and the Debian packages
//! `gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static` (installed by `.ci/run`).
//! Set `FLIGHTNODE_SKIP_AARCH64=1` to skip it on a machine without them.

use flightnode_tests::fleet::{Fleet, FleetOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TARGET: &str = "aarch64-unknown-linux-gnu";

fn skip() -> bool {
    std::env::var_os("FLIGHTNODE_SKIP_AARCH64").is_some()
}

/// Builds the aarch64 agent once (own target dir: the outer cargo holds the main one) and returns
/// a wrapper that runs it under qemu-user.
fn aarch64_agent() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let target_dir = root.join("target/aarch64-qemu");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(&root)
                .args(["build", "--locked", "-p", "flightnode-agent", "--target", TARGET])
                .env("CARGO_TARGET_DIR", &target_dir)
                .output()
                .expect("run cargo");
            assert!(
                out.status.success(),
                "building the aarch64 agent failed (rustup target add {TARGET}; apt-get install gcc-aarch64-linux-gnu \
                 libc6-dev-arm64-cross qemu-user-static; or FLIGHTNODE_SKIP_AARCH64=1):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bin = target_dir.join(TARGET).join("debug/flightnode-agent");
            let wrapper = target_dir.join("flightnode-agent-qemu");
            std::fs::write(
                &wrapper,
                format!("#!/bin/sh\nexec qemu-aarch64-static -L /usr/aarch64-linux-gnu {} \"$@\"\n", bin.display()),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            let file = Command::new("file").arg(&bin).output().map(|o| o.stdout).unwrap_or_default();
            let file = String::from_utf8_lossy(&file);
            assert!(file.is_empty() || file.contains("aarch64"), "not an aarch64 binary: {file}");
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
        .wait_flightnode("drone-1", Duration::from_secs(120), |f| {
            f["status"]["lastUpgrade"]["result"] == "Committed"
                && f["status"]["firmware"]["committedVersion"] == "2.0.0"
        })
        .unwrap();
    assert_eq!(f["status"]["firmware"]["activeSlot"], "b");
}
