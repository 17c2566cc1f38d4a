//! Chunked bundles (format 2) over HTTP: only missing chunks travel, resume per chunk, and
//! hostile chunk data or servers end with their own error code and the old firmware untouched.

mod common;
use common::*;
use flightnode_tests::http_server::{BundleServer, Fault};
use std::os::unix::process::ExitStatusExt;

const IMAGE: usize = 4 * 1024 * 1024;

/// An image that compresses like a root filesystem a little: random blocks between text.
fn image(version: &str) -> Vec<u8> {
    let random = image_bytes(version, IMAGE);
    let mut out = Vec::with_capacity(IMAGE);
    let mut i = 0;
    while out.len() < IMAGE {
        let line = format!("file-{i:08} owner=root mode=0644 {}\n", "x".repeat(i % 50));
        out.extend_from_slice(line.as_bytes());
        if i % 64 == 0 {
            let at = out.len().min(IMAGE - 8192);
            out.extend_from_slice(&random[at..at + 8192]);
        }
        i += 1;
    }
    out.truncate(IMAGE);
    out
}

/// The same image with a few regions replaced (files rewritten in place).
fn changed(base: &[u8], version: &str) -> Vec<u8> {
    let mut out = base.to_vec();
    let noise = image_bytes(version, 3 * 40_000);
    for (k, at) in [700_000usize, 2_100_000, 3_500_000].into_iter().enumerate() {
        out[at..at + 40_000].copy_from_slice(&noise[k * 40_000..(k + 1) * 40_000]);
    }
    out
}

fn chunked_bundle(dev: &Device, name: &str, version: &str, bytes: &[u8]) -> std::path::PathBuf {
    let img = dev.path(&format!("{name}.img"));
    std::fs::write(&img, bytes).unwrap();
    dev.bundle_image(name, &img, version, &["--chunked", "--level", "3"])
}

/// The numeric `field` of the agent's log line with `message` in `o` (run with `RUST_LOG=info`).
fn log_field(o: &std::process::Output, message: &str, field: &str) -> u64 {
    // The log's fields, without colour escapes.
    let mut log = String::new();
    let mut escape = false;
    for ch in text(o).chars() {
        match ch {
            '\u{1b}' => escape = true,
            'm' if escape => escape = false,
            _ if escape => {}
            _ => log.push(ch),
        }
    }
    let at = log.find(message).expect(&log);
    let line = &log[at..log[at..].find('\n').map_or(log.len(), |n| at + n)];
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
        .expect(line);
    value.parse::<u64>().unwrap()
}

fn error_code(dev: &Device) -> String {
    dev.status()["last_upgrade"]["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Installs v2 (whole, nothing local matches) then v3 (a few regions changed): v3 fetches a
/// small part of its bundle, with bounded `Range` requests only, and both commit.
#[test]
fn update_fetches_only_the_chunks_the_running_slot_lacks() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let v3 = changed(&v2, "3.0.0");
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
    let b3 = chunked_bundle(&dev, "v3", "3.0.0", &v3);
    let o = dev.run(&[
        "bundle",
        "verify",
        "--key",
        dev.path("keys/release.pub").to_str().unwrap(),
        b3.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let info = dev.run(&["bundle", "info", b3.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("chunks:"),
        "{}",
        text(&info)
    );

    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &b2).unwrap();
    srv.put_file("/v3.fnb", &b3).unwrap();
    let len2 = std::fs::metadata(&b2).unwrap().len();
    let len3 = std::fs::metadata(&b3).unwrap().len();
    assert!(len2 < IMAGE as u64 * 3 / 4, "compressed bundle is {len2} bytes");

    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), v2);
    dev.assert_bootable();

    let o = dev.run(&["install", &srv.url("/v3.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), v3);
    assert_eq!(dev.status()["committed_version"], "3.0.0");
    let sent = srv.bytes_sent_for("/v3.fnb");
    assert!(
        sent < len3 / 4,
        "the update sent {sent} of {len3} bundle bytes; only the changed chunks should travel"
    );
    let requests = srv.requests_for("/v3.fnb");
    // The first request reads the header; every later one is a bounded range.
    assert!(
        requests[1..].iter().all(|r| r
            .range
            .as_deref()
            .is_some_and(|r| r.split('-').nth(1).is_some_and(|e| !e.is_empty()))),
        "{requests:?}"
    );
    assert!(
        std::fs::metadata(dev.path("state/slot-a.idx")).is_ok(),
        "index of the new slot cached"
    );
}

/// SIGKILL in the middle of fetching chunks: the next install fetches only what had not been
/// written, and the image is exact.
#[test]
fn sigkill_mid_fetch_resumes_without_refetching_written_chunks() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &b2).unwrap();
    let len = std::fs::metadata(&b2).unwrap().len();
    let kill_at = len / 2;
    let o = dev
        .cmd(&["install", &srv.url("/v2.fnb")])
        .env("FLIGHTNODE_FAILPOINT", format!("download@{kill_at}"))
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(9), "{}", text(&o));
    assert_eq!(dev.status()["phase"], "downloading");
    dev.assert_bootable();
    let first = srv.bytes_sent_for("/v2.fnb");
    srv.reset_counters();

    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), v2);
    let second = srv.bytes_sent_for("/v2.fnb");
    assert!(
        second < len - kill_at / 2,
        "resume sent {second} bytes of a {len}-byte bundle after {first} were sent and {kill_at} written"
    );
}

/// A flipped byte inside one chunk's compressed data: `chunk_invalid`, running slot untouched.
#[test]
fn corrupt_chunk_is_refused_with_chunk_invalid_and_the_old_slot_untouched() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
    let mut bytes = std::fs::read(&b2).unwrap();
    // Near the end: inside chunks.zst, before the archive's zero tail.
    let at = bytes.len() - 3 * 1024 - 1500;
    bytes[at] ^= 0x5a;
    let srv = BundleServer::start_blocking().unwrap();
    srv.put("/bad.fnb", bytes);
    let o = dev.run(&["install", &srv.url("/bad.fnb")]);
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(error_code(&dev), "chunk_invalid", "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), b"factory image");
    dev.assert_bootable();
}

/// A server that answers `Range` with the whole bundle: `range_unsupported`, old slot untouched,
/// and the whole bundle is not read over and over.
#[test]
fn server_ignoring_range_fails_with_range_unsupported() {
    let dev = Device::new(Options::default());
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &image("2.0.0"));
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &b2).unwrap();
    srv.set_fault("/v2.fnb", Fault::IgnoreRange);
    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(error_code(&dev), "range_unsupported", "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), b"factory image");
    assert!(
        srv.requests_for("/v2.fnb").len() <= 2,
        "{:?}",
        srv.requests_for("/v2.fnb")
    );
    dev.assert_bootable();
}

/// Format-1 bundles still install next to format-2 ones.
#[test]
fn plain_bundle_still_installs_after_a_chunked_one() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
    let o = dev.run(&["install", b2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let b3 = dev.bundle("v3", "3.0.0", 100_000, &[]);
    let o = dev.run(&["install", b3.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), image_bytes("3.0.0", 100_000));
    dev.assert_bootable();
}

/// Re-signs `bundle` with the device's key after `edit` changed its chunk index (as a hostile
/// build server could): the signature verifies, so only the index checks stand in the way.
fn resign(
    dev: &Device,
    bundle: &std::path::Path,
    edit: impl Fn(&mut Vec<flightnode_proto::chunks::Chunk>),
) -> Vec<u8> {
    resign_with(dev, bundle, edit, |_| {})
}

/// [`resign`], also editing the manifest (before it is signed).
fn resign_with(
    dev: &Device,
    bundle: &std::path::Path,
    edit: impl Fn(&mut Vec<flightnode_proto::chunks::Chunk>),
    edit_manifest: impl Fn(&mut serde_json::Value),
) -> Vec<u8> {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    use flightnode_proto::chunks::ChunkIndex;
    use sha2::Digest as _;
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        entries.push((name, bytes));
    }
    let mut index = ChunkIndex::decode(&entries[2].1).unwrap();
    edit(&mut index.chunks);
    entries[2].1 = index.encode();
    let mut manifest: serde_json::Value = serde_json::from_slice(&entries[0].1).unwrap();
    manifest["chunks"]["index_sha256"] = hex::encode(sha2::Sha256::digest(&entries[2].1)).into();
    edit_manifest(&mut manifest);
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    let key = flightnode_agent::bundle::load_signing_key(&dev.key()).unwrap();
    let sig = serde_json::json!({
        "algorithm": "ed25519",
        "key_id": flightnode_agent::bundle::key_id(&key.verifying_key()),
        "signature": base64::engine::general_purpose::STANDARD.encode(key.sign(&manifest_bytes).to_bytes()),
    });
    entries[0].1 = manifest_bytes;
    entries[1].1 = serde_json::to_vec(&sig).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in &entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, bytes.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A signed index whose frame lies past the bundle, or whose chunks overlap: refused as
/// `malformed_bundle` before anything is written; the running slot is untouched.
#[test]
fn hostile_chunk_index_is_refused_before_any_write() {
    let dev = Device::new(Options::default());
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &image("2.0.0"));
    let srv = BundleServer::start_blocking().unwrap();
    let outside = resign(&dev, &b2, |c| c[1].data_offset = u64::MAX / 2);
    let overlap = resign(&dev, &b2, |c| {
        c[1].offset -= 100;
        c[1].size += 100;
    });
    for (name, bytes, needle) in [("outside", outside, "outside"), ("overlap", overlap, "overlap")] {
        let path = format!("/{name}.fnb");
        srv.put(&path, bytes);
        let o = dev.run(&["install", &srv.url(&path)]);
        assert!(!o.status.success(), "{}", text(&o));
        assert_eq!(error_code(&dev), "malformed_bundle", "{name}: {}", text(&o));
        let message = dev.status()["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(dev.slot_bytes("a"), b"factory image");
        assert!(
            dev.slot_bytes("b").is_empty(),
            "{name}: nothing written to slot b"
        );
        dev.assert_bootable();
    }
}

/// Bundles with independent frames (`--window-kib 0`, the layout of the first format-2 agents)
/// still install, and an update from such an image to one with chunk contexts fetches only the
/// changed chunks. `bundle info` tells the two apart.
#[test]
fn independent_frame_bundles_still_install_next_to_context_ones() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let v3 = changed(&v2, "3.0.0");
    let img2 = dev.path("v2.img");
    std::fs::write(&img2, &v2).unwrap();
    let b2 = dev.bundle_image(
        "v2",
        &img2,
        "2.0.0",
        &["--chunked", "--level", "3", "--window-kib", "0"],
    );
    let b3 = chunked_bundle(&dev, "v3", "3.0.0", &v3);
    let info = |b: &std::path::Path| {
        let o = dev.run(&["bundle", "info", b.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(info(&b2).contains("context:  none"), "{}", info(&b2));
    assert!(info(&b3).contains("bytes before each"), "{}", info(&b3));
    let len3 = std::fs::metadata(&b3).unwrap().len();

    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &b2).unwrap();
    srv.put_file("/v3.fnb", &b3).unwrap();
    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), v2);
    let o = dev.run(&["install", &srv.url("/v3.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), v3);
    let sent = srv.bytes_sent_for("/v3.fnb");
    assert!(sent < len3 / 4, "the update sent {sent} of {len3} bundle bytes");
    dev.assert_bootable();
}

/// A signed manifest whose context does not match how the frames were made (a build server bug
/// or a hostile one): the frames decode to other bytes or not at all, `chunk_invalid`, the
/// running slot untouched. A context window over the cap is refused before anything is written.
#[test]
fn wrong_or_oversized_chunk_context_is_refused() {
    let dev = Device::new(Options::default());
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &image("2.0.0"));
    let srv = BundleServer::start_blocking().unwrap();
    // Half the segment: every other segment's chunks get a context that ends elsewhere.
    // (A shorter window alone can still decode: its bytes end where the real context ends.)
    let halved = resign_with(
        &dev,
        &b2,
        |_| {},
        |m| {
            let s = m["chunks"]["context"]["segment"].as_u64().unwrap();
            m["chunks"]["context"]["segment"] = (s / 2).into();
        },
    );
    let dropped = resign_with(
        &dev,
        &b2,
        |_| {},
        |m| {
            m["chunks"].as_object_mut().unwrap().remove("context");
        },
    );
    let huge = resign_with(
        &dev,
        &b2,
        |_| {},
        |m| {
            m["chunks"]["context"]["window"] = (64u64 << 20).into();
        },
    );
    for (name, bytes, code, needle) in [
        ("halved", halved, "chunk_invalid", "chunk"),
        ("dropped", dropped, "chunk_invalid", "chunk"),
        ("huge", huge, "malformed_bundle", "context window"),
    ] {
        let path = format!("/{name}.fnb");
        srv.put(&path, bytes);
        let o = dev.run(&["install", &srv.url(&path)]);
        assert!(!o.status.success(), "{name}: {}", text(&o));
        assert_eq!(error_code(&dev), code, "{name}: {}", text(&o));
        let message = dev.status()["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(dev.slot_bytes("a"), b"factory image", "{name}");
        dev.assert_bootable();
    }
    // The same bundle, untouched, installs.
    srv.put_file("/v2.fnb", &b2).unwrap();
    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), image("2.0.0"));
}

/// A fresh install over a slot whose cached index lists an older image keeps that image's
/// matching chunks in place (read and hashed, not copied or fetched); a slot without a cache is
/// not read for them.
#[test]
fn chunks_the_target_slot_already_holds_stay_in_place() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let v3 = changed(&v2, "3.0.0");
    let v4 = changed(&v2, "4.0.0");
    let srv = BundleServer::start_blocking().unwrap();
    for (name, version, bytes) in [("v2", "2.0.0", &v2), ("v3", "3.0.0", &v3), ("v4", "4.0.0", &v4)] {
        let b = chunked_bundle(&dev, name, version, bytes);
        srv.put_file(&format!("/{name}.fnb"), &b).unwrap();
    }
    let kept = |o: &std::process::Output| log_field(o, "chunked image written and verified", "kept");
    let install = |name: &str| {
        let o = dev
            .cmd(&["install", &srv.url(&format!("/{name}.fnb"))])
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        o
    };
    let o = install("v2");
    assert_eq!(kept(&o), 0, "slot b held no chunked image");
    install("v3");
    // v4 goes to slot b, which still holds v2 and its cached index.
    let o = install("v4");
    assert_eq!(dev.slot_bytes("b"), v4);
    assert!(kept(&o) > (IMAGE as u64) / 2, "{}", text(&o));
    dev.assert_bootable();
}

/// `--chunk-kib` sets the chunk sizes: an update whose changes are small and scattered (a version
/// string and a signature in every kernel module) fetches less with 16 KiB chunks than with the
/// default 64 KiB, over a running slot installed from a 64 KiB bundle (its cached index is cut
/// again with the new sizes), and the image is exact either way.
#[test]
fn smaller_chunks_fetch_less_of_scattered_changes() {
    let v2 = image("2.0.0");
    let mut v3 = v2.clone();
    for at in (100_000..IMAGE - 64).step_by(300_000) {
        v3[at..at + 24].copy_from_slice(b"6.1.0-50-arm64 signed:v3");
    }
    let sent_with = |chunk_kib: &str| {
        let dev = Device::new(Options::default());
        let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
        let img3 = dev.path("v3.img");
        std::fs::write(&img3, &v3).unwrap();
        let b3 = dev.bundle_image(
            "v3",
            &img3,
            "3.0.0",
            &["--chunked", "--level", "3", "--chunk-kib", chunk_kib],
        );
        let info = dev.run(&["bundle", "info", b3.to_str().unwrap()]);
        let avg = format!("/{}/", chunk_kib.parse::<u32>().unwrap() * 1024);
        assert!(
            String::from_utf8_lossy(&info.stdout).contains(&avg),
            "{}",
            text(&info)
        );
        let srv = BundleServer::start_blocking().unwrap();
        srv.put_file("/v2.fnb", &b2).unwrap();
        srv.put_file("/v3.fnb", &b3).unwrap();
        let o = dev.run(&["install", &srv.url("/v2.fnb")]);
        assert!(o.status.success(), "{}", text(&o));
        let o = dev.run(&["install", &srv.url("/v3.fnb")]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(dev.slot_bytes("a"), v3);
        dev.assert_bootable();
        srv.bytes_sent_for("/v3.fnb")
    };
    let (small, default) = (sent_with("16"), sent_with("64"));
    assert!(
        small * 2 < default,
        "16 KiB chunks sent {small} bytes, 64 KiB chunks {default}: small chunks should fetch well under half"
    );
}

/// `--segment-kib` is carried in the signed manifest (`bundle info` shows it), a device decodes
/// the frames with it, and a smaller segment gives later chunks of a segment more of the bytes
/// just before them as context: a smaller bundle.
#[test]
fn segment_size_reaches_the_manifest_and_smaller_segments_compress_better() {
    let dev = Device::new(Options::default());
    let v2 = image("2.0.0");
    let img = dev.path("v2.img");
    std::fs::write(&img, &v2).unwrap();
    let bundle = |name: &str, segment_kib: &str| {
        let b = dev.bundle_image(
            name,
            &img,
            "2.0.0",
            &[
                "--chunked",
                "--level",
                "3",
                "--window-kib",
                "1024",
                "--segment-kib",
                segment_kib,
            ],
        );
        let info = dev.run(&["bundle", "info", b.to_str().unwrap()]);
        let want = format!(
            "before each {}-byte segment",
            segment_kib.parse::<u32>().unwrap() * 1024
        );
        assert!(
            String::from_utf8_lossy(&info.stdout).contains(&want),
            "{}",
            text(&info)
        );
        b
    };
    let (small, large) = (bundle("small", "64"), bundle("large", "1024"));
    let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    assert!(
        len(&small) < len(&large),
        "64 KiB segments made {} bytes, 1 MiB segments {}",
        len(&small),
        len(&large)
    );
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &small).unwrap();
    let o = dev.run(&["install", &srv.url("/v2.fnb")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), v2);
    dev.assert_bootable();
}

/// Item m: an update killed part way (SIGKILL) and resumed keeps what reached the target slot,
/// copies from the running slot what it has, and fetches only the chunks neither slot holds, in
/// coalesced ranges: the resume fetches fewer bytes with fewer requests than the whole update
/// does uninterrupted (measured at the server on a twin device), and the image verifies.
#[test]
fn a_resumed_update_copies_from_the_running_slot_and_fetches_only_what_neither_slot_holds() {
    let v2 = image("2.0.0");
    let v3 = changed(&v2, "3.0.0");
    let dev = Device::new(Options::default());
    let twin = Device::new(Options::default());
    // The twin trusts the same key, so both install the same bundles from the same server.
    std::fs::copy(dev.path("keys/release.pub"), twin.path("keys/release.pub")).unwrap();
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", chunked_bundle(&dev, "v2", "2.0.0", &v2))
        .unwrap();
    srv.put_file("/v3.fnb", chunked_bundle(&dev, "v3", "3.0.0", &v3))
        .unwrap();
    let install = |d: &Device, path: &str, failpoint: Option<&str>| {
        let mut cmd = d.cmd(&["install", &srv.url(path)]);
        cmd.env("RUST_LOG", "info");
        if let Some(f) = failpoint {
            cmd.env("FLIGHTNODE_FAILPOINT", f);
        }
        cmd.output().unwrap()
    };
    for d in [&dev, &twin] {
        let o = install(d, "/v2.fnb", None);
        assert!(o.status.success(), "{}", text(&o));
    }

    srv.reset_counters();
    let o = install(&twin, "/v3.fnb", None);
    assert!(o.status.success(), "{}", text(&o));
    let (whole_bytes, whole_requests) = (srv.bytes_sent_for("/v3.fnb"), srv.requests_for("/v3.fnb").len());

    // Killed once the first changed chunk was fetched and written, about a quarter in.
    let o = install(&dev, "/v3.fnb", Some("download@1"));
    assert_eq!(o.status.signal(), Some(9), "{}", text(&o));
    assert_eq!(dev.status()["phase"], "downloading");
    dev.assert_bootable();
    srv.reset_counters();
    let o = install(&dev, "/v3.fnb", None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("a"), v3);
    assert_eq!(dev.status()["committed_version"], "3.0.0");
    dev.assert_bootable();

    let (bytes, requests) = (srv.bytes_sent_for("/v3.fnb"), srv.requests_for("/v3.fnb"));
    let done = "chunked image written and verified";
    assert!(
        log_field(&o, done, "kept") > 0 && log_field(&o, done, "copied") > 0,
        "the resume keeps the written chunks and copies from the running slot: {}",
        text(&o)
    );
    assert!(
        bytes < whole_bytes && requests.len() <= whole_requests,
        "the resume fetched {bytes} bytes in {} requests, the whole update {whole_bytes} in {whole_requests}: {requests:?}",
        requests.len()
    );
    assert_eq!(
        log_field(&o, "chunk plan made", "to_fetch"),
        log_field(&o, done, "fetched"),
        "progress counts the bytes still to download"
    );
}

/// A device whose config sets `download.chunk_workers`.
fn device_with_workers(workers: usize) -> Device {
    let dev = Device::new(Options::default());
    let config = std::fs::read_to_string(&dev.config).unwrap();
    let config = config.replacen(
        "[download]\n",
        &format!("[download]\nchunk_workers = {workers}\n"),
        1,
    );
    std::fs::write(&dev.config, config).unwrap();
    dev
}

/// The numeric fields of the agent's "chunked image written and verified" line.
fn tally(o: &std::process::Output) -> [u64; 4] {
    let message = "chunked image written and verified";
    ["workers", "kept", "copied", "fetched"].map(|field| log_field(o, message, field))
}

/// The same installs with the chunks decompressed on the fetching thread (`chunk_workers = 1`)
/// and on three workers: a fresh install cut by SIGKILL half way and resumed (chunks the slot
/// holds are read back by the workers), an update (most chunks copied from the running slot),
/// a bundle of small independent frames and an update with small chunks and a small segment (so
/// the pass waits for a context every few chunks). Each slot holds the image, and the chunks
/// come from the same places with either.
#[test]
fn chunk_workers_write_the_same_images_as_the_inline_pass() {
    let v2 = image("2.0.0");
    let v3 = changed(&v2, "3.0.0");
    let v4 = image("4.0.0");
    let v5 = changed(&v4, "5.0.0");
    let small = ["--chunk-kib", "16"];
    let installs: [(&str, &[u8], &[&str], &str); 4] = [
        ("2.0.0", &v2, &[], "b"),
        ("3.0.0", &v3, &[], "a"),
        ("4.0.0", &v4, &[small[0], small[1], "--window-kib", "0"], "b"),
        ("5.0.0", &v5, &[small[0], small[1], "--segment-kib", "32"], "a"),
    ];
    let mut seen = Vec::new();
    for workers in [1, 3] {
        let dev = device_with_workers(workers);
        let srv = BundleServer::start_blocking().unwrap();
        let mut tallies = Vec::new();
        for (k, &(version, bytes, flags, slot)) in installs.iter().enumerate() {
            let img = dev.path(&format!("{version}.img"));
            std::fs::write(&img, bytes).unwrap();
            let args = [&["--chunked", "--level", "3"], flags].concat();
            let bundle = dev.bundle_image(version, &img, version, &args);
            let url = srv.url(&format!("/{version}.fnb"));
            srv.put_file(&format!("/{version}.fnb"), &bundle).unwrap();
            if k == 0 {
                let kill_at = std::fs::metadata(&bundle).unwrap().len() / 2;
                let o = dev
                    .cmd(&["install", &url])
                    .env("FLIGHTNODE_FAILPOINT", format!("download@{kill_at}"))
                    .output()
                    .unwrap();
                assert_eq!(o.status.signal(), Some(9), "{workers} workers: {}", text(&o));
                assert_eq!(dev.status()["phase"], "downloading");
            }
            let o = dev
                .cmd(&["install", &url])
                .env("RUST_LOG", "info")
                .output()
                .unwrap();
            assert!(o.status.success(), "{workers} workers, {version}: {}", text(&o));
            assert_eq!(dev.slot_bytes(slot), bytes, "{workers} workers, {version}");
            let [used, kept, copied, fetched] = tally(&o);
            assert_eq!(used, workers as u64, "{version}");
            tallies.push([kept, copied, fetched]);
        }
        dev.assert_bootable();
        assert!(tallies[0][0] > 0, "{workers} workers: the resume kept nothing");
        assert!(
            tallies[1][1] > (IMAGE as u64) / 2,
            "{workers} workers: {tallies:?}"
        );
        seen.push(tallies);
    }
    assert_eq!(
        seen[0], seen[1],
        "kept, copied and fetched bytes with 1 worker and with 3"
    );
}

/// Two flipped bytes in the chunk data, one half way and one near the end: with three workers
/// (which may find the later one first) as with one, `chunk_invalid` naming the same, first bad
/// chunk, and the running slot untouched.
#[test]
fn a_corrupt_chunk_is_refused_alike_with_workers() {
    let v2 = image("2.0.0");
    let mut named = Vec::new();
    for workers in [1, 3] {
        let dev = device_with_workers(workers);
        let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
        let mut bytes = std::fs::read(&b2).unwrap();
        for at in [bytes.len() / 2, bytes.len() - 3 * 1024 - 1500] {
            bytes[at] ^= 0x5a;
        }
        let srv = BundleServer::start_blocking().unwrap();
        srv.put("/bad.fnb", bytes);
        let o = dev.run(&["install", &srv.url("/bad.fnb")]);
        assert!(!o.status.success(), "{}", text(&o));
        assert_eq!(
            error_code(&dev),
            "chunk_invalid",
            "{workers} workers: {}",
            text(&o)
        );
        let message = dev.status()["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let chunk = message
            .split(" (image bytes")
            .next()
            .unwrap_or_default()
            .to_owned();
        assert!(chunk.starts_with("chunk "), "{workers} workers: {message}");
        named.push(chunk);
        assert_eq!(dev.slot_bytes("a"), b"factory image");
        dev.assert_bootable();
    }
    assert_eq!(named[0], named[1], "the first bad chunk is named with either");
}

/// SIGTERM while three chunk workers are at work and the server stalls half way: the agent
/// pauses at once (exit 130), the slot is never activated, and the next install keeps what the
/// workers verified and fetches the rest.
#[test]
fn sigterm_pauses_a_pass_with_chunk_workers_promptly() {
    let dev = device_with_workers(3);
    let v2 = image("2.0.0");
    let b2 = chunked_bundle(&dev, "v2", "2.0.0", &v2);
    let len = std::fs::metadata(&b2).unwrap().len();
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/v2.fnb", &b2).unwrap();
    srv.set_fault("/v2.fnb", Fault::Stall { after: len / 2 });
    let url = srv.url("/v2.fnb");
    let mut child = dev.cmd(&["install", &url]).spawn().unwrap();
    let stalled = || srv.bytes_sent_for("/v2.fnb") >= len / 2;
    assert!(
        flightnode_tests::fleet::wait_until(
            std::time::Duration::from_mins(1),
            std::time::Duration::from_millis(50),
            stalled
        ),
        "the download never started"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let signalled = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "SIGTERM pauses with exit 130");
    assert!(
        signalled.elapsed() < std::time::Duration::from_secs(3),
        "paused {:?} after the signal",
        signalled.elapsed()
    );
    let s = dev.status();
    assert_eq!(s["phase"], "downloading", "{s:#}");
    assert_eq!(s["slots"]["b"]["state"], "bad", "{s:#}");
    dev.assert_bootable();

    srv.clear_fault("/v2.fnb");
    let o = dev
        .cmd(&["install", &url])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dev.slot_bytes("b"), v2);
    let [workers, kept, _, _] = tally(&o);
    assert_eq!(workers, 3);
    assert!(kept > 0, "the resume kept nothing the workers verified");
}
