//! The daemon with a real mosquitto: commands over MQTT, reports on `firmware/<id>/status`, and
//! the rules for duplicates, busy, cancel, garbage, broker restarts and offline delivery.

mod common;
use common::*;
use flightnode_tests::http_server::{BundleServer, Fault};
use flightnode_tests::mosquitto::{Mosquitto, Subscriber};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const STATUS: &str = "firmware/drone-test/status";
const UPGRADE: &str = "firmware/drone-test/upgrade";

fn device(broker: &Mosquitto, health: &str) -> Device {
    Device::new(Options {
        health: Some(health.into()),
        extra: format!(
            "[commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n",
            broker.url()
        ),
        ..Options::default()
    })
}

/// Starts the daemon once the broker has its subscription (see [`Daemon::start_subscribed`]).
fn start(dev: &Device) -> Daemon {
    Daemon::start_subscribed(dev)
}

fn serve(dev: &Device, version: &str, len: usize) -> (BundleServer, u64) {
    let bundle = dev.bundle(version, version, len, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    (srv, std::fs::metadata(&bundle).unwrap().len())
}

fn upgrade_json(id: &str, url: &str) -> String {
    format!(r#"{{"type":"upgrade","upgrade_id":"{id}","url":"{url}"}}"#)
}

fn wait(sub: &Subscriber, needle: &str, dev: &Device) {
    assert!(
        sub.wait_for(needle, WAIT),
        "never saw {needle}\nstatus topic:\n{}\ndaemon log:\n{}",
        sub.output(),
        dev.log()
    );
}

#[test]
fn plain_url_and_json_upgrades_commit_and_duplicates_install_once() {
    let broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "true");
    let _d = start(&dev);
    let sub = broker.subscriber(STATUS).unwrap();
    let (srv, _) = serve(&dev, "2.0.0", 300_000);

    // The form existing operators publish: a bare URL.
    broker
        .publish(UPGRADE, srv.url("/fw.fnb").as_bytes(), false)
        .unwrap();
    wait(&sub, r#""result":"committed""#, &dev);
    assert_eq!(dev.status()["committed_version"], "2.0.0");

    // JSON, delivered three times: one install.
    let v3 = dev.bundle("v3", "3.0.0", 10_000, &[]);
    srv.put_file("/v3.fnb", &v3).unwrap();
    let payload = upgrade_json("up-3", &srv.url("/v3.fnb"));
    for _ in 0..3 {
        broker.publish(UPGRADE, payload.as_bytes(), false).unwrap();
    }
    wait(
        &sub,
        r#""upgrade_id":"up-3","phase":"idle","progress":null,"result":"committed""#,
        &dev,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        dev.applied().lines().filter(|l| l.contains("3.0.0")).count(),
        1,
        "{}",
        dev.applied()
    );
    // A download starts at byte 0 once; its first 128 KiB probe is followed by the rest.
    let starts = srv
        .requests_for("/v3.fnb")
        .iter()
        .filter(|r| r.range.as_deref().is_none_or(|r| r.starts_with("bytes=0-")))
        .count();
    assert_eq!(starts, 1, "one download for three deliveries");
    // The retained status tells a late subscriber the truth.
    let retained = broker
        .subscribe_once(STATUS, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let retained: serde_json::Value = serde_json::from_slice(&retained).unwrap();
    assert_eq!(retained["upgrade_id"], "up-3");
    assert_eq!(retained["running"]["version"], "3.0.0");
}

#[test]
fn busy_cancel_and_garbage() {
    let broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "true");
    let _d = start(&dev);
    let sub = broker.subscriber(STATUS).unwrap();
    let (srv, len) = serve(&dev, "2.0.0", 2_000_000);

    // Garbage of every kind: reported as malformed, the agent keeps working.
    let deep = format!("{{\"type\":{}{}}}", "[".repeat(3000), "]".repeat(3000));
    let huge = vec![b'x'; 100_000];
    let garbage: Vec<&[u8]> = vec![
        b"\xff\xfe\x00garbage",
        &huge,
        deep.as_bytes(),
        br#"{"type":"upgrade","upgrade_id":5,"url":"http://x/y"}"#,
        br#"{"type":"upgrade","upgrade_id":"u","url":"http://x/y","device_id":"drone-other"}"#,
    ];
    for g in &garbage {
        broker.publish(UPGRADE, g, false).unwrap();
    }
    assert!(sub.wait_for("malformed", WAIT), "{}", sub.output());
    let deadline = Instant::now() + WAIT;
    while sub.output().matches("\"malformed\"").count() < garbage.len() {
        assert!(
            Instant::now() < deadline,
            "not every garbage payload was reported: {}",
            sub.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A download that stalls halfway keeps the agent busy.
    srv.set_fault("/fw.fnb", Fault::Stall { after: len / 2 });
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-a", &srv.url("/fw.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    wait(&sub, r#""upgrade_id":"up-a","phase":"downloading""#, &dev);
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-b", &srv.url("/other.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    wait(&sub, r#""upgrade_id":"up-b""#, &dev);
    assert!(
        sub.output()
            .lines()
            .any(|l| l.contains("\"up-b\"") && l.contains("\"busy\"")),
        "{}",
        sub.output()
    );

    // Cancel before the image is written: canceled, the old slot untouched.
    broker
        .publish(UPGRADE, br#"{"type":"cancel","upgrade_id":"up-a"}"#, false)
        .unwrap();
    wait(
        &sub,
        r#""upgrade_id":"up-a","phase":"idle","progress":null,"result":"canceled""#,
        &dev,
    );
    let s = dev.status();
    assert_eq!(s["active_slot"], "a");
    assert_eq!(s["last_upgrade"]["result"], "canceled");
    dev.assert_bootable();
}

#[test]
fn cancel_after_the_image_is_written_reports_the_real_end() {
    let broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "sleep 3");
    let _d = start(&dev);
    let sub = broker.subscriber(STATUS).unwrap();
    let (srv, _) = serve(&dev, "2.0.0", 100_000);
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-c", &srv.url("/fw.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    wait(&sub, r#""upgrade_id":"up-c","phase":"testing""#, &dev);
    broker
        .publish(UPGRADE, br#"{"type":"cancel","upgrade_id":"up-c"}"#, false)
        .unwrap();
    wait(&sub, r#""result":"committed""#, &dev);
    assert!(
        !sub.output().contains("\"canceled\""),
        "never a false canceled: {}",
        sub.output()
    );
}

#[test]
fn broker_restart_mid_download_and_commands_sent_while_offline() {
    let mut broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "true");
    let mut d = start(&dev);
    let (srv, len) = serve(&dev, "2.0.0", 2_000_000);
    {
        let sub = broker.subscriber(STATUS).unwrap();
        srv.set_fault("/fw.fnb", Fault::Stall { after: len / 2 });
        broker
            .publish(
                UPGRADE,
                upgrade_json("up-r", &srv.url("/fw.fnb")).as_bytes(),
                false,
            )
            .unwrap();
        wait(&sub, r#""upgrade_id":"up-r","phase":"downloading""#, &dev);
    }
    broker.stop().unwrap();
    srv.clear_fault("/fw.fnb"); // the download resumes (Range) while the broker is down
    let deadline = Instant::now() + WAIT;
    while dev.status()["last_upgrade"]["upgrade_id"] != "up-r" {
        assert!(
            Instant::now() < deadline,
            "the upgrade must finish without the broker"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    broker.start_again().unwrap();
    // The final status is published after the reconnect (retained, so a new subscriber sees it).
    let deadline = Instant::now() + WAIT;
    loop {
        let got = broker
            .subscribe_once(STATUS, Duration::from_secs(2))
            .unwrap()
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&got);
        if text.contains("\"up-r\"") && text.contains("\"committed\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "final status not republished after reconnect: {text}"
        );
    }

    // Persistent session: a command published while the agent is down runs when it comes back.
    d.stop();
    let v3 = dev.bundle("v3", "3.0.0", 10_000, &[]);
    srv.put_file("/v3.fnb", &v3).unwrap();
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-offline", &srv.url("/v3.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    let _d2 = start(&dev);
    let deadline = Instant::now() + WAIT;
    while dev.status()["last_upgrade"]["upgrade_id"] != "up-offline" {
        assert!(Instant::now() < deadline, "the offline command never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dev.status()["committed_version"], "3.0.0");
}

fn reboot_device(
    broker: &Mosquitto,
    sim: &flightnode_tests::boot_sim::SimBoot,
    fleet_timeout: &str,
) -> Device {
    Device::new(Options {
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\n\
             [daemon]\ncommit_requires = \"broker\"\nfleet_timeout = \"{fleet_timeout}\"\n\
             [commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n{}",
            broker.url(),
            sim.boot_toml()
        ),
        ..Options::default()
    })
}

/// Installs over MQTT until the reboot command kills the daemon, then "powers on" the board.
fn install_and_reboot(
    broker: &Mosquitto,
    dev: &Device,
    sim: &flightnode_tests::boot_sim::SimBoot,
) -> BundleServer {
    let (srv, _) = serve(dev, "2.0.0", 50_000);
    let mut d = start(dev);
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-boot", &srv.url("/fw.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    let status = d
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the reboot command never ended the daemon:\n{}", dev.log()));
    assert_eq!(status.signal(), Some(9), "the reboot command ends the daemon");
    assert_eq!(sim.power_on().unwrap(), 'B');
    srv
}

#[test]
fn reboot_mode_commits_only_after_the_broker_is_reachable_again() {
    let root = tempfile::tempdir().unwrap();
    let sim = flightnode_tests::boot_sim::SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let mut broker = Mosquitto::start().unwrap();
    let dev = reboot_device(&broker, &sim, "60s");
    let _srv = install_and_reboot(&broker, &dev, &sim);

    // The new slot boots healthy, but the broker is down: no commit yet.
    broker.stop().unwrap();
    let _d = Daemon::start(&dev);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        dev.status()["phase"],
        "testing",
        "must wait for the fleet before committing"
    );
    broker.start_again().unwrap();
    let deadline = Instant::now() + WAIT;
    while dev.status()["last_upgrade"]["result"] != "committed" {
        assert!(
            Instant::now() < deadline,
            "commits once the broker is back: {:#}",
            dev.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dev.status()["active_slot"], "b");
}

#[test]
fn reboot_mode_rolls_back_when_the_fleet_never_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let sim = flightnode_tests::boot_sim::SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let mut broker = Mosquitto::start().unwrap();
    let dev = reboot_device(&broker, &sim, "2s");
    let _srv = install_and_reboot(&broker, &dev, &sim);
    broker.stop().unwrap();
    let mut d = Daemon::start(&dev);
    // Healthy but cut off: marked bad, and the agent reboots back (killed again).
    let status = d
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the reboot command never ended the daemon:\n{}", dev.log()));
    assert_eq!(status.signal(), Some(9), "reboots back to the old slot");
    assert_eq!(sim.power_on().unwrap(), 'A');
    broker.start_again().unwrap();
    let _d = start(&dev);
    let deadline = Instant::now() + WAIT;
    while dev.status()["last_upgrade"]["result"] != "rolled_back" {
        assert!(Instant::now() < deadline, "{:#}", dev.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dev.status()["active_slot"], "a");
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_flood_of_ten_thousand_commands_installs_once_and_keeps_the_agent_responsive() {
    let broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "true");
    let d = start(&dev);
    let (srv, _) = serve(&dev, "2.0.0", 500_000);
    let before = rss_kib(d.0.id());
    // 10,000 messages on one connection: distinct upgrade ids, duplicates and garbage mixed.
    let mut lines = String::new();
    for i in 0..10_000 {
        match i % 3 {
            0 => lines.push_str(&upgrade_json(&format!("flood-{i}"), &srv.url("/fw.fnb"))),
            1 => lines.push_str(&upgrade_json("flood-0", &srv.url("/fw.fnb"))),
            _ => lines.push_str("{not json"),
        }
        lines.push('\n');
    }
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
            "-t",
            UPGRADE,
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(publisher.wait().unwrap().success());

    // Still answering, one install in all.
    let deadline = Instant::now() + WAIT;
    while dev.status()["committed_version"] != "2.0.0" {
        assert!(Instant::now() < deadline, "{:#}", dev.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    // Later distinct ids may run after it ended, but find the version installed and write nothing.
    assert_eq!(
        dev.applied().lines().count(),
        1,
        "exactly one install: {}",
        dev.applied()
    );
    let s = dev.status();
    assert!(s["phase"] == "idle" || s["phase"] == "downloading", "{s:#}");
    let after = rss_kib(d.0.id());
    assert!(
        after < before + 64 * 1024,
        "memory must stay bounded: {before} KiB → {after} KiB"
    );
}

#[test]
fn cancel_while_the_manifest_is_still_downloading_ends_canceled_at_once() {
    let broker = Mosquitto::start().unwrap();
    let dev = device(&broker, "true");
    let _d = start(&dev);
    let sub = broker.subscriber(STATUS).unwrap();
    let (srv, _) = serve(&dev, "2.0.0", 100_000);
    // The connection stalls inside the manifest: nothing has been verified or written yet.
    srv.set_fault("/fw.fnb", Fault::Stall { after: 600 });
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-early", &srv.url("/fw.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    wait(&sub, r#""upgrade_id":"up-early","phase":"downloading""#, &dev);
    broker
        .publish(UPGRADE, br#"{"type":"cancel","upgrade_id":"up-early"}"#, false)
        .unwrap();
    wait(
        &sub,
        r#""upgrade_id":"up-early","phase":"idle","progress":null,"result":"canceled""#,
        &dev,
    );
    let s = dev.status();
    assert_eq!(s["slots"]["b"]["state"], "empty", "nothing was written: {s:#}");
    dev.assert_bootable();
}
