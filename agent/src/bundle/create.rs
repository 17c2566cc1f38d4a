//! `bundle create`: hash the image, sign the manifest, write the archive atomically.
//!
//! The manifest must precede the image in the archive but needs the image's digest, so the image
//! is read twice, both times streaming: once to hash it, once to copy it (hashed again, so an
//! image modified in between is caught instead of shipped with a wrong digest).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use flightnode_proto::manifest::{
    ChunksInfo, DATA_ENTRY, FORMAT_CHUNKED, FORMAT_VERSION, IMAGE_ENTRY, INDEX_ENTRY, ImageInfo,
    MANIFEST_ENTRY, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, Manifest, SIGNATURE_ENTRY,
    Signature,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{ALGORITHM, BundleError, COPY_BUFFER, key_id, load_signing_key};

/// What `bundle create` puts into the manifest besides the image's size and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Firmware version.
    pub version: semver::Version,
    /// Anti-rollback counter; devices refuse images below their committed floor.
    pub security_version: u64,
    /// Hardware ids the image runs on (at least one).
    pub compatible: Vec<String>,
    /// Optional instant after which devices refuse the bundle.
    pub expires: Option<OffsetDateTime>,
    /// `Some`: write a chunked (format 2) bundle; `None`: format 1, the plain image.
    pub chunked: Option<Chunking>,
    /// The flight-controller firmware the image flies with (see [`Manifest::autopilot`]).
    pub autopilot: Option<semver::VersionReq>,
}

/// How `bundle create --chunked` compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// zstd level.
    pub level: i32,
    /// Context window in bytes ([`ContextInfo::window`](flightnode_proto::manifest::ContextInfo));
    /// 0 for independent frames.
    pub window: u32,
    /// Image bytes whose chunks share one context ([`ContextInfo::segment`](flightnode_proto::manifest::ContextInfo)).
    pub segment: u32,
    /// FastCDC's average chunk size in bytes (minimum a quarter, maximum four times it).
    pub avg_size: u32,
}

/// The format-2 parts that go between the signature and the end of the archive.
struct ChunkedParts {
    index: Vec<u8>,
    data: PathBuf,
}

/// Builds and signs a bundle of `image` with the private key at `key`, written to `output`
/// (via `OUTPUT.tmp`, fsync and rename, so `output` is either the old file or a complete
/// bundle). Returns the signed manifest.
pub fn create(
    key: &Path,
    image: &Path,
    opts: &CreateOptions,
    output: &Path,
) -> Result<Manifest, BundleError> {
    let signing = load_signing_key(key)?;
    let data_tmp = suffixed(output, ".data.tmp")?;
    let result = build(&signing, image, opts, output, &data_tmp);
    let _ = fs::remove_file(&data_tmp);
    result
}

fn build(
    signing: &ed25519_dalek::SigningKey,
    image: &Path,
    opts: &CreateOptions,
    output: &Path,
    data_tmp: &Path,
) -> Result<Manifest, BundleError> {
    let (size, sha256, chunks) = match opts.chunked {
        None => {
            let (size, sha256) = hash_image(image)?;
            (size, sha256, None)
        }
        Some(chunking) => {
            let (size, sha256, info, index) = compress(image, chunking, data_tmp)?;
            let parts = ChunkedParts {
                index,
                data: data_tmp.to_path_buf(),
            };
            (size, sha256, Some((info, parts)))
        }
    };

    let now = OffsetDateTime::now_utc();
    let manifest = Manifest {
        format: if chunks.is_some() {
            FORMAT_CHUNKED
        } else {
            FORMAT_VERSION
        },
        version: opts.version.clone(),
        security_version: opts.security_version,
        compatible: opts.compatible.clone(),
        // Whole seconds: the manifest is for humans too.
        created: now.replace_nanosecond(0).unwrap_or(now),
        expires: opts.expires,
        image: ImageInfo { size, sha256 },
        chunks: chunks.as_ref().map(|(info, _)| info.clone()),
        autopilot: opts.autopilot.clone(),
    };
    let manifest_bytes = manifest.to_bytes();
    // Never sign something a device would refuse to parse.
    match Manifest::parse(&manifest_bytes) {
        Ok(parsed) if parsed == manifest => {}
        Ok(_) => {
            return Err(BundleError::ManifestBuild {
                reason: "manifest.json does not read back identically".into(),
            });
        }
        Err(e) => {
            return Err(BundleError::ManifestBuild {
                reason: e.to_string(),
            });
        }
    }
    if manifest_bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(BundleError::ManifestBuild {
            reason: format!(
                "manifest.json would be {} bytes, over the {MAX_MANIFEST_BYTES}-byte limit (too many compatible entries?)",
                manifest_bytes.len()
            ),
        });
    }

    let signature = Signature {
        algorithm: ALGORITHM.into(),
        key_id: key_id(&signing.verifying_key()),
        signature: base64::engine::general_purpose::STANDARD.encode(signing.sign(&manifest_bytes).to_bytes()),
    };
    let signature_bytes = serde_json::to_vec(&signature).map_err(|e| BundleError::ManifestBuild {
        reason: format!("cannot encode manifest.sig: {e}"),
    })?;
    debug_assert!(signature_bytes.len() as u64 <= MAX_SIGNATURE_BYTES);

    let tmp = suffixed(output, ".tmp")?;
    let parts = chunks.as_ref().map(|(_, parts)| parts);
    let result = write_bundle(&tmp, &manifest, &manifest_bytes, &signature_bytes, image, parts);
    let result = result.and_then(|()| {
        fs::rename(&tmp, output).map_err(|source| BundleError::Output {
            path: output.to_path_buf(),
            source,
        })
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable only once the directory is synced.
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|source| BundleError::Output {
            path: parent.to_path_buf(),
            source,
        })?;
    tracing::info!(output = %output.display(), version = %manifest.version, key_id = %signature.key_id, "bundle created");
    Ok(manifest)
}

/// Cuts and compresses the image into `data_tmp`: size, sha256, the chunking section and the
/// encoded index.
fn compress(
    image: &Path,
    Chunking {
        level,
        window,
        segment,
        avg_size,
    }: Chunking,
    data_tmp: &Path,
) -> Result<(u64, String, ChunksInfo, Vec<u8>), BundleError> {
    let out_err = |source| BundleError::Output {
        path: data_tmp.to_path_buf(),
        source,
    };
    let mut info = super::chunked::new_info(window, segment, avg_size);
    let file = File::create(data_tmp).map_err(out_err)?;
    let mut w = BufWriter::with_capacity(COPY_BUFFER, file);
    let c = super::chunked::compress_image(image, &info, level, &mut w, data_tmp)?;
    w.into_inner()
        .map_err(|e| out_err(e.into_error()))?
        .sync_all()
        .map_err(out_err)?;
    let index = c.index.encode();
    if index.len() as u64 > MAX_INDEX_BYTES {
        return Err(BundleError::ManifestBuild {
            reason: format!(
                "the image has {} chunks, more than the {MAX_INDEX_BYTES}-byte chunk index holds",
                c.index.chunks.len()
            ),
        });
    }
    info.count = c.index.chunks.len() as u64;
    info.index_size = index.len() as u64;
    info.index_sha256 = hex::encode(Sha256::digest(&index));
    info.data_size = c.data_size;
    tracing::info!(image = %image.display(), chunks = info.count, size = c.size, compressed = c.data_size, level,
        window, segment, "image chunked");
    Ok((c.size, c.sha256, info, index))
}

/// `OUTPUT{suffix}`, next to the output so the rename stays on one file system.
fn suffixed(output: &Path, suffix: &str) -> Result<PathBuf, BundleError> {
    let name = output.file_name().ok_or_else(|| BundleError::Output {
        path: output.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut tmp = name.to_os_string();
    tmp.push(suffix);
    Ok(output.with_file_name(tmp))
}

/// Size and lower-case hex sha256 of the image, read in chunks (never whole in memory). Counting
/// bytes instead of trusting metadata also works for block devices.
fn hash_image(image: &Path) -> Result<(u64, String), BundleError> {
    let read_err = |source| BundleError::ImageRead {
        path: image.to_path_buf(),
        source,
    };
    let mut file = File::open(image).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Writes the three entries and the end-of-archive blocks to `tmp`, then fsyncs it.
fn write_bundle(
    tmp: &Path,
    manifest: &Manifest,
    manifest_bytes: &[u8],
    signature_bytes: &[u8],
    image: &Path,
    chunks: Option<&ChunkedParts>,
) -> Result<(), BundleError> {
    let out_err = |source| BundleError::Output {
        path: tmp.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(out_err)?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(COPY_BUFFER, file));
    let mtime = u64::try_from(manifest.created.unix_timestamp()).unwrap_or(0);

    let header = entry_header(MANIFEST_ENTRY, manifest_bytes.len() as u64, mtime).map_err(out_err)?;
    builder.append(&header, manifest_bytes).map_err(out_err)?;
    let header = entry_header(SIGNATURE_ENTRY, signature_bytes.len() as u64, mtime).map_err(out_err)?;
    builder.append(&header, signature_bytes).map_err(out_err)?;

    if let (Some(parts), Some(info)) = (chunks, &manifest.chunks) {
        let header = entry_header(INDEX_ENTRY, parts.index.len() as u64, mtime).map_err(out_err)?;
        builder.append(&header, parts.index.as_slice()).map_err(out_err)?;
        let data = File::open(&parts.data).map_err(|source| BundleError::Output {
            path: parts.data.clone(),
            source,
        })?;
        let header = entry_header(DATA_ENTRY, info.data_size, mtime).map_err(out_err)?;
        builder
            .append(&header, data.take(info.data_size))
            .map_err(out_err)?;
    } else {
        append_image(&mut builder, manifest, image, mtime, tmp)?;
    }

    let buffered = builder.into_inner().map_err(out_err)?;
    let file = buffered.into_inner().map_err(|e| out_err(e.into_error()))?;
    file.sync_all().map_err(out_err)
}

/// Appends the `image` entry, hashing the image again on the way.
fn append_image(
    builder: &mut tar::Builder<BufWriter<File>>,
    manifest: &Manifest,
    image: &Path,
    mtime: u64,
    tmp: &Path,
) -> Result<(), BundleError> {
    let out_err = |source| BundleError::Output {
        path: tmp.to_path_buf(),
        source,
    };
    let size = manifest.image.size;
    let mut source = File::open(image).map_err(|source| BundleError::ImageRead {
        path: image.to_path_buf(),
        source,
    })?;
    let mut reader = HashingReader::new(&mut source);
    let header = entry_header(IMAGE_ENTRY, size, mtime).map_err(out_err)?;
    // `take` guarantees the entry never exceeds its header; a shrunk image is caught below.
    if let Err(e) = builder.append(&header, (&mut reader).take(size)) {
        return Err(match reader.error.take() {
            Some(source) => BundleError::ImageRead {
                path: image.to_path_buf(),
                source,
            },
            None => out_err(e),
        });
    }
    let digest = hex::encode(reader.hasher.clone().finalize());
    if reader.count != size || digest != manifest.image.sha256 {
        return Err(BundleError::ImageChanged {
            path: image.to_path_buf(),
            reason: format!(
                "hashed {size} bytes with sha256 {}, then copied {} bytes with sha256 {digest}",
                manifest.image.sha256, reader.count
            ),
        });
    }
    Ok(())
}

/// A ustar header for a regular file (no GNU/pax extensions: names are short and fixed).
fn entry_header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_cksum();
    Ok(header)
}

/// Counts and hashes what passes through; keeps a read error aside so a failed `append` can
/// tell a bad image read from a bad output write.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    error: Option<io::Error>,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
            error: None,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.count += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(io::Error::new(kind, "reading the image failed"))
            }
        }
    }
}
