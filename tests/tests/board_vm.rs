//! The virtual board (issue 14): an arm64 board image made from Debian packages only (see
//! `flightnode_tests::vboard`), booted by Debian's U-Boot under `qemu-system-aarch64` (TCG), with
//! the agent installed from its `.deb` and started by real systemd. One board, flashed at the
//! factory with release 1.0.0 in slot A, lives through:
//!
//! 1. first boot: U-Boot boots A, systemd starts the static release agent from its `.deb`
//!    (`Type=notify`: "Started" only after READY=1), the idle agent reports 1.0.0 on slot a over
//!    MQTT (on a board without CA roots: bundles come over http://);
//! 2. a broken rootfs (3.0.0, its health check exits 1) is installed into B over HTTP from the
//!    host (the command is published once, right away, even while the agent's start-up recovery
//!    may still run); the agent reboots for real, U-Boot boots B, the health check fails, the agent marks B
//!    bad and reboots, U-Boot boots A again: rolled back by itself;
//! 3. a good rootfs (2.0.0) is installed into B, and the power is cut (qemu SIGKILLed) in the
//!    middle of its download; on power-on U-Boot boots A, the agent resumes the download where
//!    its checkpoint was (an HTTP `Range` request), reboots, U-Boot boots B, the agent commits.
//!
//! Everything is observed from outside: the serial console (U-Boot's and systemd's lines, the
//! journal forwarded to it) and the agent's retained MQTT status on the host's mosquitto. No
//! wall-clock assertion; the timeouts are generous because the board is emulated on a busy host.
//!
//! The file's name puts it right after the qemu-user test (cargo runs test binaries by name): it
//! needs only the aarch64 build, so in a whole-suite run it overlaps the x86_64 release builds the
//! packaging test waits for.
#![allow(
    clippy::similar_names,
    reason = "broker and broken: the MQTT broker and the broken build"
)]

use flightnode_tests::agent::binary;
use flightnode_tests::http_server::{BundleServer, Fault};
use flightnode_tests::mosquitto::Mosquitto;
use flightnode_tests::vboard::{self, Board, BoardConfig, DEVICE_ID, HARDWARE, Rootfs, boots_in};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// U-Boot, the kernel and systemd up to the agent's READY=1, emulated.
const BOOT_TIMEOUT: Duration = Duration::from_mins(10);
/// A download, the write into the slot and a reboot.
const UPGRADE_TIMEOUT: Duration = Duration::from_mins(15);

fn status(broker: &Mosquitto) -> Option<Value> {
    let topic = format!("firmware/{DEVICE_ID}/status");
    let payload = broker
        .subscribe_once(&topic, Duration::from_secs(3))
        .ok()
        .flatten()?;
    serde_json::from_slice(&payload).ok()
}

/// Waits for a status report that satisfies `done`; fails with the last report and the console.
fn wait_status(
    broker: &Mosquitto,
    board: &mut Board,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(s) = status(broker) {
            if done(&s) {
                return s;
            }
            last = Some(s);
        }
        // Also fails at once when qemu died.
        if let Err(e) = board.wait_console(what, Duration::from_millis(1), |_| false)
            && !e.to_string().starts_with(&format!("no {what} within"))
        {
            panic!("{e:#}");
        }
        assert!(
            Instant::now() < deadline,
            "no status report with {what} within {timeout:?}; last report: {last:?}\nconsole (last lines):\n{}",
            board.console_tail(80)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Publishes the upgrade command once and waits for the agent's first report on it, which must
/// not be a refusal. Once the agent has published its status it is subscribed (it publishes on
/// every connect, after the subscription), and its persistent session keeps commands for it
/// across reboots, so one publish is enough, also during its start-up recovery.
fn upgrade(broker: &Mosquitto, board: &mut Board, id: &str, url: &str) {
    let cmd = serde_json::json!({"type": "upgrade", "upgrade_id": id, "url": url});
    let topic = format!("firmware/{DEVICE_ID}/upgrade");
    broker.publish(&topic, cmd.to_string().as_bytes(), false).unwrap();
    let s = wait_status(broker, board, &format!("a report on {id}"), BOOT_TIMEOUT, |s| {
        s["upgrade_id"] == id
    });
    assert!(s["error"].is_null(), "upgrade {id} was refused: {s}");
}

/// The first byte a request asked for (`Range: bytes=N-` or `bytes=N-M`; 0 without a range).
fn range_start(range: Option<&str>) -> u64 {
    range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn bundle(agent: &Path, key: &Path, image: &Path, version: &str, out: &Path) {
    let o = Command::new(agent)
        .args(["bundle", "create", "--key"])
        .arg(key)
        .arg("--image")
        .arg(image)
        .args(["--version", version, "--compatible", HARDWARE, "--output"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bundle create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn virtual_board_boots_upgrades_rolls_back_and_resumes_after_a_power_cut() {
    let Some(tools) = vboard::require() else {
        return;
    };
    let started = Instant::now();
    let lap = |what: &str| eprintln!("vboard: {what} after {:.0?}", started.elapsed());
    let work = tempfile::Builder::new().prefix("fn-vboard-").tempdir().unwrap();
    let broker = Mosquitto::start().unwrap();
    let http = BundleServer::start_blocking().unwrap();
    let agent = binary("flightnode-agent").unwrap();
    let keys = work.path().join("keys");
    let o = Command::new(&agent)
        .arg("keygen")
        .arg("--out-dir")
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let cfg = BoardConfig {
        mqtt_port: broker.port(),
        release_pub: keys.join("release.pub"),
        factory_version: "1.0.0".into(),
    };
    let images = vboard::rootfs_images(
        work.path(),
        &cfg,
        &[
            Rootfs {
                release: "1.0.0".into(),
                healthy: true,
            },
            Rootfs {
                release: "2.0.0".into(),
                healthy: true,
            },
            Rootfs {
                release: "3.0.0".into(),
                healthy: false,
            },
        ],
    )
    .unwrap();
    let key = keys.join("release.key");
    let good = work.path().join("rootfs-2.0.0.fnb");
    let broken = work.path().join("rootfs-3.0.0.fnb");
    bundle(&agent, &key, &images[1], "2.0.0", &good);
    bundle(&agent, &key, &images[2], "3.0.0", &broken);
    http.put_file("/rootfs-2.0.0.fnb", &good).unwrap();
    http.put_file("/rootfs-3.0.0.fnb", &broken).unwrap();
    let good_len = std::fs::metadata(&good).unwrap().len();
    // The server holds the bundles in memory now: the disk is what CI machines run short of.
    for f in [&images[1], &images[2], &good, &broken] {
        std::fs::remove_file(f).unwrap();
    }
    // The board reaches the host's loopback as 10.0.2.2 (qemu user networking).
    let url = |path: &str| format!("http://10.0.2.2:{}{path}", http.addr().port());
    lap("images and bundles ready");

    let mut board = Board::flash(tools, &work.path().join("board"), &images[0]).unwrap();
    std::fs::remove_file(&images[0]).unwrap();
    lap("board flashed");

    // 1. First boot: slot A, the agent under systemd.
    board.power_on().unwrap();
    board
        .wait_console("the agent started by systemd (READY=1)", BOOT_TIMEOUT, |c| {
            // systemd's own line, forwarded from the journal (its status line may be shortened).
            c.contains("systemd[1]: Started flightnode-agent.service")
        })
        .unwrap();
    assert_eq!(board.boots(), vec!['A'], "the factory board boots slot A");
    lap("first boot: agent READY");
    // Idle, and still its status is there: the agent publishes it when it connects.
    let s = wait_status(
        &broker,
        &mut board,
        "the idle agent's status",
        BOOT_TIMEOUT,
        |s| s["phase"] == "idle",
    );
    assert_eq!(s["running"]["version"], "1.0.0", "{s}");
    assert_eq!(s["running"]["slot"], "a", "{s}");
    assert!(s["upgrade_id"].is_null(), "{s}");
    // The board image has no CA roots: the agent says https:// cannot work, and runs.
    assert!(
        board.console().contains("no usable CA root certificates"),
        "{}",
        board.console_tail(80)
    );

    // 2. A broken rootfs into B: U-Boot boots it, its health check fails, back to A by itself.
    upgrade(&broker, &mut board, "vb-broken", &url("/rootfs-3.0.0.fnb"));
    board
        .wait_console(
            "boots A, B, A (trial of B, then rollback)",
            UPGRADE_TIMEOUT,
            |c| boots_in(c).len() >= 3,
        )
        .unwrap();
    assert_eq!(board.boots()[..3], ['A', 'B', 'A'], "U-Boot's boots");
    let console = board.console();
    assert!(
        console.contains("FLIGHTNODE-HEALTH FAILED release=3.0.0"),
        "the broken rootfs ran its failing health check on B:\n{}",
        board.console_tail(80)
    );
    let s = wait_status(
        &broker,
        &mut board,
        "vb-broken rolled back",
        UPGRADE_TIMEOUT,
        |s| s["upgrade_id"] == "vb-broken" && s["result"] == "rolled_back",
    );
    assert_eq!(s["running"]["version"], "1.0.0", "{s}");
    assert_eq!(s["running"]["slot"], "a", "{s}");
    lap("broken rootfs rolled back to A");

    // 3. A good rootfs, the power cut in the middle of its download.
    let path = "/rootfs-2.0.0.fnb";
    let size = good_len;
    let cut_at = size / 2;
    http.reset_counters();
    http.set_fault(path, Fault::Stall { after: cut_at });
    upgrade(&broker, &mut board, "vb-good", &url(path));
    // The agent got to the stall and, after its idle timeout, asked again from there: everything
    // it had received up to there went through its checkpoints. (Its first requests are the
    // bundle header's probe and its doubling parts, all before the stall.)
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    while !http
        .requests_for(path)
        .iter()
        .any(|r| range_start(r.range.as_deref()) >= cut_at)
    {
        assert!(
            Instant::now() < deadline,
            "the agent never got to the middle of the download: {} bytes sent, requests {:?}\n{}",
            http.bytes_sent_for(path),
            http.requests_for(path),
            board.console_tail(60)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(http.bytes_sent_for(path) >= cut_at);
    board.power_cut();
    lap("power cut mid-download");
    http.clear_fault(path);
    http.reset_counters();
    board.power_on().unwrap();
    board
        .wait_console("the boot after the power cut", BOOT_TIMEOUT, |c| {
            !boots_in(c).is_empty()
        })
        .unwrap();
    assert_eq!(board.boots(), vec!['A'], "after the cut the board comes up on A");
    board
        .wait_console(
            "boots A, B (resumed download, trial of B)",
            UPGRADE_TIMEOUT,
            |c| boots_in(c).len() >= 2,
        )
        .unwrap();
    assert_eq!(board.boots()[..2], ['A', 'B']);
    let s = wait_status(&broker, &mut board, "vb-good committed", UPGRADE_TIMEOUT, |s| {
        s["upgrade_id"] == "vb-good" && s["result"] == "committed"
    });
    assert_eq!(s["running"]["version"], "2.0.0", "{s}");
    assert_eq!(s["running"]["slot"], "b", "{s}");
    let requests = http.requests_for(path);
    let first = requests
        .first()
        .expect("the agent fetched the bundle after the power cut");
    let resumed_from = range_start(first.range.as_deref());
    assert!(
        resumed_from > 0 && resumed_from <= cut_at + 1,
        "after the power cut the download resumed at a checkpoint (first request {first:?})"
    );
    assert!(
        http.bytes_sent_for(path) < size,
        "the resumed download did not fetch the whole bundle again"
    );
    let console = board.console();
    assert!(
        console.contains("FLIGHTNODE-HEALTH ok release=2.0.0"),
        "{}",
        board.console_tail(80)
    );
    // WatchdogSec=60s: the agent ran for minutes on A over these boots, and the watchdog never
    // fired (systemd logs "Watchdog timeout" and kills the service when it does).
    let all = board.all_consoles();
    assert!(
        all.contains("systemd[1]: Started flightnode-agent.service")
            && !all.to_lowercase().contains("watchdog timeout"),
        "systemd's watchdog fired on the agent:\n{}",
        board.console_tail(80)
    );
    lap("resumed after the power cut, 2.0.0 committed on B");
    board.power_cut();
}
