//! The install flow through the real binary, in command mode on file slots.

mod common;
use common::*;

#[test]
fn install_commits_switches_pointer_and_runs_apply() {
    let dev = Device::new(Options::default());
    let bundle = dev.bundle("v2", "2.0.0", 300_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("committed"), "{}", text(&o));

    let s = dev.status();
    assert_eq!(s["active_slot"], "b");
    assert_eq!(s["booted_slot"], "b");
    assert_eq!(s["slots"]["b"]["state"], "good");
    assert_eq!(s["slots"]["b"]["version"], "2.0.0");
    assert_eq!(
        s["slots"]["a"]["state"], "good",
        "the old slot stays a good fallback"
    );
    assert_eq!(s["phase"], "idle");
    assert_eq!(s["last_upgrade"]["result"], "committed");
    assert_eq!(s["committed_version"], "2.0.0");
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", 300_000));
    assert_eq!(dev.pointer(), dev.path("slots/b.img"));
    assert_eq!(
        dev.applied(),
        format!("b 2.0.0 {}\n", dev.path("slots/b.img").display())
    );

    // The next install goes to the other slot.
    let v3 = dev.bundle("v3", "3.0.0", 1000, &["--security-version", "2"]);
    let o = dev.run(&["install", v3.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["active_slot"], "a");
    assert_eq!(s["slots"]["a"]["version"], "3.0.0");
    assert_eq!(s["security_floor"], 2);
    dev.assert_bootable();
}

#[test]
fn same_version_is_already_installed_and_writes_nothing() {
    let dev = Device::new(Options::default());
    let bundle = dev.bundle("v1", "1.0.0", 1000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "already_installed is a success: {}", text(&o));
    assert!(text(&o).contains("already installed"), "{}", text(&o));
    assert!(!dev.path("slots/b.img").exists(), "nothing may be written");
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "already_installed");
    assert_eq!(s["active_slot"], "a");
}

fn assert_rejected(dev: &Device, bundle: &std::path::Path, code: &str, extra: &[&str]) {
    let before = dev.status();
    let applied = dev.applied();
    let mut args = vec!["install", bundle.to_str().unwrap()];
    args.extend(extra);
    let o = dev.run(&args);
    assert!(!o.status.success(), "{code}: must fail: {}", text(&o));
    assert!(text(&o).contains(code), "expected {code}: {}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["error"]["code"], code, "{s:#}");
    assert_eq!(
        s["active_slot"], before["active_slot"],
        "{code}: active slot must not change"
    );
    let active = before["active_slot"].as_str().unwrap();
    assert_eq!(
        s["slots"][active], before["slots"][active],
        "{code}: active slot untouched"
    );
    assert_eq!(s["committed_version"], before["committed_version"]);
    assert_eq!(
        dev.applied(),
        applied,
        "{code}: a rejected bundle is never applied"
    );
    dev.assert_bootable();
}

#[test]
fn downgrade_and_security_floor() {
    let dev = Device::new(Options {
        factory_version: Some("2.0.0".into()),
        ..Options::default()
    });
    let old = dev.bundle("old", "1.5.0", 1000, &[]);
    assert_rejected(&dev, &old, "downgrade", &[]);
    // Explicitly allowed for this install: it goes through.
    let o = dev.run(&["install", old.to_str().unwrap(), "--allow-downgrade"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.status()["committed_version"], "1.5.0");

    let secure = dev.bundle("secure", "3.0.0", 1000, &["--security-version", "5"]);
    assert!(dev.run(&["install", secure.to_str().unwrap()]).status.success());
    let below = dev.bundle("below", "4.0.0", 1000, &["--security-version", "4"]);
    assert_rejected(&dev, &below, "downgrade", &["--allow-downgrade"]);
}

#[test]
fn foreign_expired_and_forged_bundles_are_rejected_with_their_code() {
    let dev = Device::new(Options::default());
    let other = dev.bundle("other", "2.0.0", 1000, &["--compatible", "some-other-board"]);
    assert_rejected(&dev, &other, "incompatible_hardware", &[]);

    let expired = dev.bundle("expired", "2.0.0", 1000, &["--expires-in", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_rejected(&dev, &expired, "expired", &[]);

    // Signed by a key the device does not trust.
    let stranger = dev.path("stranger");
    assert!(
        agent(&["keygen", "--out-dir", stranger.to_str().unwrap()])
            .status
            .success()
    );
    let image = dev.path("img");
    std::fs::write(&image, image_bytes("x", 1000)).unwrap();
    let out = dev.path("untrusted.fnb");
    let o = agent(&[
        "bundle",
        "create",
        "--key",
        stranger.join("release.key").to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--version",
        "2.0.0",
        "--compatible",
        HARDWARE,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_rejected(&dev, &out, "untrusted_key", &[]);
}

/// Flips one byte at `offset` of a copy of `bundle`.
fn flipped(dev: &Device, bundle: &std::path::Path, offset: usize, name: &str) -> std::path::PathBuf {
    let mut bytes = std::fs::read(bundle).unwrap();
    bytes[offset] ^= 0x40;
    let out = dev.path(name);
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn corrupt_bundles_never_reach_an_active_slot() {
    let dev = Device::new(Options::default());
    let good = dev.bundle("good", "2.0.0", 50_000, &[]);
    let bytes = std::fs::read(&good).unwrap();
    // Layout: 512 header + manifest (padded), 512 header + signature (padded), 512 header + image.
    let image_start = bytes.len() - 50_000 - 1024 - (bytes.len() - 50_000 - 1024) % 512;
    let manifest_byte = 512 + 40;
    let sig_byte = bytes.windows(9).position(|w| w == b"signature").unwrap() + 16;
    let cases = [
        (manifest_byte, &["signature_invalid", "malformed_bundle"][..]),
        (sig_byte, &["signature_invalid", "malformed_bundle"][..]),
        (image_start + 1000, &["hash_mismatch"][..]),
        (bytes.len() - 50_000 / 2 - 2048, &["hash_mismatch"][..]),
    ];
    for (i, (offset, codes)) in cases.iter().enumerate() {
        let bad = flipped(&dev, &good, *offset, &format!("bad{i}.fnb"));
        let o = dev.run(&["install", bad.to_str().unwrap()]);
        assert!(!o.status.success(), "flip at {offset} accepted: {}", text(&o));
        let code = dev.status()["last_upgrade"]["error"]["code"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            codes.contains(&code.as_str()),
            "flip at {offset}: got {code}, expected one of {codes:?}"
        );
        dev.assert_bootable();
        assert_eq!(dev.status()["active_slot"], "a");
    }
    // Truncated inside the image, and extra bytes past the image.
    let truncated = dev.path("truncated.fnb");
    std::fs::write(&truncated, &bytes[..bytes.len() - 30_000]).unwrap();
    assert_rejected(&dev, &truncated, "size_mismatch", &[]);
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0x55; 4096]);
    let extra = dev.path("extra.fnb");
    std::fs::write(&extra, longer).unwrap();
    assert_rejected(&dev, &extra, "size_mismatch", &[]);
    assert_eq!(
        dev.status()["slots"]["b"]["state"],
        "bad",
        "a half-written slot is marked bad"
    );

    // After all of that, the genuine bundle still installs.
    let o = dev.run(&["install", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    dev.assert_bootable();
}

#[test]
fn failed_health_check_rolls_back_to_the_old_slot() {
    let dev = Device::new(Options {
        health: Some("test \"$FLIGHTNODE_VERSION\" != 2.0.0".into()),
        ..Options::default()
    });
    let bundle = dev.bundle("v2", "2.0.0", 10_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rolled_back"), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "rolled_back");
    assert_eq!(s["last_upgrade"]["error"]["code"], "health_check_failed");
    assert_eq!(s["active_slot"], "a");
    assert_eq!(s["slots"]["a"]["state"], "good");
    assert_eq!(s["slots"]["b"]["state"], "bad");
    assert_eq!(dev.pointer(), dev.path("slots/a.img"));
    // Applied b, then re-applied a.
    let applied: Vec<_> = dev
        .applied()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(applied, ["b", "a"]);
    dev.assert_bootable();
}

#[test]
fn status_and_mark_commands() {
    let dev = Device::new(Options::default());
    let o = dev.run(&["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("slot a: good"), "{}", text(&o));
    let o = dev.run(&["mark-bad", "a"]);
    assert!(
        !o.status.success(),
        "marking the active slot bad is refused: {}",
        text(&o)
    );
    let o = dev.run(&["mark-good", "b"]);
    assert!(!o.status.success(), "an empty slot cannot be good: {}", text(&o));
    let o = dev.run(&["install", "/nonexistent/bundle.fnb"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("download_failed") && text(&o).contains("/nonexistent/bundle.fnb"),
        "{}",
        text(&o)
    );
}

#[test]
fn bundle_verify_prints_the_manifest_or_says_why_not() {
    let dev = Device::new(Options::default());
    let good = dev.bundle("v2", "2.0.0", 5000, &[]);
    let public = dev.path("keys/release.pub");
    let o = agent(&[
        "bundle",
        "verify",
        "--key",
        public.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("\"version\": \"2.0.0\"") && text(&o).contains("OK"),
        "{}",
        text(&o)
    );

    let mut bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n - 2000] ^= 1;
    let bad = dev.path("bad.fnb");
    std::fs::write(&bad, &bytes).unwrap();
    let o = agent(&[
        "bundle",
        "verify",
        "--key",
        public.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("hash_mismatch"), "{}", text(&o));

    std::fs::write(&bad, &bytes[..700]).unwrap();
    let o = agent(&[
        "bundle",
        "verify",
        "--key",
        public.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("malformed_bundle") && text(&o).contains("truncated"),
        "{}",
        text(&o)
    );

    let stranger = dev.path("stranger");
    assert!(
        agent(&["keygen", "--out-dir", stranger.to_str().unwrap()])
            .status
            .success()
    );
    let o = agent(&[
        "bundle",
        "verify",
        "--key",
        stranger.join("release.pub").to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("untrusted_key"), "{}", text(&o));
}
