//! The agent as flashed onto the boards: the static release build for aarch64 (musl, built with
//! Debian's cross gcc as the linker driver) run under qemu-user — `--version`, `bundle verify`,
//! and scenario 1 against the x86_64 hub and mosquitto.
//!
//! Needs `rustup target add aarch64-unknown-linux-musl` and the Debian packages
//! `gcc-aarch64-linux-gnu qemu-user-static` (`./test.sh` installs them). The build is
//! [`release::build`]'s, shared with `tests/tests/packaging.rs` (same target dir and arguments).
//! Set `FLIGHTNODE_SKIP_AARCH64=1` to skip it on a machine without them.

use flightnode_tests::fleet::{Fleet, FleetOptions};
use flightnode_tests::release::{self, AARCH64};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn skip() -> bool {
    std::env::var_os("FLIGHTNODE_SKIP_AARCH64").is_some()
}

/// The static aarch64 release agent behind a wrapper that runs it under qemu-user (no sysroot:
/// the binary loads no shared library).
fn aarch64_agent() -> PathBuf {
    static WRAPPED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    WRAPPED
        .get_or_init(|| {
            let bin = release::build(AARCH64)
                .unwrap_or_else(|e| panic!("{e:#}\n(or FLIGHTNODE_SKIP_AARCH64=1)"))
                .agent;
            let kind = release::file_type(&bin).unwrap();
            assert!(
                kind.contains("aarch64") && kind.contains("static"),
                "not a static aarch64 binary: {kind}"
            );
            let wrapper = release::target_dir().join("flightnode-agent-qemu");
            std::fs::write(
                &wrapper,
                format!("#!/bin/sh\nexec qemu-aarch64-static {} \"$@\"\n", bin.display()),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
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
        .wait_flightnode("drone-1", Duration::from_secs(120), |f| {
            f["status"]["lastUpgrade"]["result"] == "Committed"
                && f["status"]["firmware"]["committedVersion"] == "2.0.0"
        })
        .unwrap();
    assert_eq!(f["status"]["firmware"]["activeSlot"], "b");
}
