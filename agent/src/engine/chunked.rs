//! Installing a chunked (format 2) bundle: copy what the device has, fetch only what it lacks.
//!
//! One pass over the signed chunk index, in image order. Each chunk comes from the first of:
//! - **the target slot**, at its own offset: on a resume (after a cut or a power loss) the plan
//!   reads and hashes every chunk's place in the slot first, so it knows which reached it; on a
//!   fresh install, those the slot's cached index says it holds (an older image sharing them);
//! - **the running slot**, found by hash in that slot's index;
//! - **the network**: the chunks planned for fetching are grouped into runs of neighbours in
//!   `chunks.zst`, each fetched with one HTTP `Range` request; each frame is decompressed (against
//!   its context, the image bytes before its segment, which the pass has just written) into a
//!   buffer of its declared size and verified against its signed sha256 before it is written.
//!
//! The plan is the same for a fresh install and a resume, so a resume copies from the running
//! slot and coalesces its fetches like a fresh install, and its progress counts only the bytes
//! still to download.
//!
//! Neither slot is trusted: a local chunk is hashed before it is used, and one that does not
//! match is fetched instead. With one chunk worker (`download.chunk_workers`, the default on a
//! 2-core computer) the pass runs on two threads: this one fetches, decompresses and checks each
//! chunk; a writer thread takes the verified chunks in order (through a bounded queue), writes
//! those the slot lacks and computes the whole image's sha256 over the same bytes (nothing is
//! read back from the slot), which is checked against the manifest before the upgrade may go on
//! to the switch, as for format 1. With more, workers decompress and check the chunks while this
//! thread fetches and keeps the order (`pool`); the writer is the same.
//!
//! Resume needs no byte offset: the next attempt finds every chunk that reached the slot intact
//! and fetches only the rest. The slot is synced every `download.checkpoint_bytes` written so a
//! power cut loses little.
//!
//! The index of each slot's image is cached in the state directory (`slot-<a|b>.idx`): written
//! when a chunked image was written and verified (so it is there when that slot runs after the
//! commit), dropped when a write of the slot begins, and rebuilt by cutting the running slot
//! when missing or cut with other sizes. Cutting reads only the running image, not the whole
//! partition: its size when an older cache says it, else the size of the image being installed
//! (the state does not record the size of a factory or format-1 image), and at most
//! [`RUNNING_CHUNKS_PER_CHUNK`] times as many chunks as the new image has, so the index of a
//! large partition cut with small chunks cannot exhaust the memory of the device.

use super::{Engine, Stop};
use crate::bundle::chunked::{self, ChunkError};
use crate::slot::SlotError;
use flightnode_proto::chunks::{Chunk, ChunkIndex};
use flightnode_proto::manifest::{ChunksInfo, Manifest};
use flightnode_proto::{ErrorCode, Slot};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod pool;
mod worker;

/// Neighbouring frames closer than this are fetched in one request (the gap is read and dropped).
const COALESCE_GAP: u64 = 32 * 1024;
/// Upper bound of one request, so a retry after a cut restarts little.
const MAX_RUN: u64 = 32 * 1024 * 1024;
/// Sync the slot at least this often while fetching.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Cutting the running slot stops after this many chunks per chunk of the image being installed
/// (and at least [`MIN_RUNNING_CHUNKS`]): its index costs at most a few times the memory of the
/// signed index already held, and the chunks past the cap are fetched.
const RUNNING_CHUNKS_PER_CHUNK: usize = 4;
/// The cap for small images.
const MIN_RUNNING_CHUNKS: usize = 64 * 1024;

/// Path of the cached index of `slot`.
pub fn cache_path(state_dir: &Path, slot: Slot) -> PathBuf {
    state_dir.join(format!("slot-{slot}.idx"))
}

/// The cache file: a JSON line with the chunk sizes, then the binary index.
pub(super) fn read_cache(path: &Path, info: &ChunksInfo) -> Option<ChunkIndex> {
    let (sizes, index) = read_any_cache(path)?;
    (sizes == [info.min_size, info.avg_size, info.max_size]).then_some(index)
}

/// The cache file, whatever chunk sizes it was cut with.
fn read_any_cache(path: &Path) -> Option<([u32; 3], ChunkIndex)> {
    let bytes = std::fs::read(path).ok()?;
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let sizes: [u32; 3] = serde_json::from_slice(&bytes[..nl]).ok()?;
    Some((sizes, ChunkIndex::decode(&bytes[nl + 1..]).ok()?))
}

/// The running slot's index, cut from its first `bound` bytes (or fewer, if the slot is
/// shorter), with at most `cap` chunks.
struct RunningIndex {
    index: ChunkIndex,
    /// Bytes of the slot the index covers.
    covered: u64,
    /// Bytes that were to be indexed: `covered` is less when the cap was hit.
    bound: u64,
}

impl RunningIndex {
    /// Whether the cap stopped the cut before `bound`.
    fn capped(&self) -> bool {
        self.covered < self.bound
    }
}

/// How much of the running slot to cut when its index at `cache` does not fit: the size of its
/// image when a cache cut with other sizes says it, else `image_size` (of the image being
/// installed). Past its image, a slot holds only leftovers of older images (or nothing), and
/// the state does not record the size of a factory or format-1 image.
fn running_bound(cache: &Path, image_size: u64) -> u64 {
    read_any_cache(cache)
        .and_then(|(_, old)| old.chunks.last().map(Chunk::end))
        .unwrap_or(image_size)
}

/// Cuts the first `bound` bytes of the slot at `path` with the sizes of `info`, stopping after
/// `cap` chunks.
fn index_running(path: &Path, bound: u64, cap: usize, info: &ChunksInfo) -> std::io::Result<RunningIndex> {
    let mut f = File::open(path)?;
    let bound = f.seek(SeekFrom::End(0))?.min(bound);
    f.seek(SeekFrom::Start(0))?;
    let index = chunked::index_stream(std::io::BufReader::with_capacity(1 << 20, f), bound, info, cap)?;
    let covered = index.chunks.last().map_or(0, Chunk::end);
    Ok(RunningIndex {
        index,
        covered,
        bound,
    })
}

/// Writes the cache atomically (tmp, fsync, rename); failures only cost a rebuild later.
pub fn write_cache(path: &Path, info: &ChunksInfo, index: &ChunkIndex) {
    let mut bytes = serde_json::to_vec(&[info.min_size, info.avg_size, info.max_size]).unwrap_or_default();
    bytes.push(b'\n');
    bytes.extend_from_slice(&index.encode());
    let tmp = path.with_extension("idx.tmp");
    let written = std::fs::write(&tmp, &bytes)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "cannot cache the slot's chunk index: {e}");
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Drops the cached index of a slot about to be overwritten.
pub fn forget_cache(state_dir: &Path, slot: Slot) {
    let _ = std::fs::remove_file(cache_path(state_dir, slot));
}

#[allow(clippy::needless_pass_by_value, reason = "used as a map_err adapter")]
fn chunk_stop(e: ChunkError) -> Stop {
    Stop::Upgrade(
        ErrorCode::ChunkInvalid,
        format!("{e}; the bundle's chunk data is corrupt or hostile, nothing of it was written"),
    )
}

fn slot_stop(slot: Slot, path: &Path, action: &'static str, source: std::io::Error) -> Stop {
    let e = SlotError::Io {
        slot,
        path: path.to_owned(),
        action,
        source,
    };
    Stop::Upgrade(e.code(), e.to_string())
}

/// Which chunks the target slot may already hold at their own offsets.
pub(super) enum TargetHeld {
    /// Unknown (a resumed write): try every chunk.
    Any,
    /// The chunks of the slot's cached index from before this write began.
    Known(HashSet<(u64, [u8; 32])>),
}

impl TargetHeld {
    /// From the target's cached index, read before the write drops it.
    pub(super) fn cached(state_dir: &Path, target: Slot, info: &ChunksInfo) -> Self {
        let held = read_cache(&cache_path(state_dir, target), info)
            .map(|index| index.chunks.into_iter().map(|c| (c.offset, c.sha256)).collect())
            .unwrap_or_default();
        Self::Known(held)
    }

    /// Where `c` comes from in the target slot, if it does: a resume reads and hashes its place
    /// in `existing` (the slot) now, into `buf`, so the plan knows which chunks to copy or fetch.
    fn plan(&self, c: &Chunk, existing: &File, buf: &mut Vec<u8>) -> Option<Plan> {
        match self {
            Self::Any => {
                buf.resize(c.size as usize, 0);
                read_verified(existing, c.offset, c, buf).then_some(Plan::Held)
            }
            Self::Known(set) => set.contains(&(c.offset, c.sha256)).then_some(Plan::Target),
        }
    }
}

/// Where each chunk of `index` comes from: the target slot, else the running slot (`running`,
/// by hash, when `running_readable`), else the network. A resume reads the whole target slot
/// here, so a cancel or shutdown (`interrupted`) is honoured between chunks.
fn plan_chunks(
    index: &ChunkIndex,
    held: &TargetHeld,
    existing: &File,
    running: &HashMap<[u8; 32], (u64, u32)>,
    running_readable: bool,
    interrupted: impl Fn() -> Option<Stop>,
) -> Result<Vec<Plan>, Stop> {
    let mut buf = Vec::new();
    let mut plan = Vec::with_capacity(index.chunks.len());
    for c in &index.chunks {
        if let Some(stop) = interrupted() {
            return Err(stop);
        }
        plan.push(
            held.plan(c, existing, &mut buf)
                .unwrap_or_else(|| match running.get(&c.sha256) {
                    Some(&(offset, size)) if size == c.size && running_readable => Plan::Running(offset),
                    _ => Plan::Fetch,
                }),
        );
    }
    Ok(plan)
}

/// Where the plan expects a chunk from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// In the target slot at its offset, read and hashed while planning (a resume).
    Held,
    /// In the target slot according to its cached index: hashed when it is read.
    Target,
    /// In the running slot at this offset: hashed when it is read.
    Running(u64),
    Fetch,
}

/// Bytes of the image by where they came from, for the log.
#[derive(Default)]
struct Tally {
    kept: u64,
    copied: u64,
    fetched_chunks: usize,
    fetched: u64,
    /// Bundle bytes to download, for progress: grows when a slot did not hold a planned chunk.
    to_fetch: u64,
}

/// What a pass over the chunks reads from.
struct Inputs<'a> {
    chunks: &'a [Chunk],
    info: &'a ChunksInfo,
    plan: &'a [Plan],
    /// For each chunk planned for fetching, the end of its coalesced run ([`run_ends`]).
    ends: &'a [u64],
    /// The target slot, for reading.
    existing: &'a File,
    running_file: Option<&'a File>,
    /// The target slot, for writing: synced when the pass is interrupted.
    file: &'a File,
    source: &'a str,
    data_offset: u64,
}

/// Where the pass's own threads spent their time, for the log: the pass is as slow as its
/// busiest thread.
#[derive(Default)]
struct Times {
    fetching: Duration,
    /// Decompressing and checking chunks; with workers, their time summed.
    decoding: Duration,
    /// Waiting for a worker to finish a chunk (with workers only).
    waiting: Duration,
    /// Waiting for room in the writer's queue.
    queueing: Duration,
}

/// A pass interrupted by a cancel or shutdown: the chunks already verified reach the slot, so a
/// resume does not fetch them again.
fn interrupt(sink: Sink, file: &File, stop: Stop) -> Stop {
    let _ = sink.finish();
    let _ = file.sync_data();
    stop
}

/// Image bytes handed to the writer thread at a time.
const BATCH: usize = 512 * 1024;
/// Batches queued for the writer thread (4 MiB): enough to keep decompressing while the writer
/// waits for a checkpoint's fsync (with two, the main thread spent about a quarter of the pass
/// waiting for room). Memory stays bounded at `QUEUED` + 4 batches.
const QUEUED: usize = 8;

/// Consecutive image bytes of a batch that go the same way: written to the slot, or only hashed
/// (chunks the slot already holds).
struct Span {
    offset: u64,
    len: usize,
    write: bool,
    /// Bundle bytes fetched up to the end of this span, for the `download@N` failpoint.
    fetched: u64,
}

/// Verified image bytes in image order, with where they go.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where the writer thread spent its time, for the log: the pass is as slow as its busier thread.
#[derive(Default, Clone, Copy)]
struct Busy {
    hash: Duration,
    write: Duration,
    sync: Duration,
}

fn timed<T>(into: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *into += t.elapsed();
    r
}

/// What the writer thread hands back: the image's sha256 and where its time went, or the slot
/// operation that failed.
type Written = Result<([u8; 32], Busy), (&'static str, std::io::Error)>;

/// The second half of the pass, on its own thread so that it overlaps fetching, decompressing
/// and checking the next chunks: it hashes the whole image in order and writes the chunks the
/// slot lacks, syncing the slot every `checkpoint` bytes or `SYNC_INTERVAL`. Only chunks already
/// checked against their signed sha256 are handed to it, so nothing unverified reaches the slot.
/// Bytes are copied into batches (cheap next to hashing) because the context window they come
/// from is reused.
struct Sink {
    batch: Batch,
    tx: Option<SyncSender<Batch>>,
    /// Written batches come back for reuse.
    spent: Receiver<Batch>,
    thread: Option<JoinHandle<Written>>,
    slot: Slot,
    path: PathBuf,
}

impl Sink {
    fn start(file: File, slot: Slot, path: &Path, checkpoint: u64) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Batch>(QUEUED);
        let (back, spent) = sync_channel(QUEUED + 2);
        let thread = std::thread::Builder::new()
            .name("image-writer".into())
            .spawn(move || -> Written {
                let mut hasher = Sha256::new();
                let mut busy = Busy::default();
                let mut unsynced = 0u64;
                let mut last_sync = Instant::now();
                for batch in rx {
                    let mut at = 0;
                    for span in &batch.spans {
                        let bytes = &batch.bytes[at..at + span.len];
                        at += span.len;
                        timed(&mut busy.hash, || hasher.update(bytes));
                        if span.write {
                            timed(&mut busy.write, || file.write_all_at(bytes, span.offset))
                                .map_err(|e| ("write a chunk", e))?;
                            unsynced += bytes.len() as u64;
                            crate::failpoint::download(span.fetched);
                        }
                    }
                    if unsynced >= checkpoint || (unsynced > 0 && last_sync.elapsed() >= SYNC_INTERVAL) {
                        timed(&mut busy.sync, || file.sync_data()).map_err(|e| ("fsync", e))?;
                        unsynced = 0;
                        last_sync = Instant::now();
                    }
                    let _ = back.try_send(batch);
                }
                Ok((hasher.finalize().into(), busy))
            })?;
        Ok(Self {
            batch: Batch::default(),
            tx: Some(tx),
            spent,
            thread: Some(thread),
            slot,
            path: path.to_owned(),
        })
    }

    /// Queues a verified chunk's bytes at image `offset`; false when the writer thread stopped
    /// (`finish` says why).
    fn push(&mut self, offset: u64, bytes: &[u8], write: bool, fetched: u64) -> bool {
        if !self.batch.bytes.is_empty() && self.batch.bytes.len() + bytes.len() > BATCH && !self.send() {
            return false;
        }
        match self.batch.spans.last_mut() {
            Some(s) if s.write == write && s.offset + s.len as u64 == offset => {
                s.len += bytes.len();
                s.fetched = fetched;
            }
            _ => self.batch.spans.push(Span {
                offset,
                len: bytes.len(),
                write,
                fetched,
            }),
        }
        self.batch.bytes.extend_from_slice(bytes);
        true
    }

    fn send(&mut self) -> bool {
        let mut next = self.spent.try_recv().unwrap_or_else(|_| Batch {
            bytes: Vec::with_capacity(BATCH),
            spans: Vec::new(),
        });
        next.bytes.clear();
        next.spans.clear();
        let full = std::mem::replace(&mut self.batch, next);
        self.tx.as_ref().is_some_and(|tx| tx.send(full).is_ok())
    }

    /// Why a push failed: the writer thread stopped, and says why.
    fn stopped(&mut self) -> Stop {
        self.join().err().unwrap_or_else(|| {
            Stop::Upgrade(
                ErrorCode::Internal,
                "the image writer thread stopped early".into(),
            )
        })
    }

    /// Hands over what is left, waits until every queued chunk is written, and returns the
    /// lower-case hex sha256 of every byte given, in order, and where the writer's time went.
    fn finish(mut self) -> Result<(String, Busy), Stop> {
        if !self.batch.bytes.is_empty() {
            self.send();
        }
        self.join()
    }

    fn join(&mut self) -> Result<(String, Busy), Stop> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok((sha256, busy)))) => Ok((hex::encode(sha256), busy)),
            Some(Ok(Err((action, e)))) => Err(slot_stop(self.slot, &self.path, action, e)),
            _ => Err(Stop::Upgrade(
                ErrorCode::Internal,
                "the image writer thread failed".into(),
            )),
        }
    }
}

impl Drop for Sink {
    /// Whatever way the pass ends, no write of the slot outlives it.
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// The open `Range` request: bytes `[pos, end)` of `chunks.zst` are still to be read from it.
struct Run {
    reader: crate::download::BundleReader,
    pos: u64,
    end: u64,
}

/// For each chunk planned for fetching, the end in `chunks.zst` of the coalesced run it belongs
/// to (0 for the others).
fn run_ends(index: &ChunkIndex, plan: &[Plan]) -> Vec<u64> {
    let mut ends = vec![0u64; plan.len()];
    let fetch: Vec<usize> = (0..plan.len()).filter(|&i| plan[i] == Plan::Fetch).collect();
    let mut rest = &fetch[..];
    while let Some(&first) = rest.first() {
        let start = index.chunks[first].data_offset;
        let mut n = 1;
        while let Some(&next) = rest.get(n) {
            let prev = &index.chunks[rest[n - 1]];
            let c = &index.chunks[next];
            if c.data_offset.saturating_sub(prev.data_end()) > COALESCE_GAP
                || c.data_end().saturating_sub(start) > MAX_RUN
            {
                break;
            }
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        let end = index.chunks[run[n - 1]].data_end();
        for &i in run {
            ends[i] = end;
        }
        rest = tail;
    }
    ends
}

impl Engine {
    /// Downloading, chunked bundle: make the target slot hold the image of `index`.
    pub(super) fn write_chunks(
        &mut self,
        manifest: &Manifest,
        index: &ChunkIndex,
        data_offset: u64,
        target: Slot,
        held: &TargetHeld,
    ) -> Result<(), Stop> {
        let Some(info) = manifest.chunks.clone() else {
            return Err(Stop::Upgrade(ErrorCode::Internal, "not a chunked bundle".into()));
        };
        let size = manifest.image.size;
        let source = self.upgrade()?.source.clone();
        let target_path = self.slots.path(target).to_owned();
        // Opening at `size` keeps every byte below it (file slots are cut or grown to it).
        let file = self
            .slots
            .open_at(target, size)
            .map_err(|e| Stop::Upgrade(e.code(), e.to_string()))?;
        let existing =
            File::open(&target_path).map_err(|e| slot_stop(target, &target_path, "open for reading", e))?;

        let started = Instant::now();
        let cap = index
            .chunks
            .len()
            .saturating_mul(RUNNING_CHUNKS_PER_CHUNK)
            .max(MIN_RUNNING_CHUNKS);
        let running = self.running_chunks(&info, size, cap);
        let running_file = self
            .running()
            .ok()
            .and_then(|slot| File::open(self.slots.path(slot)).ok());
        let plan = plan_chunks(index, held, &existing, &running, running_file.is_some(), || {
            self.interrupted()
        })?;
        drop(running);
        let ends = run_ends(index, &plan);
        let planned = |want: fn(&Plan) -> bool| {
            index
                .chunks
                .iter()
                .zip(&plan)
                .filter(|(_, p)| want(p))
                .map(|(c, _)| u64::from(c.size))
                .sum::<u64>()
        };
        let to_fetch: u64 = index
            .chunks
            .iter()
            .zip(&plan)
            .filter(|(_, p)| **p == Plan::Fetch)
            .map(|(c, _)| u64::from(c.data_len))
            .sum();
        tracing::info!(slot = %target, chunks = index.chunks.len(), to_fetch,
            in_target = planned(|p| matches!(p, Plan::Held | Plan::Target)),
            from_running = planned(|p| matches!(p, Plan::Running(_))),
            plan_secs = started.elapsed().as_secs_f64(), "chunk plan made; writing the image in order");
        self.observer.progress(0, to_fetch);

        let checkpoint = self.cfg.download.checkpoint_bytes.max(4096);
        let sink = file
            .try_clone()
            .and_then(|f| Sink::start(f, target, &target_path, checkpoint))
            .map_err(|e| {
                Stop::Upgrade(
                    ErrorCode::Internal,
                    format!("cannot start the image writer thread for slot {target}: {e}"),
                )
            })?;
        let inputs = Inputs {
            chunks: &index.chunks,
            info: &info,
            plan: &plan,
            ends: &ends,
            existing: &existing,
            running_file: running_file.as_ref(),
            file: &file,
            source: &source,
            data_offset,
        };
        let workers = self.cfg.download.chunk_workers();
        let tally = Tally {
            to_fetch,
            ..Tally::default()
        };
        let mut times = Times::default();
        let (sink, tally) = if workers > 1 {
            self.pooled_pass(&inputs, workers, sink, tally, &mut times)?
        } else {
            self.inline_pass(&inputs, sink, tally, &mut times)?
        };

        // Every chunk is written before the slot's final sync.
        let (actual, writer) = sink.finish()?;
        self.slots
            .finish(target, &file, size)
            .map_err(|e| Stop::Upgrade(e.code(), e.to_string()))?;
        if actual != manifest.image.sha256 {
            return Err(Stop::Upgrade(
                ErrorCode::HashMismatch,
                format!(
                    "slot {target} image sha256 is {actual} over every verified chunk, but manifest.json says {}; the chunk index does not describe the signed image",
                    manifest.image.sha256
                ),
            ));
        }
        tracing::info!(slot = %target, kept = tally.kept, copied = tally.copied, fetched = tally.fetched,
            fetched_chunks = tally.fetched_chunks, workers, secs = started.elapsed().as_secs_f64(),
            fetch_secs = times.fetching.as_secs_f64(), decompress_check_secs = times.decoding.as_secs_f64(),
            worker_wait_secs = times.waiting.as_secs_f64(),
            queue_wait_secs = times.queueing.as_secs_f64(), image_sha256_secs = writer.hash.as_secs_f64(),
            write_secs = writer.write.as_secs_f64(), sync_secs = writer.sync.as_secs_f64(),
            "chunked image written and verified");
        write_cache(&cache_path(&self.cfg.state_dir, target), &info, index);
        Ok(())
    }

    /// The pass on this thread: fetch, decompress and check each chunk in turn, while the writer
    /// thread writes and hashes the ones before it.
    fn inline_pass(
        &mut self,
        at: &Inputs<'_>,
        mut sink: Sink,
        mut tally: Tally,
        times: &mut Times,
    ) -> Result<(Sink, Tally), Stop> {
        let mut dctx = chunked::decompressor();
        let mut window = chunked::Window::new(at.info);
        let mut frame = Vec::new();
        let mut run: Option<Run> = None;
        for (i, c) in at.chunks.iter().enumerate() {
            if let Some(stop) = self.interrupted() {
                return Err(interrupt(sink, at.file, stop));
            }
            let (dict, out) = window.next(c);
            let local = match at.plan[i] {
                // Hashed while planning; the image's sha256 at the end covers it again.
                Plan::Held => at.existing.read_exact_at(out, c.offset).is_ok().then_some(false),
                Plan::Target => read_verified(at.existing, c.offset, c, out).then_some(false),
                Plan::Running(offset) => at
                    .running_file
                    .is_some_and(|f| read_verified(f, offset, c, out))
                    .then_some(true),
                Plan::Fetch => None,
            };
            let write = if let Some(copied) = local {
                if copied {
                    tally.copied += u64::from(c.size);
                } else {
                    tally.kept += u64::from(c.size);
                }
                copied
            } else {
                if at.plan[i] != Plan::Fetch {
                    // The slot did not hold what its index said: fetch it after all.
                    tally.to_fetch += u64::from(c.data_len);
                }
                let end = at.ends[i].max(c.data_end());
                timed(&mut times.fetching, || {
                    self.read_frame(&mut run, at.source, at.data_offset, c, end, &mut frame)
                })?;
                timed(&mut times.decoding, || {
                    chunked::decompress(i, c, &frame, dict, out, &mut dctx)
                })
                .map_err(chunk_stop)?;
                tally.fetched += u64::from(c.data_len);
                tally.fetched_chunks += 1;
                true
            };
            let bytes = window.fill(c);
            if !timed(&mut times.queueing, || {
                sink.push(c.offset, bytes, write, tally.fetched)
            }) {
                return Err(sink.stopped());
            }
            if local.is_none() {
                self.observer.progress(tally.fetched, tally.to_fetch);
            }
        }
        Ok((sink, tally))
    }

    /// The running slot's chunks by hash: from the cache, or by cutting the slot's image (see the
    /// module docs for its bound), with at most `cap` chunks. `image_size`: of the image being
    /// installed.
    fn running_chunks(
        &self,
        info: &ChunksInfo,
        image_size: u64,
        cap: usize,
    ) -> HashMap<[u8; 32], (u64, u32)> {
        let Ok(running) = self.running() else {
            return HashMap::new();
        };
        let path = cache_path(&self.cfg.state_dir, running);
        let index = if let Some(index) = read_cache(&path, info) {
            index
        } else {
            let bound = running_bound(&path, image_size);
            let slot_path = self.slots.path(running);
            let started = Instant::now();
            match index_running(slot_path, bound, cap, info) {
                Ok(cut) => {
                    if cut.capped() {
                        tracing::warn!(slot = %running, path = %slot_path.display(), cap,
                            covered = cut.covered, bound = cut.bound,
                            "indexing the running slot stopped at its chunk cap; chunks past it are fetched, not copied (larger chunks avoid this)");
                    } else {
                        write_cache(&path, info, &cut.index);
                    }
                    tracing::info!(slot = %running, chunks = cut.index.chunks.len(), bytes = cut.covered,
                        secs = started.elapsed().as_secs_f64(), "indexed the running slot");
                    cut.index
                }
                Err(e) => {
                    tracing::warn!(slot = %running, path = %slot_path.display(),
                        "cannot index the running slot; fetching every chunk: {e}");
                    return HashMap::new();
                }
            }
        };
        let mut map = HashMap::with_capacity(index.chunks.len());
        for c in index.chunks {
            map.entry(c.sha256).or_insert((c.offset, c.size));
        }
        map
    }

    /// Reads chunk `c`'s frame into `frame` from the open run when it covers it, else from a new
    /// `Range` request for `chunks.zst` bytes `[c.data_offset, end)`.
    fn read_frame(
        &self,
        run: &mut Option<Run>,
        source: &str,
        data_offset: u64,
        c: &Chunk,
        end: u64,
        frame: &mut Vec<u8>,
    ) -> Result<(), Stop> {
        let covered = run
            .as_ref()
            .is_some_and(|r| r.pos <= c.data_offset && c.data_end() <= r.end);
        if !covered {
            *run = None;
            let reader = self
                .fetcher
                .open_range(source, data_offset + c.data_offset, end - c.data_offset)
                .map_err(|e| {
                    self.interrupted()
                        .unwrap_or(Stop::Upgrade(e.code(), e.to_string()))
                })?;
            *run = Some(Run {
                reader,
                pos: c.data_offset,
                end,
            });
        }
        let Some(r) = run.as_mut() else {
            return Err(Stop::Upgrade(ErrorCode::Internal, "no open range".into()));
        };
        let gap = c.data_offset - r.pos;
        if gap > 0 {
            std::io::copy(&mut (&mut r.reader).take(gap), &mut std::io::sink())
                .map_err(|e| self.read_stop(e))?;
        }
        frame.resize(c.data_len as usize, 0);
        r.reader.read_exact(frame).map_err(|e| self.read_stop(e))?;
        r.pos = c.data_end();
        Ok(())
    }

    /// A failed read of a fetched range: the fetch error it carries, or what interrupted it.
    #[allow(clippy::needless_pass_by_value, reason = "used as a map_err adapter")]
    fn read_stop(&self, e: std::io::Error) -> Stop {
        if let Some(stop) = self.interrupted() {
            return stop;
        }
        match crate::download::DownloadError::from_io(&e) {
            Some(d) => Stop::Upgrade(d.code(), d.to_string()),
            None => Stop::Upgrade(
                ErrorCode::DownloadFailed,
                format!("reading chunk data failed: {e}"),
            ),
        }
    }
}

/// Reads chunk `c` from `offset` of `file` into `buf` (its size); true when it hashes to
/// `c.sha256`.
fn read_verified(file: &File, offset: u64, c: &Chunk, buf: &mut [u8]) -> bool {
    file.read_exact_at(buf, offset).is_ok() && <[u8; 32]>::from(Sha256::digest(&*buf)) == c.sha256
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap().wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Chunks spread over several batches: the slot gets exactly the chunks marked for writing,
    /// the ones it already holds are left as they are, and the hash covers every chunk in order.
    #[test]
    fn sink_writes_only_the_chunks_to_write_and_hashes_them_all_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let held = vec![0xEE; 3 * BATCH];
        std::fs::write(&path, &held).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut sink = Sink::start(file, Slot::B, &path, 4096).unwrap();
        let sizes = [BATCH / 3, BATCH / 2, 70_000, BATCH, 4096, BATCH / 4];
        let (mut offset, mut image, mut expected) = (0usize, Vec::new(), Vec::new());
        for (k, &len) in (0u8..).zip(&sizes) {
            let write = k % 3 != 1;
            let bytes = if write {
                pattern(k, len)
            } else {
                held[offset..offset + len].to_vec()
            };
            assert!(sink.push(offset as u64, &bytes, write, 0));
            image.extend_from_slice(&bytes);
            expected.extend_from_slice(if write {
                &bytes
            } else {
                &held[offset..offset + len]
            });
            offset += len;
        }
        let (sha, _) = sink.finish().unwrap_or_else(|_| panic!("the writer failed"));
        assert_eq!(sha, hex::encode(Sha256::digest(&image)));
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..offset], &expected[..]);
        assert!(
            on_disk[offset..].iter().all(|&b| b == 0xEE),
            "nothing past the last chunk"
        );
        // A kept chunk with other bytes than the slot's shows it is not written.
        let mut sink = Sink::start(
            std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            Slot::B,
            &path,
            4096,
        )
        .unwrap();
        assert!(sink.push(0, &[1u8; 100], false, 0));
        assert!(sink.finish().is_ok());
        assert_eq!(std::fs::read(&path).unwrap()[..100], expected[..100]);
    }

    /// Item k: a large partition holding a small image is cut only up to the bound (not to its
    /// end), and a cut that would make more chunks than the cap stops there and says so. A cache
    /// cut with other sizes bounds the cut to the image it describes.
    #[test]
    fn indexing_the_running_slot_is_bounded_by_the_image_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        let image = 1 << 20;
        std::fs::write(&slot, pattern(3, image)).unwrap();
        // A 256 MiB partition: the rest is whatever was there (here: a hole of zeros).
        File::options()
            .write(true)
            .open(&slot)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let info = chunked::new_info(0, 0, 1024);

        let cut = index_running(&slot, image as u64, usize::MAX, &info).unwrap();
        assert!(!cut.capped());
        assert_eq!(cut.covered, image as u64, "the whole image and nothing past it");
        assert!(cut.index.chunks.len() <= image / info.min_size as usize);

        let cut = index_running(&slot, image as u64, 10, &info).unwrap();
        assert_eq!(cut.index.chunks.len(), 10);
        assert!(cut.capped(), "covered {} of {}", cut.covered, cut.bound);

        let cache = dir.path().join("slot-a.idx");
        assert_eq!(
            running_bound(&cache, 5 << 20),
            5 << 20,
            "no cache: the new image's size"
        );
        let other = chunked::new_info(0, 0, 4096);
        let old = index_running(&slot, 600_000, usize::MAX, &other).unwrap();
        write_cache(&cache, &other, &old.index);
        assert!(read_cache(&cache, &info).is_none());
        assert_eq!(
            running_bound(&cache, 5 << 20),
            600_000,
            "the image the old cache describes"
        );
    }

    /// A slot that cannot be written ends the pass with a slot error naming the file, and the
    /// main thread learns it on a later push or at the end.
    #[test]
    fn sink_reports_a_failed_write_with_the_slot_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, b"old").unwrap();
        let read_only = File::open(&path).unwrap();
        let mut sink = Sink::start(read_only, Slot::A, &path, 4096).unwrap();
        let chunk = vec![7u8; BATCH / 2];
        let mut pushed = 0;
        while pushed < 4 * (QUEUED + 4) && sink.push((pushed * chunk.len()) as u64, &chunk, true, 0) {
            pushed += 1;
        }
        match sink.finish() {
            Err(Stop::Upgrade(_, message)) => {
                assert!(message.contains("write a chunk"), "{message}");
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            Err(Stop::Rebooting(_) | Stop::Paused | Stop::Engine(_) | Stop::Again) => {
                panic!("not an upgrade error")
            }
            Ok((sha, _)) => panic!("a read-only slot was written: {sha}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
