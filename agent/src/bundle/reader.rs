//! The device side: verify the bundle header, then stream the image.
//!
//! Single pass, no seeking, so the same code reads a local file and an HTTP body. Nothing
//! untrusted is buffered beyond the small capped manifest and signature, and `manifest.json` is
//! only parsed after its signature verified: the JSON parser never sees unauthenticated bytes.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use base64::Engine as _;
use flightnode_proto::chunks::ChunkIndex;
use flightnode_proto::manifest::{
    DATA_ENTRY, IMAGE_ENTRY, INDEX_ENTRY, MANIFEST_ENTRY, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES, Manifest, SIGNATURE_ENTRY, Signature,
};
use sha2::{Digest, Sha256};

use super::ustar::{self, BLOCK};
use super::{ALGORITHM, BundleError, COPY_BUFFER, TrustedKeys};

/// Most tail bytes accepted after the image's padding: tar writes two zero blocks and GNU tar
/// pads the archive to its 10 KiB record size.
const MAX_TAIL: u64 = 20 * BLOCK as u64;

/// A bundle header whose signature verified with a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHeader {
    /// The authentic manifest (device policy is still to be checked by the caller).
    pub manifest: Manifest,
    /// Id of the trusted key that signed it.
    pub key_id: String,
    /// Byte offset of the first image byte in the bundle: where to resume with a `Range` request.
    /// Chunked bundles: the offset of `chunks.zst`, to which the index's data offsets are relative.
    pub image_offset: u64,
    /// Chunked bundles: the index, verified against the manifest's digest and checked.
    pub chunks: Option<ChunkIndex>,
}

/// Reads and verifies everything before the image and leaves `r` at the first image byte.
///
/// Order: each header's checksum, structure, exact name and size cap come before its content
/// is read; then the signature document, the algorithm, the key (must be trusted), the ed25519
/// strict verification over the exact `manifest.json` bytes, the strict manifest parse, and
/// finally the image header, whose size must equal `image.size`.
pub fn read_header<R: Read>(r: &mut R, keys: &TrustedKeys) -> Result<VerifiedHeader, BundleError> {
    let mut offset = 0u64;
    let manifest_bytes = read_entry(r, &mut offset, 0, MANIFEST_ENTRY, MAX_MANIFEST_BYTES)?;
    let signature_bytes = read_entry(r, &mut offset, 1, SIGNATURE_ENTRY, MAX_SIGNATURE_BYTES)?;

    let signature = Signature::parse(&signature_bytes).map_err(|e| BundleError::SignatureFormat {
        reason: e.to_string(),
    })?;
    if signature.algorithm != ALGORITHM {
        return Err(BundleError::Algorithm {
            found: signature.algorithm.chars().take(32).collect(),
        });
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&signature.signature)
        .map_err(|e| BundleError::SignatureFormat {
            reason: format!("signature is not standard padded base64: {e}"),
        })?;
    let sig = ed25519_dalek::Signature::from_slice(&raw).map_err(|_| BundleError::SignatureFormat {
        reason: format!("signature is {} bytes, expected 64", raw.len()),
    })?;
    let candidates: Vec<_> = keys.with_id(&signature.key_id).collect();
    if candidates.is_empty() {
        return Err(BundleError::UntrustedKey {
            key_id: signature.key_id.chars().take(64).collect(),
            trusted: keys.ids().join(", "),
        });
    }
    if !candidates
        .iter()
        .any(|key| key.verify_strict(&manifest_bytes, &sig).is_ok())
    {
        return Err(BundleError::SignatureInvalid {
            key_id: signature.key_id,
        });
    }
    let manifest = Manifest::parse(&manifest_bytes).map_err(|reason| BundleError::Manifest { reason })?;
    if let Some(info) = &manifest.chunks {
        let index_bytes = read_entry(r, &mut offset, 2, INDEX_ENTRY, MAX_INDEX_BYTES)?;
        let actual = hex::encode(Sha256::digest(&index_bytes));
        if actual != info.index_sha256 {
            return Err(BundleError::ChunkIndex {
                reason: format!(
                    "chunks.idx has sha256 {actual} but the signed manifest says {}",
                    info.index_sha256
                ),
            });
        }
        let index = ChunkIndex::parse(&index_bytes, manifest.image.size, info).map_err(|e| {
            BundleError::ChunkIndex {
                reason: e.to_string(),
            }
        })?;
        let mut block = [0u8; BLOCK];
        read_full(r, &mut block, &mut offset, "the chunks.zst tar header")?;
        let entry = ustar::parse_header(&block, 3, DATA_ENTRY, None)?;
        if entry != info.data_size {
            return Err(BundleError::DataSize {
                entry,
                manifest: info.data_size,
            });
        }
        return Ok(VerifiedHeader {
            manifest,
            key_id: signature.key_id,
            image_offset: offset,
            chunks: Some(index),
        });
    }

    let mut block = [0u8; BLOCK];
    read_full(r, &mut block, &mut offset, "the image tar header")?;
    let entry = ustar::parse_header(&block, 2, IMAGE_ENTRY, None)?;
    if entry != manifest.image.size {
        return Err(BundleError::ImageSize {
            entry,
            manifest: manifest.image.size,
        });
    }
    Ok(VerifiedHeader {
        manifest,
        key_id: signature.key_id,
        image_offset: offset,
        chunks: None,
    })
}

/// Reads `manifest.json` of a bundle file without verifying anything (for `bundle info`).
pub fn read_manifest_file(path: &Path) -> Result<Manifest, BundleError> {
    let file = File::open(path).map_err(|source| BundleError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let bytes = read_entry(&mut reader, &mut 0, 0, MANIFEST_ENTRY, MAX_MANIFEST_BYTES)?;
    Manifest::parse(&bytes).map_err(|reason| BundleError::Manifest { reason })
}

/// Reads one capped entry (header, content, zero padding) and returns its content.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the entry is at most `max` (64 KiB) and its padding under one block"
)]
fn read_entry<R: Read>(
    r: &mut R,
    offset: &mut u64,
    index: usize,
    name: &'static str,
    max: u64,
) -> Result<Vec<u8>, BundleError> {
    let mut block = [0u8; BLOCK];
    read_full(r, &mut block, offset, entry_what(index, false))?;
    let size = ustar::parse_header(&block, index, name, Some(max))?;
    // `size <= max` (at most the chunk index cap), so this allocation is bounded.
    let mut content = vec![0u8; size as usize];
    read_full(r, &mut content, offset, entry_what(index, true))?;
    let mut padding = vec![0u8; ustar::padding(size) as usize];
    read_full(r, &mut padding, offset, entry_what(index, true))?;
    if padding.iter().any(|&b| b != 0) {
        return Err(BundleError::Padding { entry: name });
    }
    Ok(content)
}

/// Static descriptions for truncation messages.
fn entry_what(index: usize, content: bool) -> &'static str {
    match (index, content) {
        (0, false) => "the manifest.json tar header",
        (0, true) => "manifest.json",
        (1, false) => "the manifest.sig tar header",
        (1, true) => "manifest.sig",
        (_, false) => "the chunks.idx tar header",
        (_, true) => "chunks.idx",
    }
}

/// Fills `buf` completely; end of stream is truncation, a failing read is [`BundleError::Read`].
fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    offset: &mut u64,
    what: &'static str,
) -> Result<(), BundleError> {
    let n = fill(r, buf)?;
    *offset += n as u64;
    if n < buf.len() {
        return Err(BundleError::Truncated {
            what,
            offset: *offset,
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read. Filling the whole
/// buffer turns a trickle of small network reads into few large writes to the slot.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, BundleError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(BundleError::Read { source }),
        }
    }
    Ok(filled)
}

/// Streams image bytes `[start, image.size)` from `r` to `w`, then checks the archive tail and the
/// digest.
///
/// `r` must be positioned at image byte `start` and `hasher` must already hold image bytes
/// `[0, start)`, which lets the engine resume from a checkpoint (`start = 0` with a fresh hasher
/// for a plain copy). Never writes more than `size - start` bytes. Only after `Ok` may the
/// written image be trusted; on error it must be discarded.
pub fn copy_image<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    manifest: &Manifest,
    start: u64,
    mut hasher: Sha256,
) -> Result<(), BundleError> {
    let size = manifest.image.size;
    if start > size {
        return Err(BundleError::ResumeOffset { start, size });
    }
    let mut done = start;
    if done < size {
        let len = usize::try_from((size - done).min(COPY_BUFFER as u64)).unwrap_or(COPY_BUFFER);
        let mut buf = vec![0u8; len];
        while done < size {
            let want = usize::try_from((size - done).min(len as u64)).unwrap_or(len);
            let n = fill(r, &mut buf[..want])?;
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|source| BundleError::Write { source })?;
            done += n as u64;
            if n < want {
                return Err(BundleError::ImageTruncated {
                    got: done,
                    expected: size,
                });
            }
        }
    }
    w.flush().map_err(|source| BundleError::Write { source })?;
    check_tail(r, size)?;

    let actual = hex::encode(hasher.finalize());
    if actual != manifest.image.sha256 {
        return Err(BundleError::HashMismatch {
            expected: manifest.image.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// After the image: its zero padding to a block boundary, then at least the two zero
/// end-of-archive blocks and at most [`MAX_TAIL`] bytes, all zero, in whole blocks.
#[allow(clippy::cast_possible_truncation, reason = "the tail is under 21 blocks")]
fn check_tail<R: Read>(r: &mut R, size: u64) -> Result<(), BundleError> {
    let padding = ustar::padding(size);
    let limit = padding + MAX_TAIL;
    // One byte more than allowed tells "too much" from "exactly the limit".
    let mut tail = vec![0u8; limit as usize + 1];
    let n = fill(r, &mut tail)? as u64;
    if n > limit {
        return Err(BundleError::TrailingData {
            reason: format!("more than {MAX_TAIL} bytes of archive tail after the image"),
        });
    }
    if let Some(at) = tail[..n as usize].iter().position(|&b| b != 0) {
        return Err(BundleError::TrailingData {
            reason: format!("non-zero byte {at} bytes after the image's last byte"),
        });
    }
    if n < padding + 2 * BLOCK as u64 {
        return Err(BundleError::TailTruncated { got: n });
    }
    if !(n - padding).is_multiple_of(BLOCK as u64) {
        return Err(BundleError::TrailingData {
            reason: format!("{n} tail bytes after the image are not whole tar blocks"),
        });
    }
    Ok(())
}

/// Verifies a whole bundle file (header, image digest, tail) without writing anything.
pub fn verify_file(path: &Path, keys: &TrustedKeys) -> Result<VerifiedHeader, BundleError> {
    let file = File::open(path).map_err(|source| BundleError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(COPY_BUFFER, file);
    let header = read_header(&mut reader, keys)?;
    match (&header.chunks, &header.manifest.chunks) {
        (Some(index), Some(info)) => {
            let actual = super::chunked::verify_stream(&mut reader, index, info)?;
            check_tail(&mut reader, info.data_size)?;
            if actual != header.manifest.image.sha256 {
                return Err(BundleError::HashMismatch {
                    expected: header.manifest.image.sha256.clone(),
                    actual,
                });
            }
        }
        _ => copy_image(&mut reader, &mut io::sink(), &header.manifest, 0, Sha256::new())?,
    }
    Ok(header)
}
