//! What the daemon does around its start, found on the virtual board: it starts on a board image
//! without CA roots, an upgrade sent during its start-up recovery runs after that recovery (also
//! across a restart), and an idle agent publishes its status when it (re)connects.

mod common;
use common::*;
use flightnode_tests::boot_sim::SimBoot;
use flightnode_tests::http_server::{BundleServer, Fault};
use flightnode_tests::mosquitto::Mosquitto;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_mins(1);
const STATUS: &str = "firmware/drone-test/status";
const UPGRADE: &str = "firmware/drone-test/upgrade";
/// How long the slow boot backend takes to mark the booted slot good at start-up.
const RECOVERY_SECS: u32 = 8;

#[test]
fn starts_without_ca_roots_installs_over_http_and_says_what_https_needs() {
    let dev = Device::new(Options::default());
    // rustls-native-certs reads only these when they are set: an empty file and an empty
    // directory are a system without ca-certificates.
    let empty_dir = dev.path("no-certs");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let empty_file = dev.path("no-certs.pem");
    std::fs::write(&empty_file, b"").unwrap();
    let _d = Daemon::start_with(
        &dev,
        &[
            ("SSL_CERT_FILE", empty_file.to_str().unwrap()),
            ("SSL_CERT_DIR", empty_dir.to_str().unwrap()),
        ],
    );

    let bundle = dev.bundle("v2", "2.0.0", 100_000, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let o = dev.run(&["install", &srv.url("/fw.fnb")]);
    assert!(o.status.success(), "http:// needs no CA roots: {}", text(&o));
    assert_eq!(dev.status()["committed_version"], "2.0.0");

    let url = "https://127.0.0.1:9/fw-3.fnb";
    let o = dev.run(&["install", url]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(url) && out.contains("ca-certificates"),
        "the error names the URL and what to install: {out}"
    );
    // An http:// URL that redirects to https:// fails the same way, naming where it went.
    let target = "https://127.0.0.1:9/elsewhere.fnb";
    srv.put_file("/moved.fnb", &bundle).unwrap();
    srv.set_fault("/moved.fnb", Fault::RedirectTo(target.into()));
    let o = dev.run(&["install", &srv.url("/moved.fnb")]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(target) && out.contains("ca-certificates"),
        "the error names the https:// URL and what to install: {out}"
    );
    let s = dev.status();
    assert_eq!(s["committed_version"], "2.0.0", "{s:#}");
    assert!(
        dev.log().contains("no usable CA root certificates"),
        "the start says once that https:// will not work:\n{}",
        dev.log()
    );
}

/// A reboot-mode device whose boot backend takes [`RECOVERY_SECS`] to mark the booted slot good,
/// as `fw_setenv` on a slow board does: its start-up recovery lasts that long.
fn slow_recovery_device(root: &Path, broker: &Mosquitto) -> (SimBoot, Device) {
    let sim = SimBoot::script(&root.join("boot")).unwrap();
    // The script was just written: a child forked by a parallel test may still hold it open for
    // writing (ETXTBSY) for an instant.
    let mut first = sim.power_on();
    for _ in 0..20 {
        match &first {
            Err(e) if format!("{e:#}").contains("Text file busy") => {
                std::thread::sleep(Duration::from_millis(100));
                first = sim.power_on();
            }
            _ => break,
        }
    }
    assert_eq!(first.unwrap(), 'A');
    let script = root.join("boot/boot.sh");
    let slow = root.join("slow-boot.sh");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nif [ \"$1\" = set-state ] && [ \"$3\" = good ]; then sleep {RECOVERY_SECS}; fi\nexec {} \"$@\"\n",
            script.display()
        ),
    )
    .unwrap();
    make_executable(&slow);
    let boot = sim.boot_toml().replace(
        &format!("{:?}", script.to_string_lossy()),
        &format!("{:?}", slow.to_string_lossy()),
    );
    assert!(boot.contains("slow-boot.sh"), "{boot}");
    let dev = Device::new(Options {
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\n\
             [daemon]\ncommit_requires = \"broker\"\n\
             [commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n{boot}",
            broker.url()
        ),
        ..Options::default()
    });
    (sim, dev)
}

/// A slow-recovery device with its broker and a 2.0.0 bundle served at `/fw.fnb`. Fields drop
/// in declaration order: the server and the device before the broker and their directory.
struct Recovery {
    srv: BundleServer,
    dev: Device,
    sim: SimBoot,
    broker: Mosquitto,
    _root: tempfile::TempDir,
}

impl Recovery {
    fn new() -> Recovery {
        let root = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start().unwrap();
        let (sim, dev) = slow_recovery_device(root.path(), &broker);
        let bundle = dev.bundle("v2", "2.0.0", 50_000, &[]);
        let srv = BundleServer::start_blocking().unwrap();
        srv.put_file("/fw.fnb", &bundle).unwrap();
        Recovery {
            srv,
            dev,
            sim,
            broker,
            _root: root,
        }
    }
}

/// Starts the daemon and waits until its MQTT subscription is up while its start-up recovery
/// still runs (the slow backend), so a command now arrives during that recovery.
fn start_in_recovery(dev: &Device) -> Daemon {
    let d = Daemon::start_subscribed(dev);
    assert!(
        !dev.log().contains("start-up recovery done"),
        "the recovery must still run for this test to mean anything:\n{}",
        dev.log()
    );
    d
}

fn upgrade_json(id: &str, url: &str) -> String {
    format!(r#"{{"type":"upgrade","upgrade_id":"{id}","url":"{url}"}}"#)
}

/// The trial boot after the reboot: B boots, the agent commits 2.0.0.
fn boot_b_and_commit(sim: &SimBoot, dev: &Device) {
    assert_eq!(sim.power_on().unwrap(), 'B');
    let _d = Daemon::start(dev);
    let deadline = Instant::now() + WAIT;
    while dev.status()["last_upgrade"]["result"] != "committed" {
        assert!(Instant::now() < deadline, "{:#}\n{}", dev.status(), dev.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dev.status()["committed_version"], "2.0.0");
}

#[test]
fn an_upgrade_sent_during_start_up_recovery_runs_once_after_it() {
    let f = Recovery::new();
    let (srv, dev, sim, broker) = (&f.srv, &f.dev, &f.sim, &f.broker);
    let sub = broker.subscriber(STATUS).unwrap();

    let mut d = start_in_recovery(dev);
    let cmd = upgrade_json("up-early", &srv.url("/fw.fnb"));
    // Twice: the second delivery finds the first still waiting and must not queue another.
    broker.publish(UPGRADE, cmd.as_bytes(), false).unwrap();
    broker.publish(UPGRADE, cmd.as_bytes(), false).unwrap();
    let status = d.wait_exit(WAIT);
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(9),
        "the upgrade must run after the recovery and end in the reboot command\nstatus topic:\n{}\ndaemon log:\n{}",
        sub.output(),
        dev.log()
    );
    assert!(!sub.output().contains("\"busy\""), "{}", sub.output());
    let text = dev.log();
    let recovered = text.find("start-up recovery done").expect("recovery ended");
    let accepted = text.find("upgrade accepted").expect("accepted");
    assert!(accepted < recovered, "accepted during the recovery:\n{text}");
    boot_b_and_commit(sim, dev);
    let starts = srv
        .requests_for("/fw.fnb")
        .iter()
        .filter(|r| r.range.as_deref().is_none_or(|r| r.starts_with("bytes=0-")))
        .count();
    assert_eq!(starts, 1, "one download for two deliveries");
}

#[test]
fn an_upgrade_accepted_during_recovery_survives_a_kill_before_it_started() {
    let f = Recovery::new();
    let (srv, dev, sim, broker) = (&f.srv, &f.dev, &f.sim, &f.broker);

    let mut d = start_in_recovery(dev);
    broker
        .publish(
            UPGRADE,
            upgrade_json("up-kept", &srv.url("/fw.fnb")).as_bytes(),
            false,
        )
        .unwrap();
    dev.wait_log("upgrade accepted");
    // Power cut before the recovery ended: the broker has its PUBACK, so it will not resend.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    assert!(!dev.log().contains("start-up recovery done"), "{}", dev.log());
    assert_eq!(dev.status()["phase"], "idle", "nothing started yet");

    let mut d = Daemon::start(dev);
    let status = d.wait_exit(WAIT);
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(9),
        "the kept command runs after the restart's recovery and ends in the reboot command:\n{}",
        dev.log()
    );
    assert!(
        dev.log()
            .contains("taking up a command accepted before the restart")
    );
    boot_b_and_commit(sim, dev);
    assert_eq!(dev.status()["last_upgrade"]["upgrade_id"], "up-kept");
}

#[test]
fn a_cancel_of_an_upgrade_still_waiting_for_the_recovery_means_it_never_starts() {
    let f = Recovery::new();
    let (srv, dev, broker) = (&f.srv, &f.dev, &f.broker);
    let sub = broker.subscriber(STATUS).unwrap();

    let mut d = start_in_recovery(dev);
    let cmd = upgrade_json("up-nope", &srv.url("/fw.fnb"));
    broker.publish(UPGRADE, cmd.as_bytes(), false).unwrap();
    dev.wait_log("upgrade accepted");
    broker
        .publish(UPGRADE, br#"{"type":"cancel","upgrade_id":"up-nope"}"#, false)
        .unwrap();
    assert!(
        sub.wait_for(r#""upgrade_id":"up-nope","phase":"idle""#, WAIT) && sub.output().contains("canceled"),
        "{}\n{}",
        sub.output(),
        dev.log()
    );
    dev.wait_log("start-up recovery done");
    // Sent again after the cancel: answered from the history, never installed.
    broker.publish(UPGRADE, cmd.as_bytes(), false).unwrap();
    dev.wait_log("republishing its state");
    assert!(
        d.wait_exit(Duration::from_secs(3)).is_none(),
        "no reboot: {}",
        dev.log()
    );
    assert!(srv.requests_for("/fw.fnb").is_empty(), "nothing downloaded");
    let s = dev.status();
    assert_eq!(s["committed_version"], "1.0.0", "{s:#}");
    assert_eq!(s["phase"], "idle", "{s:#}");
}

fn retained_status(broker: &Mosquitto) -> Option<serde_json::Value> {
    broker
        .subscribe_once(STATUS, Duration::from_secs(2))
        .unwrap()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

/// Polls the retained status until `accept` takes it.
fn wait_retained(
    broker: &Mosquitto,
    what: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = retained_status(broker);
        if let Some(s) = got.filter(|s| accept(s)) {
            return s;
        }
        assert!(Instant::now() < deadline, "no retained status: {what}");
    }
}

#[test]
fn an_idle_agent_publishes_its_status_on_connect_and_after_a_broker_lost_it() {
    let mut broker = Mosquitto::start().unwrap();
    let dev = Device::new(Options {
        extra: format!(
            "[commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n",
            broker.url()
        ),
        ..Options::default()
    });
    let _d = Daemon::start(&dev);
    let first = wait_retained(&broker, "after the first connect", |_| true);
    assert_eq!(first["device_id"], "drone-test", "{first:#}");
    assert_eq!(first["phase"], "idle", "{first:#}");
    assert_eq!(first["running"]["version"], "1.0.0", "{first:#}");
    assert_eq!(first["running"]["slot"], "a", "{first:#}");
    assert!(first["error"].is_null(), "{first:#}");

    // A broker restarted without its store has forgotten every retained message.
    broker.stop().unwrap();
    broker.wipe_persistence().unwrap();
    broker.start_again().unwrap();
    let again = wait_retained(&broker, "after the reconnect", |_| true);
    assert_eq!(again["phase"], "idle", "{again:#}");
    assert!(
        again["seq"].as_u64() > first["seq"].as_u64(),
        "a new report, not a replay: {first} then {again}"
    );
}
