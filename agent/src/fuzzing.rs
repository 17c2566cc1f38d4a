//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` and the smoke test that runs
//! them in `cargo test`. Each one asserts the invariant a user relies on; a panic is a finding.

use crate::bundle::{self, TrustedKeys};
use ed25519_dalek::SigningKey;
use std::io::Write;

/// The fixed key the bundle target trusts, so mutated bundles get past the signature check and
/// the manifest parser, size caps and image copy are fuzzed too.
pub fn fuzz_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// Writes [`fuzz_key`] as a PKCS#8 PEM file, for making seed bundles with `bundle::create`.
pub fn write_fuzz_key(path: &std::path::Path) -> std::io::Result<()> {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let pem = fuzz_key()
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(std::io::Error::other)?;
    std::fs::write(path, pem.as_bytes())
}

/// Any payload on `firmware/<id>/upgrade` parses to a command or a reason, never panics, and a
/// command always has a bounded id and an http(s) URL.
pub fn mqtt_command(data: &[u8]) {
    match flightnode_proto::mqtt::parse_command(data, "drone-fuzz") {
        Ok(flightnode_proto::mqtt::Command::Upgrade(u)) => {
            assert!(!u.upgrade_id.is_empty() && u.upgrade_id.len() <= 128);
            assert!(u.url.starts_with("http://") || u.url.starts_with("https://"));
        }
        Ok(flightnode_proto::mqtt::Command::Cancel { upgrade_id }) => assert!(!upgrade_id.is_empty()),
        Err(e) => assert!(!e.0.is_empty()),
    }
}

/// Counts what reaches the "slot" and refuses to take more than `cap`.
struct CappedSink {
    written: u64,
    cap: u64,
}

impl Write for CappedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len() as u64;
        assert!(
            self.written <= self.cap,
            "wrote {} bytes, manifest says {}",
            self.written,
            self.cap
        );
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Any byte stream read as a bundle signed by [`fuzz_key`] is verified or refused with a code,
/// never panics, and never puts more than the manifest's `size` bytes into the slot.
pub fn bundle_reader(data: &[u8]) {
    let keys = TrustedKeys::new(vec![fuzz_key().verifying_key()]);
    let mut r = data;
    let result = bundle::read_header(&mut r, &keys).and_then(|header| {
        let mut sink = CappedSink {
            written: 0,
            cap: header.manifest.image.size,
        };
        bundle::copy_image(&mut r, &mut sink, &header.manifest, 0, sha2::Sha256::default())
    });
    if let Err(e) = result {
        let _ = e.code();
        assert!(!e.to_string().is_empty());
    }
}
