//! Chunked bundles (format 2): cutting and compressing an image, and decompressing one chunk with
//! a hard bound.
//!
//! The chunk boundaries are content-defined (FastCDC 2020), so a device that cuts its running
//! slot with the manifest's sizes finds the chunks an update left unchanged by their sha256.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use fastcdc::v2020::StreamCDC;
use flightnode_proto::chunks::{Chunk, ChunkIndex};
use flightnode_proto::manifest::{CHUNKER, COMPRESSION, ChunksInfo};
use sha2::{Digest, Sha256};

use super::BundleError;

/// FastCDC minimum chunk size of new bundles.
pub const MIN_SIZE: u32 = 16 * 1024;
/// FastCDC average chunk size of new bundles.
pub const AVG_SIZE: u32 = 64 * 1024;
/// FastCDC maximum chunk size of new bundles.
pub const MAX_SIZE: u32 = 256 * 1024;
/// zstd level of `bundle create --chunked` without `--level`: bundles are made once and
/// fetched by every drone, and zstd decodes as fast at any level.
pub const DEFAULT_LEVEL: i32 = 19;
/// Chunks compressed in parallel per batch (bounds memory to about this many chunks per thread).
const BATCH: usize = 64;

/// A chunk whose frame is unusable. The chunk number and its image offset name it.
#[derive(Debug, thiserror::Error)]
#[error("chunk {index} (image bytes {offset}..{end}): {reason}")]
pub struct ChunkError {
    /// Chunk number.
    pub index: usize,
    /// Image offset.
    pub offset: u64,
    /// End in the image.
    pub end: u64,
    /// What is wrong.
    pub reason: String,
}

impl ChunkError {
    fn new(index: usize, chunk: &Chunk, reason: String) -> Self {
        Self {
            index,
            offset: chunk.offset,
            end: chunk.end(),
            reason,
        }
    }
}

/// Decompresses the frame of chunk `index` into `out` (cleared first) and checks its sha256.
///
/// zstd decodes straight into `out`, whose capacity is the chunk's declared size: a frame that
/// would expand past it fails instead of allocating (a decompression bomb costs nothing), and
/// one that yields fewer bytes fails too.
pub fn decompress(
    index: usize,
    chunk: &Chunk,
    frame: &[u8],
    out: &mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), ChunkError> {
    let size = chunk.size as usize;
    out.clear();
    out.reserve_exact(size);
    // zstd decodes into the spare capacity and fails rather than grow the buffer, so what a frame
    // can produce is bounded by the buffer (the largest chunk size seen), never by the frame.
    let n = dctx.decompress_to_buffer(frame, out).map_err(|e| {
        ChunkError::new(
            index,
            chunk,
            format!("does not decompress within its declared {size} bytes: {e}"),
        )
    })?;
    if n != size {
        return Err(ChunkError::new(
            index,
            chunk,
            format!("decompresses to {n} bytes, the index says {size}"),
        ));
    }
    let actual: [u8; 32] = Sha256::digest(&out[..]).into();
    if actual != chunk.sha256 {
        return Err(ChunkError::new(
            index,
            chunk,
            format!(
                "sha256 is {} but the signed index says {}",
                hex::encode(actual),
                hex::encode(chunk.sha256)
            ),
        ));
    }
    Ok(())
}

/// A new decompression context.
pub fn decompressor() -> io::Result<zstd::bulk::Decompressor<'static>> {
    zstd::bulk::Decompressor::new()
}

/// The chunking section of a new bundle, before its index is known.
pub fn new_info() -> ChunksInfo {
    ChunksInfo {
        chunker: CHUNKER.into(),
        min_size: MIN_SIZE,
        avg_size: AVG_SIZE,
        max_size: MAX_SIZE,
        compression: COMPRESSION.into(),
        count: 0,
        index_size: 0,
        index_sha256: String::new(),
        data_size: 0,
    }
}

/// What [`compress_image`] made.
pub struct Compressed {
    /// The index (data offsets relative to `chunks.zst`).
    pub index: ChunkIndex,
    /// Image length.
    pub size: u64,
    /// Lower-case hex sha256 of the image.
    pub sha256: String,
    /// Length of the compressed data written.
    pub data_size: u64,
}

/// Cuts `image` into chunks, compresses each at `level` (batches on all cores) and appends the
/// frames to `data`. One read of the image, in bounded memory.
pub fn compress_image(
    image: &Path,
    info: &ChunksInfo,
    level: i32,
    data: &mut impl Write,
    data_path: &Path,
) -> Result<Compressed, BundleError> {
    let read_err = |source| BundleError::ImageRead {
        path: image.to_path_buf(),
        source,
    };
    let out_err = |source| BundleError::Output {
        path: data_path.to_path_buf(),
        source,
    };
    let file = File::open(image).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut chunker = StreamCDC::new(
        HashRead {
            inner: file,
            hasher: &mut hasher,
        },
        info.min_size as usize,
        info.avg_size as usize,
        info.max_size as usize,
    );
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut index = ChunkIndex::default();
    let mut data_size = 0u64;
    let mut size = 0u64;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        for next in chunker.by_ref().take(BATCH) {
            batch.push(next.map_err(|e| read_err(io::Error::from(e)))?);
        }
        if batch.is_empty() {
            break;
        }
        let per = batch.len().div_ceil(threads);
        let frames: Vec<io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        let mut cctx = zstd::bulk::Compressor::new(level)?;
                        cctx.include_checksum(false)?;
                        cctx.include_contentsize(true)?;
                        part.iter()
                            .map(|c| cctx.compress(&c.data))
                            .collect::<io::Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| match h.join() {
                    Ok(Ok(v)) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                    Ok(Err(e)) => vec![Err(e)],
                    Err(_) => vec![Err(io::Error::other("a compression thread panicked"))],
                })
                .collect()
        });
        if frames.len() != batch.len() {
            let err = frames.into_iter().find_map(Result::err);
            return Err(out_err(
                err.unwrap_or_else(|| io::Error::other("compression failed")),
            ));
        }
        for (c, frame) in batch.iter().zip(frames) {
            let frame = frame.map_err(out_err)?;
            data.write_all(&frame).map_err(out_err)?;
            index.chunks.push(Chunk {
                sha256: Sha256::digest(&c.data).into(),
                offset: c.offset,
                size: u32::try_from(c.length).map_err(|_| out_err(io::Error::other("chunk too large")))?,
                data_offset: data_size,
                data_len: u32::try_from(frame.len())
                    .map_err(|_| out_err(io::Error::other("frame too large")))?,
            });
            data_size += frame.len() as u64;
            size = c.offset + c.length as u64;
        }
    }
    drop(chunker);
    Ok(Compressed {
        index,
        size,
        sha256: hex::encode(hasher.finalize()),
        data_size,
    })
}

/// Cuts the first `len` bytes of `reader` (a slot) with `info`'s sizes and returns their chunks
/// (data fields zero): the index a device keeps of its running slot.
pub fn index_stream(reader: impl Read, len: u64, info: &ChunksInfo) -> io::Result<ChunkIndex> {
    let mut index = ChunkIndex::default();
    let chunker = StreamCDC::new(
        reader.take(len),
        info.min_size as usize,
        info.avg_size as usize,
        info.max_size as usize,
    );
    for c in chunker {
        let c = c.map_err(io::Error::from)?;
        index.chunks.push(Chunk {
            sha256: Sha256::digest(&c.data).into(),
            offset: c.offset,
            size: u32::try_from(c.length).map_err(io::Error::other)?,
            data_offset: 0,
            data_len: 0,
        });
    }
    Ok(index)
}

/// Hashes what the chunker reads, so the image is read once.
struct HashRead<'h, R> {
    inner: R,
    hasher: &'h mut Sha256,
}

impl<R: Read> Read for HashRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Verifies every chunk of a chunked bundle streamed from `r`, positioned at the first byte of
/// `chunks.zst`; returns the image's sha256. Memory: one chunk and one frame.
pub fn verify_stream(
    r: &mut impl Read,
    index: &ChunkIndex,
    info: &ChunksInfo,
) -> Result<String, BundleError> {
    let mut dctx = decompressor().map_err(|source| BundleError::Read { source })?;
    let mut image = Sha256::new();
    let mut pos = 0u64;
    let mut frame = Vec::new();
    let mut out = Vec::new();
    for (i, c) in index.chunks.iter().enumerate() {
        skip(r, c.data_offset - pos)?;
        frame.resize(c.data_len as usize, 0);
        r.read_exact(&mut frame)
            .map_err(|source| truncated(source, c.data_offset))?;
        pos = c.data_end();
        decompress(i, c, &frame, &mut out, &mut dctx).map_err(BundleError::Chunk)?;
        image.update(&out);
    }
    skip(r, info.data_size - pos)?;
    Ok(hex::encode(image.finalize()))
}

fn truncated(source: io::Error, at: u64) -> BundleError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        BundleError::Truncated {
            what: "chunks.zst",
            offset: at,
        }
    } else {
        BundleError::Read { source }
    }
}

fn skip(r: &mut impl Read, n: u64) -> Result<(), BundleError> {
    let got = io::copy(&mut r.take(n), &mut io::sink()).map_err(|source| BundleError::Read { source })?;
    if got < n {
        return Err(BundleError::Truncated {
            what: "chunks.zst",
            offset: got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_of(data: &[u8], frame: &[u8]) -> Chunk {
        Chunk {
            sha256: Sha256::digest(data).into(),
            offset: 0,
            size: u32::try_from(data.len()).unwrap(),
            data_offset: 0,
            data_len: u32::try_from(frame.len()).unwrap(),
        }
    }

    #[test]
    fn decompression_is_bounded_by_the_declared_size_and_checked_by_hash() {
        let mut dctx = decompressor().unwrap();
        let mut out = Vec::new();
        let data = vec![7u8; 64 * 1024];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let c = chunk_of(&data, &frame);
        decompress(0, &c, &frame, &mut out, &mut dctx).unwrap();
        assert_eq!(out, data);

        // A bomb: 256 MiB of zeros in a few KiB, declared as one 64 KiB chunk. It must fail
        // without the buffer growing past the declared size.
        let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        let mut out = Vec::new();
        let err = decompress(3, &c, &bomb, &mut out, &mut dctx).unwrap_err();
        assert!(err.to_string().contains("chunk 3"), "{err}");
        assert!(out.capacity() <= 128 * 1024, "buffer grew to {}", out.capacity());

        // Right size, wrong content.
        let other = vec![8u8; 64 * 1024];
        let frame = zstd::bulk::compress(&other, 3).unwrap();
        let err = decompress(5, &c, &frame, &mut out, &mut dctx).unwrap_err();
        assert!(err.reason.contains("sha256"), "{err}");
    }
}
