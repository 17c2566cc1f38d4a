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
/// The only manifest format this version understands.
pub const FORMAT_VERSION: u32 = 1;

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
    /// The image that follows the manifest.
    pub image: ImageInfo,
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
    #[error("manifest format {0} is not supported (this agent understands format {FORMAT_VERSION})")]
    Format(u32),
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
        if manifest.format != FORMAT_VERSION {
            return Err(ManifestError::Format(manifest.format));
        }
        if manifest.compatible.is_empty() {
            return Err(ManifestError::NoCompatible);
        }
        let digest = &manifest.image.sha256;
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ManifestError::Digest(digest.clone()));
        }
        Ok(manifest)
    }

    /// Canonical bytes for signing: pretty JSON, so `tar xOf` output is readable.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
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
        m.format = 2;
        assert_eq!(Manifest::parse(&m.to_bytes()), Err(ManifestError::Format(2)));
    }
}
