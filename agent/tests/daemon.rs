//! `flightnode-agent run` as a process: systemd notifications, the control socket, clean stop.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn start(dev: &Device, notify: Option<&std::path::Path>) -> Daemon {
    match notify {
        Some(sock) => Daemon::start_with(
            dev,
            &[
                ("NOTIFY_SOCKET", sock.to_str().unwrap()),
                ("WATCHDOG_USEC", "1000000"),
            ],
        ),
        None => Daemon::start(dev),
    }
}

#[test]
fn systemd_ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dev = Device::new(Options::default());
    let sock_path = dev.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut d = start(&dev, Some(&sock_path));
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        assert!(Instant::now() < deadline, "got only: {seen}");
        let n = sock.recv(&mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(seen.contains("STATUS=phase: idle"), "{seen}");
    assert!(d.stop().success(), "a stop is clean");
    let n = sock.recv(&mut buf).unwrap();
    let mut rest = String::from_utf8_lossy(&buf[..n]).to_string();
    while !rest.contains("STOPPING=1") {
        let n = sock.recv(&mut buf).unwrap();
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        !dev.path("state/agent.sock").exists(),
        "the socket is removed on stop"
    );
}

#[test]
fn status_install_and_mark_work_through_the_running_daemon() {
    let dev = Device::new(Options::default());
    let mut d = start(&dev, None);
    let mode = std::fs::metadata(dev.path("state/agent.sock")).unwrap();
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o600,
        "owner-only control socket"
    );

    let s = dev.status();
    assert_eq!(s["active_slot"], "a");
    let bundle = dev.bundle("v2", "2.0.0", 200_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("committed"), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["active_slot"], "b");
    assert_eq!(s["last_upgrade"]["result"], "committed");

    // The same install again is the same upgrade: it reports its end, nothing is reinstalled.
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).contains("committed"),
        "{}",
        text(&o)
    );
    assert_eq!(dev.applied().lines().count(), 1, "applied exactly once");

    let o = dev.run(&["mark-bad", "b"]);
    assert!(
        !o.status.success(),
        "the active slot cannot be marked bad: {}",
        text(&o)
    );
    let o = dev.run(&["mark-good", "a"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.stop().success());
    // The store is free again for direct use.
    assert_eq!(dev.status()["active_slot"], "b");
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        panic!("systemd-analyze is missing: apt-get install systemd");
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/flightnode-agent.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec=") && unit.contains("Restart=always"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flightnode-agent.service");
    std::fs::write(&path, unit.replace("/usr/bin/flightnode-agent", BIN)).unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // Messages about other units on the build machine are not ours.
    let ours: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("flightnode-agent.service"))
        .collect();
    assert!(o.status.success() && ours.is_empty(), "{stderr}");
}
