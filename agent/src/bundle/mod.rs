//! Signed bundles: keys, creation, and the streaming reader that verifies before it writes.
//!
//! The layout is documented in [`flightnode_proto::manifest`]: a ustar archive holding
//! `manifest.json`, `manifest.sig` and `image`, in that order. Bundles conventionally end in
//! [`EXTENSION`].
//!
//! - [`keys`](keygen): ed25519 release keys as PEM files (PKCS#8 private, SPKI public) and the
//!   device's [`TrustedKeys`].
//! - [`create`]: hashes the image, signs the manifest and writes the archive atomically.
//! - [`read_header`] / [`copy_image`]: the device side. The header is verified completely (caps,
//!   tar structure, signature by a trusted key, strict manifest) before the caller gets to write a
//!   single image byte; the image is then streamed with a running sha256 and a hard cut at its
//!   declared size. The split lets the engine resume an interrupted copy from a checkpoint.
//!
//! Every step has its own [`BundleError`] variant, and [`BundleError::code`] maps it to the
//! contract [`ErrorCode`].

use std::io;
use std::path::PathBuf;

use flightnode_proto::ErrorCode;
use flightnode_proto::manifest::ManifestError;

pub mod chunked;
mod create;
mod keys;
mod reader;
mod ustar;

pub use create::{Chunking, CreateOptions, create};
pub use keys::{KeyPaths, TrustedKeys, keygen, load_signing_key, load_verifying_key};
pub use reader::{VerifiedHeader, copy_image, read_header, read_manifest_file, verify_file};

/// Conventional file extension of a bundle (without the dot).
pub const EXTENSION: &str = "fnb";

/// Copy buffer size: large enough that syscalls and hashing calls are not the bottleneck when
/// streaming an image from a download into a slot.
pub const COPY_BUFFER: usize = 256 * 1024;

/// The only signature algorithm a bundle may use.
pub const ALGORITHM: &str = "ed25519";

/// Why a bundle, or a key, was refused. Each variant names the step that failed; each message
/// names the file or entry and what to do about it.
#[allow(missing_docs, reason = "each field is named in its variant's message")]
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// `keygen` found a key file already in place.
    #[error("{}: already exists; refusing to overwrite a key (move it away or choose another directory)", path.display())]
    KeyExists { path: PathBuf },
    /// `keygen` could not create the directory or write a key file.
    #[error("{}: cannot write key file (check the directory and its permissions)", path.display())]
    KeyWrite { path: PathBuf, source: io::Error },
    /// A key file could not be read.
    #[error("{}: cannot read key file (check the path and its permissions)", path.display())]
    KeyRead { path: PathBuf, source: io::Error },
    /// A key file is not a PEM key of the expected kind.
    #[error("{}: not a {kind}: {reason}; use the file written by keygen (release.key to sign, release.pub to verify)", path.display())]
    KeyParse {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    /// No trusted key was configured: every bundle would be refused.
    #[error("no trusted keys configured; list at least one release public key (release.pub) in trusted_keys")]
    NoTrustedKeys,
    /// `create` could not read the image.
    #[error("{}: cannot read image (check the path and its permissions)", path.display())]
    ImageRead { path: PathBuf, source: io::Error },
    /// The image changed between hashing it and copying it into the bundle.
    #[error("{}: image changed while the bundle was written ({reason}); retry once nothing writes to it", path.display())]
    ImageChanged { path: PathBuf, reason: String },
    /// `create` options give a manifest that devices would refuse.
    #[error("cannot build manifest.json: {reason}; fix the bundle options")]
    ManifestBuild { reason: String },
    /// `create` could not write the output bundle.
    #[error("{}: cannot write bundle (check free space and permissions)", path.display())]
    Output { path: PathBuf, source: io::Error },
    /// A bundle file could not be opened.
    #[error("{}: cannot open bundle (check the path and its permissions)", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The bundle ended early, before the image.
    #[error(
        "bundle truncated in {what} (at byte {offset}); the file or download is incomplete, fetch it again"
    )]
    Truncated { what: &'static str, offset: u64 },
    /// A tar header is damaged or of a kind a bundle never contains.
    #[error(
        "bundle tar header of entry {index} (expected {expected}) is invalid: {reason}; the bundle is corrupt or was not made by bundle create"
    )]
    TarHeader {
        index: usize,
        expected: &'static str,
        reason: String,
    },
    /// An entry has the wrong name (or the entries are out of order).
    #[error(
        "bundle entry {index} is named {found:?}, expected {expected:?}; a bundle holds exactly manifest.json, manifest.sig and image, in this order: rebuild it with bundle create"
    )]
    EntryName {
        index: usize,
        expected: &'static str,
        found: String,
    },
    /// An entry's tar header declares more bytes than its cap; nothing of it was read.
    #[error(
        "bundle entry {entry} declares {size} bytes, over the {max}-byte limit; refused without reading it (corrupt or hostile bundle)"
    )]
    EntryTooLarge {
        entry: &'static str,
        size: u64,
        max: u64,
    },
    /// Padding after an entry holds non-zero bytes.
    #[error(
        "bundle entry {entry} is followed by non-zero tar padding; the bundle is corrupt, fetch or rebuild it"
    )]
    Padding { entry: &'static str },
    /// `manifest.sig` is not a valid signature document.
    #[error("bundle manifest.sig is invalid: {reason}; the bundle is corrupt, re-sign it with bundle create")]
    SignatureFormat { reason: String },
    /// `manifest.sig` names an algorithm other than ed25519.
    #[error(
        "bundle manifest.sig uses algorithm {found:?}, only \"ed25519\" is supported; re-sign the bundle with bundle create"
    )]
    Algorithm { found: String },
    /// The signing key is not trusted by this device.
    #[error(
        "bundle manifest.sig names key {key_id}, which is not trusted here (trusted: {trusted}); sign with a trusted key or add its release.pub to trusted_keys"
    )]
    UntrustedKey { key_id: String, trusted: String },
    /// The signature does not verify with the trusted key it names.
    #[error(
        "bundle manifest.json signature does not verify with trusted key {key_id}; manifest.json or manifest.sig was altered: do not install, rebuild the bundle"
    )]
    SignatureInvalid { key_id: String },
    /// `manifest.json` is authentic but not acceptable (format, fields).
    #[error("bundle {reason}; rebuild it with a bundle create matching this agent")]
    Manifest { reason: ManifestError },
    /// The image entry's tar size differs from the manifest's `image.size`.
    #[error(
        "bundle image entry holds {entry} bytes but manifest.json says image.size = {manifest}; the bundle is corrupt or tampered, rebuild it"
    )]
    ImageSize { entry: u64, manifest: u64 },
    /// The image ended before `image.size` bytes.
    #[error(
        "bundle image truncated at {got} of {expected} bytes; the file or download is incomplete, fetch it again"
    )]
    ImageTruncated { got: u64, expected: u64 },
    /// The stream ended after the image but before the end-of-archive blocks.
    #[error(
        "bundle ends {got} bytes after the image, before its end-of-archive blocks; the file or download is incomplete, fetch it again"
    )]
    TailTruncated { got: u64 },
    /// Something other than tar padding follows the image.
    #[error(
        "bundle has data past the image ({reason}); the bundle is corrupt or was appended to, fetch or rebuild it"
    )]
    TrailingData { reason: String },
    /// The image's sha256 differs from the manifest's.
    #[error(
        "bundle image sha256 is {actual} but manifest.json says {expected}; the image is corrupt, fetch the bundle again"
    )]
    HashMismatch { expected: String, actual: String },
    /// The caller asked to resume past the end of the image.
    #[error(
        "cannot resume the image copy at byte {start}: the image has only {size} bytes; discard the checkpoint and start over"
    )]
    ResumeOffset { start: u64, size: u64 },
    /// Reading the bundle stream failed (download or file).
    #[error("reading the bundle failed (check the source and retry)")]
    Read { source: io::Error },
    /// `chunks.idx` is not what the signed manifest says, or breaks the index rules (a frame
    /// outside the bundle, overlapping chunks, sizes over the bounds).
    #[error(
        "bundle chunk index is invalid: {reason}; the bundle is corrupt or hostile, do not install it, rebuild it with bundle create --chunked"
    )]
    ChunkIndex { reason: String },
    /// The `chunks.zst` entry's tar size differs from the manifest's `chunks.data_size`.
    #[error(
        "bundle chunks.zst entry holds {entry} bytes but manifest.json says chunks.data_size = {manifest}; the bundle is corrupt or tampered, rebuild it"
    )]
    DataSize { entry: u64, manifest: u64 },
    /// A chunk's frame does not decompress to its declared size or its hash.
    #[error("bundle {0}; the chunk data is corrupt or hostile, nothing of it was written")]
    Chunk(#[source] chunked::ChunkError),
    /// Writing the image to its destination failed.
    #[error("writing the image failed (check the target slot and free space)")]
    Write { source: io::Error },
}

impl BundleError {
    /// The contract error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::KeyExists { .. }
            | Self::KeyWrite { .. }
            | Self::KeyRead { .. }
            | Self::KeyParse { .. }
            | Self::NoTrustedKeys
            | Self::ImageRead { .. }
            | Self::ImageChanged { .. }
            | Self::ManifestBuild { .. }
            | Self::ResumeOffset { .. } => ErrorCode::Internal,
            Self::Output { source, .. } | Self::Write { source } => {
                if is_no_space(source) {
                    ErrorCode::NoSpace
                } else {
                    ErrorCode::Internal
                }
            }
            Self::Open { .. } | Self::Read { .. } => ErrorCode::DownloadFailed,
            Self::Truncated { .. }
            | Self::TarHeader { .. }
            | Self::EntryName { .. }
            | Self::EntryTooLarge { .. }
            | Self::Padding { .. }
            | Self::TailTruncated { .. }
            | Self::SignatureFormat { .. }
            | Self::Algorithm { .. }
            | Self::Manifest { .. }
            | Self::ChunkIndex { .. } => ErrorCode::MalformedBundle,
            Self::Chunk(_) => ErrorCode::ChunkInvalid,
            Self::DataSize { .. } => ErrorCode::SizeMismatch,
            Self::UntrustedKey { .. } => ErrorCode::UntrustedKey,
            Self::SignatureInvalid { .. } => ErrorCode::SignatureInvalid,
            Self::ImageSize { .. } | Self::ImageTruncated { .. } | Self::TrailingData { .. } => {
                ErrorCode::SizeMismatch
            }
            Self::HashMismatch { .. } => ErrorCode::HashMismatch,
        }
    }

    /// The untouched I/O error of a [`Read`](Self::Read) or [`Write`](Self::Write) failure, so
    /// the engine can downcast payloads it wrapped with `io::Error::other` in its own reader or
    /// writer (cancellation, checkpoint failures).
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            Self::Read { source } | Self::Write { source } => Some(source),
            _ => None,
        }
    }
}

/// ENOSPC, directly or as the payload of an `io::Error::other` wrapper.
fn is_no_space(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    if e.raw_os_error() == Some(ENOSPC) || e.kind() == io::ErrorKind::StorageFull {
        return true;
    }
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<io::Error>())
        .is_some_and(|inner| inner.raw_os_error() == Some(ENOSPC))
}

/// Id of a public key (shared with the hub's command keys).
pub use flightnode_proto::signed::key_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Canceled;
    impl std::fmt::Display for Canceled {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("canceled")
        }
    }
    impl std::error::Error for Canceled {}

    #[test]
    fn io_errors_map_to_codes_and_keep_their_payload() {
        let full = BundleError::Write {
            source: io::Error::from_raw_os_error(28),
        };
        assert_eq!(full.code(), ErrorCode::NoSpace);
        let wrapped = BundleError::Write {
            source: io::Error::other(io::Error::from_raw_os_error(28)),
        };
        assert_eq!(wrapped.code(), ErrorCode::NoSpace);
        let other = BundleError::Write {
            source: io::Error::from_raw_os_error(5),
        };
        assert_eq!(other.code(), ErrorCode::Internal);

        let read = BundleError::Read {
            source: io::Error::other(Canceled),
        };
        assert_eq!(read.code(), ErrorCode::DownloadFailed);
        let payload = read.io_source().and_then(|e| e.get_ref());
        assert!(payload.is_some_and(|p| p.downcast_ref::<Canceled>().is_some()));
    }
}
