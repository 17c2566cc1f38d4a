//! Chunked bundles (format 2): cutting and compressing an image, and decompressing one chunk with
//! a hard bound.
//!
//! The chunk boundaries are content-defined (FastCDC 2020), so a device that cuts its running
//! slot with the manifest's sizes finds the chunks an update left unchanged by their sha256.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use fastcdc::v2020::StreamCDC;
use flightnode_proto::chunks::{Chunk, ChunkIndex, context_range};
use flightnode_proto::manifest::{CHUNKER, COMPRESSION, ChunksInfo, ContextInfo};
use sha2::{Digest, Sha256};
use zstd::zstd_safe::{CCtx, CDict, DCtx};

use super::BundleError;

/// FastCDC average chunk size of new bundles without `--chunk-kib`; the minimum is a quarter of
/// the average and the maximum four times it.
pub const AVG_SIZE: u32 = 64 * 1024;
/// Context window of new bundles (`bundle create --window-kib`): each frame may refer to this
/// much of the image before its segment. Measured on Debian arm64 root filesystems at level 19:
/// frames sum to about 1.6 times a whole-image `zstd -19` without context; 1.07 times with
/// 2 MiB, 1.05 with 4 MiB (devices hold twice the window).
pub const DEFAULT_WINDOW: u32 = 4 * 1024 * 1024;
/// Segment of new bundles (`--segment-kib`): the chunks of one segment share one digested
/// dictionary, so making a bundle digests about `window / segment` times the image on top of
/// compressing it. Halving it to 128 KiB at a 2 MiB window (the same work as 4 MiB / 256 KiB)
/// compressed 1.1 % worse than 4 MiB / 256 KiB; doubling it to 512 KiB at 4 MiB, 1.2 % worse.
pub const SEGMENT: u32 = 256 * 1024;
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

/// Decompresses the frame of chunk `index` into `out` (exactly the chunk's declared size) with
/// `dict` (its context, empty for an independent frame) and checks its sha256.
///
/// zstd decodes straight into `out`: a frame that would expand past the declared size fails
/// instead of allocating (a decompression bomb costs nothing), and one that yields fewer bytes
/// fails too.
pub fn decompress(
    index: usize,
    chunk: &Chunk,
    frame: &[u8],
    dict: &[u8],
    out: &mut [u8],
    dctx: &mut DCtx<'static>,
) -> Result<(), ChunkError> {
    let size = chunk.size as usize;
    let n = dctx.decompress_using_dict(out, frame, dict).map_err(|code| {
        ChunkError::new(
            index,
            chunk,
            format!(
                "does not decompress within its declared {size} bytes: {}",
                zstd::zstd_safe::get_error_name(code)
            ),
        )
    })?;
    if n != size {
        return Err(ChunkError::new(
            index,
            chunk,
            format!("decompresses to {n} bytes, the index says {size}"),
        ));
    }
    check_hash(index, chunk, &out[..n])
}

/// Checks that `bytes` hash to chunk `index`'s signed sha256.
pub fn check_hash(index: usize, chunk: &Chunk, bytes: &[u8]) -> Result<(), ChunkError> {
    let actual: [u8; 32] = Sha256::digest(bytes).into();
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
pub fn decompressor() -> DCtx<'static> {
    DCtx::create()
}

/// The image bytes a device holds while it writes a chunked image in image order: the context
/// the next chunk's frame refers to, and room for that chunk. Memory: twice the context window
/// and segment, plus one chunk, allocated once.
pub struct Window {
    buf: Vec<u8>,
    /// Image offset of `buf[0]`.
    start: u64,
    /// `buf[..len]` holds image bytes `[start, start + len)`.
    len: usize,
    context: Option<ContextInfo>,
}

impl Window {
    /// A window for the chunks of `info`.
    pub fn new(info: &ChunksInfo) -> Self {
        let reach = info.context.map_or(0, |c| c.window as usize + c.segment as usize);
        Self {
            buf: vec![0; 2 * reach + info.max_size as usize],
            start: 0,
            len: 0,
            context: info.context,
        }
    }

    /// Image offset of the next chunk.
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// Makes room for `chunk`, which must start where the previous one ended, and returns its
    /// context and the buffer its bytes go to. Drops only bytes no later chunk refers to.
    pub fn next(&mut self, chunk: &Chunk) -> (&[u8], &mut [u8]) {
        debug_assert_eq!(chunk.offset, self.end(), "chunks go in image order");
        let (from, to) = self
            .context
            .map_or((chunk.offset, chunk.offset), |c| context_range(chunk.offset, &c));
        let size = chunk.size as usize;
        if self.len + size > self.buf.len() {
            // `from` is within window + segment of the chunk, so at least that much room frees up.
            let keep = usize::try_from(from - self.start).unwrap_or(0);
            self.buf.copy_within(keep..self.len, 0);
            self.start = from;
            self.len -= keep;
        }
        let (held, rest) = self.buf.split_at_mut(self.len);
        // Both are within `held` (at most window + segment + a chunk), so they fit a usize.
        let at = |offset: u64| usize::try_from(offset - self.start).unwrap_or(usize::MAX);
        let dict = &held[at(from)..at(to)];
        (dict, &mut rest[..size])
    }

    /// Records the bytes [`next`](Self::next) returned as filled, and returns them.
    pub fn fill(&mut self, chunk: &Chunk) -> &[u8] {
        let at = self.len;
        self.len += chunk.size as usize;
        &self.buf[at..self.len]
    }

    /// Appends `chunk`'s bytes, decompressed or read elsewhere (`bytes.len()` is its size).
    pub fn append(&mut self, chunk: &Chunk, bytes: &[u8]) {
        let (_, out) = self.next(chunk);
        out.copy_from_slice(bytes);
        self.fill(chunk);
    }

    /// The context of `chunk` when the window holds all of it, else `None`: its frame can be
    /// decompressed while the chunks between its context and it are not here yet.
    pub fn context(&self, chunk: &Chunk) -> Option<&[u8]> {
        let Some(c) = self.context else {
            return Some(&[]);
        };
        let (from, to) = context_range(chunk.offset, &c);
        let at = |offset: u64| usize::try_from(offset.checked_sub(self.start)?).ok();
        self.buf[..self.len].get(at(from)?..at(to)?)
    }
}

/// The chunking section of a new bundle, before its index is known; `window` 0 makes
/// independent frames, `segment` is how many image bytes share one context, `avg_size` is
/// FastCDC's average chunk size.
pub fn new_info(window: u32, segment: u32, avg_size: u32) -> ChunksInfo {
    ChunksInfo {
        chunker: CHUNKER.into(),
        min_size: avg_size / 4,
        avg_size,
        max_size: avg_size.saturating_mul(4),
        compression: COMPRESSION.into(),
        count: 0,
        index_size: 0,
        index_sha256: String::new(),
        data_size: 0,
        context: (window > 0).then_some(ContextInfo { window, segment }),
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

/// Chunks of one batch, as (image offset, length), in image order.
type Span = (u64, usize);
/// A compressed chunk: its frame and the sha256 of its bytes.
type Frame = (Vec<u8>, [u8; 32]);

/// Cuts `image` into chunks, compresses each at `level` (against its context when `info` has
/// one; batches of segments on all cores) and appends the frames to `data`. One read of the
/// image, in bounded memory (one batch plus the context before it).
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
    // Image bytes `[held_start, held_start + held.len())`: the batch and the context before it.
    let mut held: Vec<u8> = Vec::new();
    let mut held_start = 0u64;
    let reach = info
        .context
        .map_or(0, |c| u64::from(c.window) + u64::from(c.segment));
    loop {
        let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
        for next in chunker.by_ref().take(BATCH) {
            let c = next.map_err(|e| read_err(io::Error::from(e)))?;
            held.extend_from_slice(&c.data);
            batch.push((c.offset, c.length));
        }
        let Some(&(last, last_len)) = batch.last() else {
            break;
        };
        // Work units: the chunks of one segment share a digested dictionary.
        let groups: Vec<&[Span]> = match info.context {
            Some(c) => batch
                .chunk_by(|a, b| context_range(a.0, &c) == context_range(b.0, &c))
                .collect(),
            None => batch.chunks(batch.len().div_ceil(threads)).collect(),
        };
        let per = groups.len().div_ceil(threads);
        let view = Held {
            bytes: &held,
            start: held_start,
        };
        let results: Vec<io::Result<Vec<Frame>>> = std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .chunks(per)
                .map(|part| s.spawn(move || compress_groups(part, view, info.context, level)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a compression thread panicked")))
                })
                .collect()
        });
        let mut spans = batch.iter();
        for part in results {
            for (frame, sha256) in part.map_err(out_err)? {
                let Some(&(offset, length)) = spans.next() else {
                    return Err(out_err(io::Error::other("compression lost a chunk")));
                };
                data.write_all(&frame).map_err(out_err)?;
                index.chunks.push(Chunk {
                    sha256,
                    offset,
                    size: u32::try_from(length).map_err(|_| out_err(io::Error::other("chunk too large")))?,
                    data_offset: data_size,
                    data_len: u32::try_from(frame.len())
                        .map_err(|_| out_err(io::Error::other("frame too large")))?,
                });
                data_size += frame.len() as u64;
            }
        }
        // Keep what the next batch's contexts may refer to.
        let end = last + last_len as u64;
        let keep_from = end.saturating_sub(reach).max(held_start);
        held.drain(..usize::try_from(keep_from - held_start).unwrap_or(held.len()));
        held_start = keep_from;
    }
    drop(chunker);
    let size = index.chunks.last().map_or(0, Chunk::end);
    Ok(Compressed {
        index,
        size,
        sha256: hex::encode(hasher.finalize()),
        data_size,
    })
}

/// Image bytes held by [`compress_image`].
#[derive(Clone, Copy)]
struct Held<'a> {
    bytes: &'a [u8],
    start: u64,
}

impl Held<'_> {
    fn get(&self, from: u64, to: u64) -> io::Result<&[u8]> {
        let range = usize::try_from(from - self.start).map_err(io::Error::other)?
            ..usize::try_from(to - self.start).map_err(io::Error::other)?;
        self.bytes
            .get(range)
            .ok_or_else(|| io::Error::other(format!("image bytes {from}..{to} not held")))
    }
}

/// Compresses the chunks of `groups` (each sharing one context): their frames and sha256s.
fn compress_groups(
    groups: &[&[Span]],
    held: Held<'_>,
    context: Option<ContextInfo>,
    level: i32,
) -> io::Result<Vec<Frame>> {
    let zerr =
        |what: &str, code| io::Error::other(format!("{what}: {}", zstd::zstd_safe::get_error_name(code)));
    let mut cctx = CCtx::create();
    let mut out = Vec::new();
    for group in groups {
        let Some(&(first, _)) = group.first() else {
            continue;
        };
        let (from, to) = context.map_or((first, first), |c| context_range(first, &c));
        // The same dictionary as the device's `ZSTD_decompress_usingDict` over these bytes.
        let cdict = if from < to {
            let dict = held.get(from, to)?;
            Some(CDict::try_create(dict, level).ok_or_else(|| {
                io::Error::other(format!(
                    "zstd refuses image bytes {from}..{to} as the context of the chunks after them"
                ))
            })?)
        } else {
            None
        };
        for &(offset, length) in *group {
            let src = held.get(offset, offset + length as u64)?;
            let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(src.len()));
            match &cdict {
                Some(d) => cctx.compress_using_cdict(&mut frame, src, d),
                None => cctx.compress(&mut frame, src, level),
            }
            .map_err(|c| zerr("zstd compression failed", c))?;
            out.push((frame, Sha256::digest(src).into()));
        }
    }
    Ok(out)
}

/// Cuts the first `len` bytes of `reader` (a slot) with `info`'s sizes and returns their chunks
/// (data fields zero): the index a device keeps of its running slot. Stops after `max_chunks`
/// chunks (the last one's end then falls short of `len`).
pub fn index_stream(
    reader: impl Read,
    len: u64,
    info: &ChunksInfo,
    max_chunks: usize,
) -> io::Result<ChunkIndex> {
    let mut index = ChunkIndex::default();
    let chunker = StreamCDC::new(
        reader.take(len),
        info.min_size as usize,
        info.avg_size as usize,
        info.max_size as usize,
    );
    for c in chunker.take(max_chunks) {
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
    let mut dctx = decompressor();
    let mut window = Window::new(info);
    let mut image = Sha256::new();
    let mut pos = 0u64;
    let mut frame = Vec::new();
    for (i, c) in index.chunks.iter().enumerate() {
        skip(r, c.data_offset - pos)?;
        frame.resize(c.data_len as usize, 0);
        r.read_exact(&mut frame)
            .map_err(|source| truncated(source, c.data_offset))?;
        pos = c.data_end();
        let (dict, out) = window.next(c);
        decompress(i, c, &frame, dict, out, &mut dctx).map_err(BundleError::Chunk)?;
        image.update(window.fill(c));
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
        let mut dctx = decompressor();
        let data = vec![7u8; 64 * 1024];
        let mut out = vec![0u8; data.len()];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let c = chunk_of(&data, &frame);
        decompress(0, &c, &frame, &[], &mut out, &mut dctx).unwrap();
        assert_eq!(out, data);

        // A bomb: 256 MiB of zeros in a few KiB, declared as one 64 KiB chunk. It must fail
        // within the declared size's buffer.
        let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        let err = decompress(3, &c, &bomb, &[], &mut out, &mut dctx).unwrap_err();
        assert!(err.to_string().contains("chunk 3"), "{err}");

        // Right size, wrong content.
        let other = vec![8u8; 64 * 1024];
        let frame = zstd::bulk::compress(&other, 3).unwrap();
        let err = decompress(5, &c, &frame, &[], &mut out, &mut dctx).unwrap_err();
        assert!(err.reason.contains("sha256"), "{err}");
    }

    /// Frames made against their context decode in image order through a [`Window`] (also
    /// across its compactions), come out much smaller than independent ones on text that
    /// repeats, and do not decode without their context.
    #[test]
    fn context_frames_round_trip_through_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let mut bytes = Vec::new();
        let mut i = 0u64;
        while bytes.len() < 3 << 20 {
            // Lines that repeat every 10 000 lines (about 250 KB): beyond a chunk, within the window.
            bytes.extend_from_slice(format!("line {} of a file {}\n", i % 10_000, i % 7).as_bytes());
            i += 1;
        }
        std::fs::write(&image, &bytes).unwrap();
        let sizes = |window| {
            let mut info = new_info(window, 64 * 1024, AVG_SIZE);
            let mut data = Vec::new();
            let c = compress_image(&image, &info, 3, &mut data, &dir.path().join("data")).unwrap();
            info.count = c.index.chunks.len() as u64;
            info.data_size = c.data_size;
            let got = verify_stream(&mut data.as_slice(), &c.index, &info).unwrap();
            assert_eq!(got, hex::encode(Sha256::digest(&bytes)));
            (c, data)
        };
        let (independent, _) = sizes(0);
        let (context, data) = sizes(1 << 20);
        assert!(
            context.data_size * 2 < independent.data_size,
            "with context {} bytes, independent {}",
            context.data_size,
            independent.data_size
        );
        // A late chunk alone, without the image before it, is refused.
        let c = context.index.chunks[context.index.chunks.len() - 2];
        let frame = &data[usize::try_from(c.data_offset).unwrap()..usize::try_from(c.data_end()).unwrap()];
        let mut out = vec![0u8; c.size as usize];
        let err = decompress(7, &c, frame, &[], &mut out, &mut decompressor()).unwrap_err();
        assert!(err.to_string().contains("chunk 7"), "{err}");
    }
}
