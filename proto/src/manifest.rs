//! The bundle manifest and the bundle file layout.
//!
//! # Bundle layout
//! A bundle is a POSIX tar archive (ustar) with exactly three regular-file entries, in this order:
//!
//! | entry           | content                                                           | cap      |
//! |-----------------|-------------------------------------------------------------------|----------|
//! | `manifest.json` | [`Manifest`] as JSON; these exact bytes are what is signed        | 64 KiB   |
//! | `manifest.sig`  | [`Signature`] as JSON: the signing key's id and the ed25519 signature | 4 KiB |
//! | `image`         | the firmware image, exactly `image.size` bytes                    | manifest |
//!
//! Manifest and signature come first, so a device verifies them before a single image byte
//! reaches a slot, then streams the image with a running sha256 and a hard cut at `size`.
//!
//! # Chunked bundles (format 2)
//! Format 2 replaces the `image` entry with two entries, still after manifest and signature:
//!
//! | entry        | content                                                            | cap        |
//! |--------------|--------------------------------------------------------------------|------------|
//! | `chunks.idx` | the chunk index ([`crate::chunks`]): per chunk its sha256, size, offset in the image, offset and length in `chunks.zst` | [`MAX_INDEX_BYTES`] |
//! | `chunks.zst` | the chunks, one zstd frame each, in image order                    | manifest   |
//!
//! With [`ChunksInfo::context`] each frame is compressed against the image bytes before its
//! segment ([`ContextInfo`]), which a device writing the image in order holds when it needs
//! them; without it every frame decodes on its own.
//!
//! The manifest's [`ChunksInfo`] carries the index's size and sha256, so the signature covers
//! every chunk hash (and the context, which decides what the frames decode to); `image.size` and `image.sha256` still describe the whole image, which the
//! device checks before the switch as for format 1. The chunks are content-defined (FastCDC
//! 2020 with the manifest's sizes), so unchanged regions of two image versions give the same
//! chunks: a device copies those from its running slot and fetches only the others, with HTTP
//! `Range` requests into `chunks.zst`.
//! `tar tvf bundle.fnb` lists it; `tar xOf bundle.fnb manifest.json` shows the manifest.
//! Entry names are matched exactly and never used as paths.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Name of the manifest entry.
pub const MANIFEST_ENTRY: &str = "manifest.json";
/// Name of the signature entry.
pub const SIGNATURE_ENTRY: &str = "manifest.sig";
/// Name of the image entry.
pub const IMAGE_ENTRY: &str = "image";
/// Largest accepted `manifest.json`.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Largest accepted `manifest.sig`.
pub const MAX_SIGNATURE_BYTES: u64 = 4 * 1024;
/// Format of a bundle whose `image` entry holds the plain image.
pub const FORMAT_VERSION: u32 = 1;
/// Format of a chunked bundle (`chunks.idx` + `chunks.zst` instead of `image`).
pub const FORMAT_CHUNKED: u32 = 2;
/// Largest accepted [`ContextInfo::window`]: a device keeps the window, one segment and one
/// chunk of the image in memory while it writes.
pub const MAX_CONTEXT_WINDOW: u32 = 8 * 1024 * 1024;
/// Largest accepted [`ContextInfo::segment`].
pub const MAX_CONTEXT_SEGMENT: u32 = 4 * 1024 * 1024;
/// Name of the chunk index entry (format 2).
pub const INDEX_ENTRY: &str = "chunks.idx";
/// Name of the compressed chunk data entry (format 2).
pub const DATA_ENTRY: &str = "chunks.zst";
/// Largest accepted `chunks.idx` (about 300 000 chunks: 18 GiB at a 64 KiB average).
pub const MAX_INDEX_BYTES: u64 = 16 * 1024 * 1024;
/// First bytes of `chunks.idx` (re-exported as `chunks::MAGIC`). The index's geometry lives here,
/// below [`crate::chunks`], because [`ChunksInfo::check`] needs it to check `index_size`.
pub const INDEX_MAGIC: &[u8; 8] = b"FNCHIDX1";
/// Length of one `chunks.idx` record (re-exported as `chunks::RECORD_LEN`).
pub const INDEX_RECORD_LEN: u64 = 56;
/// Largest accepted chunk (`max_size`): bounds what one chunk may decompress to.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// The chunking algorithm of format 2.
pub const CHUNKER: &str = "fastcdc-2020";
/// The chunk compression of format 2.
pub const COMPRESSION: &str = "zstd";

/// Length of an index of `count` chunks (`None` on overflow).
pub fn index_len(count: u64) -> Option<u64> {
    count
        .checked_mul(INDEX_RECORD_LEN)?
        .checked_add(INDEX_MAGIC.len() as u64)
}

/// What a bundle claims about its image. Signed as the exact bytes of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format; must be [`FORMAT_VERSION`].
    pub format: u32,
    /// Firmware version (semver).
    pub version: semver::Version,
    /// Anti-rollback counter: a device refuses images below its committed floor.
    pub security_version: u64,
    /// Hardware ids this image runs on; the device's `hardware` must be one of them.
    pub compatible: Vec<String>,
    /// When the bundle was made (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// After this instant (RFC 3339) devices refuse the bundle.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires: Option<OffsetDateTime>,
    /// The image that follows the manifest (format 2: the image the chunks make up).
    pub image: ImageInfo,
    /// Format 2 only: how the image is cut and where the chunk index is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunksInfo>,
    /// The flight-controller firmware this image flies with: a semver requirement on what the
    /// autopilot reports in AUTOPILOT_VERSION (`>=4.7.0, <4.8.0`). While it reports another
    /// version the agent keeps the vehicle from arming. Agents before it refuse a bundle that
    /// carries it (`deny_unknown_fields`), so it is only written when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot: Option<semver::VersionReq>,
}

/// How a format-2 image is chunked, and the digest that ties the chunk index to the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunksInfo {
    /// Always [`CHUNKER`].
    pub chunker: String,
    /// FastCDC minimum chunk size.
    pub min_size: u32,
    /// FastCDC average chunk size.
    pub avg_size: u32,
    /// FastCDC maximum chunk size; no chunk is larger.
    pub max_size: u32,
    /// Always [`COMPRESSION`].
    pub compression: String,
    /// Number of chunks.
    pub count: u64,
    /// Exact length of `chunks.idx`.
    pub index_size: u64,
    /// Lower-case hex sha256 of `chunks.idx`.
    pub index_sha256: String,
    /// Exact length of `chunks.zst`.
    pub data_size: u64,
    /// How each chunk's frame was compressed against the image bytes before it. Absent: every
    /// frame decodes on its own (the first format-2 bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextInfo>,
}

/// Frames compressed against the image before them, which a device writing in image order
/// already holds.
///
/// The image is cut into segments of `segment` bytes; a chunk belongs to the segment its first
/// byte is in. A chunk's frame is compressed with zstd's dictionary set to the `window` image
/// bytes before its segment's start (fewer at the image's start; none in the first segment), as
/// `ZSTD_compress_usingDict` takes it: raw content, unless those bytes happen to begin with
/// zstd's dictionary magic. See [`crate::chunks::context_range`].
///
/// Independent frames lose every match across chunk boundaries (their sum is about 1.6 times
/// a whole-image `zstd -19`); with a window of a few MiB the sum comes near the whole-image
/// size, and a changed chunk still travels alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextInfo {
    /// Image bytes before a segment that its chunks may refer to.
    pub window: u32,
    /// Segment length.
    pub segment: u32,
}

/// Size and digest of the image entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// Exact length in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the image bytes.
    pub sha256: String,
}

/// Content of `manifest.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Always `ed25519`.
    pub algorithm: String,
    /// Id of the signing key: lower-case hex of the first 8 bytes of sha256(raw 32-byte public key).
    /// It only selects the key; the signature itself is what is trusted.
    pub key_id: String,
    /// Base64 (standard alphabet, padded) of the 64-byte ed25519 signature over `manifest.json`.
    pub signature: String,
}

/// Why a manifest's fields are unacceptable, independent of any device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// JSON syntax, unknown or missing fields, wrong types.
    #[error("manifest.json is not a valid manifest: {0}")]
    Parse(String),
    /// A format this agent does not understand.
    #[error(
        "manifest format {0} is not supported (this agent understands formats {FORMAT_VERSION} and {FORMAT_CHUNKED})"
    )]
    Format(u32),
    /// The `chunks` section is missing, present in format 1, or inconsistent.
    #[error("manifest chunks section is invalid: {0}")]
    Chunks(String),
    /// `compatible` is empty.
    #[error("manifest lists no compatible hardware")]
    NoCompatible,
    /// `image.sha256` is not 64 lower-case hex digits.
    #[error("manifest image.sha256 {0:?} is not 64 lower-case hex digits")]
    Digest(String),
}

impl Manifest {
    /// Parses manifest bytes strictly: unknown fields, a foreign format or a malformed digest are errors.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        match (manifest.format, &manifest.chunks) {
            (FORMAT_VERSION, None) => {}
            (FORMAT_VERSION, Some(_)) => {
                return Err(ManifestError::Chunks("format 1 has no chunks section".into()));
            }
            (FORMAT_CHUNKED, Some(c)) => c.check()?,
            (FORMAT_CHUNKED, None) => {
                return Err(ManifestError::Chunks("format 2 needs a chunks section".into()));
            }
            (other, _) => return Err(ManifestError::Format(other)),
        }
        if manifest.compatible.is_empty() {
            return Err(ManifestError::NoCompatible);
        }
        if !is_sha256_hex(&manifest.image.sha256) {
            return Err(ManifestError::Digest(manifest.image.sha256.clone()));
        }
        Ok(manifest)
    }

    /// True for a chunked (format 2) bundle.
    pub fn is_chunked(&self) -> bool {
        self.chunks.is_some()
    }

    /// Canonical bytes for signing: pretty JSON, so `tar xOf` output is readable.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// 64 lower-case hex digits.
fn is_sha256_hex(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ChunksInfo {
    /// Checks the section on its own: known algorithms, sane sizes, an index of the right length.
    pub fn check(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Chunks(m));
        if self.chunker != CHUNKER {
            return bad(format!("chunker {:?} is not {CHUNKER:?}", self.chunker));
        }
        if self.compression != COMPRESSION {
            return bad(format!(
                "compression {:?} is not {COMPRESSION:?}",
                self.compression
            ));
        }
        // The FastCDC bounds: the device cuts its running slot with these same sizes.
        if !((64..=1024 * 1024).contains(&self.min_size)
            && self.avg_size >= 256
            && self.max_size >= 1024
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            && self.max_size <= MAX_CHUNK_SIZE)
        {
            return bad(format!(
                "chunk sizes min {} avg {} max {} are not 64 <= min <= 1 MiB, 256 <= avg, 1024 <= max, min <= avg <= max <= {MAX_CHUNK_SIZE}",
                self.min_size, self.avg_size, self.max_size
            ));
        }
        let expected = index_len(self.count);
        if expected != Some(self.index_size) || self.index_size > MAX_INDEX_BYTES {
            return bad(format!(
                "index_size {} does not fit {} chunks (or is over {MAX_INDEX_BYTES} bytes)",
                self.index_size, self.count
            ));
        }
        if !is_sha256_hex(&self.index_sha256) {
            return Err(ManifestError::Digest(self.index_sha256.clone()));
        }
        if let Some(c) = &self.context
            && !((1..=MAX_CONTEXT_WINDOW).contains(&c.window)
                && (4096..=MAX_CONTEXT_SEGMENT).contains(&c.segment))
        {
            return bad(format!(
                "context window {} and segment {} are not within 1..={MAX_CONTEXT_WINDOW} and 4096..={MAX_CONTEXT_SEGMENT}",
                c.window, c.segment
            ));
        }
        Ok(())
    }
}

impl Signature {
    /// Parses `manifest.sig` strictly.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(format!("manifest.sig: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            version: semver::Version::new(1, 2, 3),
            security_version: 4,
            compatible: vec!["cc-aarch64-v1".into()],
            created: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            expires: None,
            image: ImageInfo {
                size: 10,
                sha256: "ab".repeat(32),
            },
            chunks: None,
            autopilot: None,
        }
    }

    #[test]
    fn round_trips_and_rejects_unknown_fields() {
        let bytes = sample().to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), sample());
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        value["surprise"] = serde_json::json!(1);
        let err = Manifest::parse(value.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }

    #[test]
    fn rejects_bad_digest_and_format() {
        let mut m = sample();
        m.image.sha256 = "AB".repeat(32);
        assert!(matches!(
            Manifest::parse(&m.to_bytes()),
            Err(ManifestError::Digest(_))
        ));
        let mut m = sample();
        m.format = 3;
        assert_eq!(Manifest::parse(&m.to_bytes()), Err(ManifestError::Format(3)));
        let mut m = sample();
        m.format = FORMAT_CHUNKED;
        assert!(matches!(
            Manifest::parse(&m.to_bytes()),
            Err(ManifestError::Chunks(_))
        ));
    }
}
