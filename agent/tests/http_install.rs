//! Installs over HTTP from the fault-injecting bundle server: resume with `Range`, bounded failures.

mod common;
use common::*;
use flightnode_tests::http_server::{BundleServer, Fault};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const IMAGE: usize = 2 * 1024 * 1024;

/// Serves a fresh bundle of `version` at `/fw.fnb`; returns the server and the bundle length.
fn serve(dev: &Device, version: &str) -> (BundleServer, u64) {
    let bundle = dev.bundle(version, version, IMAGE, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    (srv, std::fs::metadata(&bundle).unwrap().len())
}

#[test]
fn dropped_connection_is_resumed_with_range_and_commits() {
    let dev = Device::new(Options::default());
    let (srv, len) = serve(&dev, "2.0.0");
    srv.set_fault(
        "/fw.fnb",
        Fault::CutAt {
            offset: len / 2,
            times: 2,
        },
    );
    let o = dev.run(&["install", &srv.url("/fw.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", IMAGE));
    let ranges: Vec<_> = srv
        .requests_for("/fw.fnb")
        .into_iter()
        .filter_map(|r| r.range)
        .collect();
    assert!(
        ranges
            .iter()
            .any(|r| r.starts_with(&format!("bytes={}-", len / 2 + 1))),
        "{ranges:?}"
    );
    assert!(
        srv.bytes_sent() < len * 3 / 2,
        "sent {} for a {len}-byte bundle",
        srv.bytes_sent()
    );
    dev.assert_bootable();
}

#[test]
fn sigkill_mid_download_resumes_without_fetching_the_written_prefix_again() {
    for kill_at in [600_000u64, 1_300_000, 1_900_000] {
        let dev = Device::new(Options::default());
        let (srv, len) = serve(&dev, "2.0.0");
        let url = srv.url("/fw.fnb");
        let o = dev
            .cmd(&["install", &url])
            .env("FLIGHTNODE_FAILPOINT", format!("download@{kill_at}"))
            .output()
            .unwrap();
        assert_eq!(o.status.signal(), Some(9), "{}", text(&o));
        let s = dev.status();
        assert_eq!(s["phase"], "downloading");
        let saved = s["progress"]["bytes"].as_u64().unwrap();
        assert!(
            saved > 0 && saved <= kill_at,
            "checkpoint {saved} must be durable and not ahead of {kill_at}"
        );
        dev.assert_bootable();

        srv.reset_counters();
        let o = dev.run(&["install", &url]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            dev.slot_bytes("b"),
            image_bytes("2.0.0", IMAGE),
            "kill at {kill_at}"
        );
        let resumed = srv.requests_for("/fw.fnb");
        let range = resumed[0].range.clone().unwrap_or_default();
        let from: u64 = range
            .trim_start_matches("bytes=")
            .trim_end_matches('-')
            .parse()
            .unwrap_or(0);
        assert!(
            from >= saved,
            "resumed from {from} (Range {range:?}), checkpoint was {saved}"
        );
        assert!(
            srv.bytes_sent() <= len - saved + 1024,
            "re-run fetched {} bytes, but only {} were missing",
            srv.bytes_sent(),
            len - saved
        );
        dev.assert_bootable();
    }
}

fn failed_within(dev: &Device, url: &str, code: &str) {
    let t = Instant::now();
    let o = dev.run(&["install", url]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(code), "expected {code}: {}", text(&o));
    assert!(
        t.elapsed() < Duration::from_mins(1),
        "must not hang past its timeouts: {:?}",
        t.elapsed()
    );
    assert_eq!(dev.status()["last_upgrade"]["error"]["code"], code);
    dev.assert_bootable();
}

#[test]
fn http_errors_stalls_and_bad_bodies_fail_with_a_code_and_never_hang() {
    let dev = Device::new(Options::default());
    let (srv, len) = serve(&dev, "2.0.0");
    let url = srv.url("/fw.fnb");

    srv.set_fault("/fw.fnb", Fault::Status(404));
    failed_within(&dev, &url, "download_failed");
    assert_eq!(srv.requests_for("/fw.fnb").len(), 1, "4xx is not retried");

    srv.reset_counters();
    srv.set_fault("/fw.fnb", Fault::Status(500));
    failed_within(&dev, &url, "download_failed");
    assert_eq!(
        srv.requests_for("/fw.fnb").len(),
        3,
        "retries = 2 → three attempts"
    );

    srv.set_fault("/fw.fnb", Fault::Stall { after: len / 3 });
    failed_within(&dev, &url, "download_failed");

    srv.set_fault("/fw.fnb", Fault::Endless);
    failed_within(&dev, &url, "size_mismatch");

    srv.set_fault("/fw.fnb", Fault::RedirectLoop);
    failed_within(&dev, &url, "download_failed");

    // The server recovers: the same URL installs.
    srv.clear_fault("/fw.fnb");
    let o = dev.run(&["install", &url]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn sigterm_pauses_the_download_and_the_next_install_resumes_it() {
    let dev = Device::new(Options::default());
    let (srv, len) = serve(&dev, "2.0.0");
    srv.set_fault("/fw.fnb", Fault::Stall { after: len / 2 });
    let url = srv.url("/fw.fnb");
    let mut child = dev.cmd(&["install", &url]).spawn().unwrap();
    // The server reached its stall point, so the download is under way (the signal handler is
    // set before it starts); a moment more lets the agent take in what sits in its socket.
    let stalled = || srv.bytes_sent_for("/fw.fnb") >= len / 2;
    assert!(
        flightnode_tests::fleet::wait_until(Duration::from_mins(1), Duration::from_millis(50), stalled),
        "the download never started"
    );
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "SIGTERM pauses with exit 130");
    let s = dev.status();
    assert_eq!(s["phase"], "downloading", "{s:#}");
    let saved = s["progress"]["bytes"].as_u64().unwrap();
    assert!(saved > 0, "the offset is saved: {s:#}");
    assert_eq!(
        s["slots"]["b"]["state"], "bad",
        "a half-written slot is never activated"
    );
    dev.assert_bootable();

    srv.clear_fault("/fw.fnb");
    srv.reset_counters();
    let o = dev.run(&["install", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(srv.bytes_sent() <= len - saved + 1024, "resumed, not restarted");
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", IMAGE));
}

/// Item l: `download_failed` keeps the verified prefix; the same install sent again resumes it
/// with `Range` instead of fetching the image from byte 0.
#[test]
fn the_same_install_after_download_failed_resumes_the_written_prefix() {
    let dev = Device::new(Options::default());
    let (srv, len) = serve(&dev, "2.0.0");
    let url = srv.url("/fw.fnb");
    srv.set_fault("/fw.fnb", Fault::Stall { after: len * 3 / 4 });
    failed_within(&dev, &url, "download_failed");
    assert_eq!(dev.status()["slots"]["b"]["state"], "bad");

    srv.clear_fault("/fw.fnb");
    srv.reset_counters();
    let o = dev.run(&["install", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", IMAGE));
    assert!(
        srv.bytes_sent() < len / 2,
        "resumed: sent {} of a {len}-byte bundle again",
        srv.bytes_sent()
    );
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "committed", "{s:#}");
    dev.assert_bootable();

    // Another bundle after a failure starts from byte 0 (nothing of the old prefix is reused).
    let v3 = dev.bundle("v3", "3.0.0", IMAGE, &[]);
    srv.put_file("/v3.fnb", &v3).unwrap();
    let len3 = std::fs::metadata(&v3).unwrap().len();
    srv.set_fault("/v3.fnb", Fault::Stall { after: len3 / 2 });
    failed_within(&dev, &srv.url("/v3.fnb"), "download_failed");
    let v4 = dev.bundle("v4", "4.0.0", 10_000, &[]);
    let o = dev.run(&["install", v4.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), image_bytes("4.0.0", 10_000));
}

/// Item l: with `retries = 0`, bundles whose length is no power of two install over HTTP in one
/// attempt each. A small bundle's first range reaches past its end before its length is known:
/// the server's shorter `206` is the whole bundle. A larger one's doubling ranges, once the
/// length is known, never reach past its end.
#[test]
fn ranges_never_reach_past_the_bundle_and_a_short_final_range_is_complete() {
    let dev = Device::new(Options::default());
    let config = std::fs::read_to_string(&dev.config).unwrap();
    assert!(config.contains("retries = 2"), "{config}");
    std::fs::write(&dev.config, config.replace("retries = 2", "retries = 0")).unwrap();
    let srv = BundleServer::start_blocking().unwrap();
    for (name, version, size) in [("small", "2.0.0", 10_000), ("large", "3.0.0", 3_000_000)] {
        let bundle = dev.bundle(name, version, size, &[]);
        let len = std::fs::metadata(&bundle).unwrap().len();
        let path = format!("/{name}.fnb");
        srv.put_file(&path, &bundle).unwrap();
        let o = dev.run(&["install", &srv.url(&path)]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert_eq!(dev.status()["committed_version"], version);
        let requests = srv.requests_for(&path);
        assert!(
            requests.iter().all(|r| r.status == 206),
            "{name}: every range is answered, none retried: {requests:?}"
        );
        let ends: Vec<u64> = requests
            .iter()
            .skip(1)
            .filter_map(|r| r.range.as_deref()?.split('-').nth(1)?.parse().ok())
            .collect();
        assert!(
            ends.iter().all(|&end| end < len),
            "{name}: a range past the end of the {len}-byte bundle: {requests:?}"
        );
    }
    dev.assert_bootable();
}
