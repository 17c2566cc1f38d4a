//! Installing a chunked (format 2) bundle: copy what the device has, fetch only what it lacks.
//!
//! Three passes over the signed chunk index, in image order:
//! 1. **Local.** A chunk already in the target slot at its offset (a resumed install, or an
//!    older image sharing it) is kept; one found by hash in the running slot's index is read
//!    from there, verified and written. Neither slot is trusted: every chunk is hashed first.
//! 2. **Network.** The remaining chunks are grouped into runs of neighbours in `chunks.zst` and
//!    each run is fetched with one HTTP `Range` request; each frame is decompressed into a
//!    buffer bounded by its declared size, verified against its signed sha256, then written.
//! 3. **Whole image.** The slot is synced and its first `image.size` bytes hashed against the
//!    manifest, as for format 1, before the upgrade may go on to the switch.
//!
//! Resume needs no byte offset: after a cut or a power loss pass 1 finds every chunk that reached
//! the slot intact and fetches only the rest. The slot is synced every
//! `download.checkpoint_bytes` of fetched data so a power cut loses little.
//!
//! The index of each slot's image is cached in the state directory (`slot-<a|b>.idx`): written
//! when a chunked image was written and verified (so it is there when that slot runs after the
//! commit), dropped when a write of the slot begins, and rebuilt by cutting the running slot
//! when missing or cut with other sizes.

use super::{Engine, Stop};
use crate::bundle::chunked::{self, ChunkError};
use crate::slot::SlotError;
use flightnode_proto::chunks::{Chunk, ChunkIndex};
use flightnode_proto::manifest::{ChunksInfo, Manifest};
use flightnode_proto::{ErrorCode, Slot};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Neighbouring frames closer than this are fetched in one request (the gap is read and dropped).
const COALESCE_GAP: u64 = 32 * 1024;
/// Upper bound of one request, so a retry after a cut restarts little.
const MAX_RUN: u64 = 32 * 1024 * 1024;
/// Sync the slot at least this often while fetching.
const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Path of the cached index of `slot`.
pub fn cache_path(state_dir: &Path, slot: Slot) -> PathBuf {
    state_dir.join(format!("slot-{slot}.idx"))
}

/// The cache file: a JSON line with the chunk sizes, then the binary index.
fn read_cache(path: &Path, info: &ChunksInfo) -> Option<ChunkIndex> {
    let bytes = std::fs::read(path).ok()?;
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let sizes: [u32; 3] = serde_json::from_slice(&bytes[..nl]).ok()?;
    if sizes != [info.min_size, info.avg_size, info.max_size] {
        return None;
    }
    ChunkIndex::decode(&bytes[nl + 1..]).ok()
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

/// A chunk to fetch, with its number for messages.
struct Missing {
    index: usize,
    chunk: Chunk,
}

impl Engine {
    /// Downloading, chunked bundle: make the target slot hold the image of `index`.
    pub(super) fn write_chunks(
        &mut self,
        manifest: &Manifest,
        index: &ChunkIndex,
        data_offset: u64,
        target: Slot,
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
        let missing = self.copy_local(index, &info, &file, &existing, target, &target_path)?;
        let to_fetch: u64 = missing.iter().map(|m| u64::from(m.chunk.data_len)).sum();
        let fetch_chunks = missing.len();
        tracing::info!(slot = %target, chunks = index.chunks.len(), fetch_chunks, to_fetch,
            local_secs = started.elapsed().as_secs_f64(), "local chunks in place; fetching the rest");
        self.observer.progress(0, to_fetch);
        self.fetch(
            &source,
            data_offset,
            &missing,
            to_fetch,
            &file,
            target,
            &target_path,
        )?;

        self.slots
            .finish(target, &file, size)
            .map_err(|e| Stop::Upgrade(e.code(), e.to_string()))?;
        let mut hasher = Sha256::new();
        self.slots
            .hash_prefix(target, size, &mut hasher)
            .map_err(|e| Stop::Upgrade(e.code(), e.to_string()))?;
        let actual = hex::encode(hasher.finalize());
        if actual != manifest.image.sha256 {
            return Err(Stop::Upgrade(
                ErrorCode::HashMismatch,
                format!(
                    "slot {target} image sha256 is {actual} after writing every verified chunk, but manifest.json says {}; the slot does not hold what was written",
                    manifest.image.sha256
                ),
            ));
        }
        tracing::info!(slot = %target, fetched = to_fetch, fetch_chunks, secs = started.elapsed().as_secs_f64(),
            "chunked image written and verified");
        write_cache(&cache_path(&self.cfg.state_dir, target), &info, index);
        Ok(())
    }

    /// The running slot's chunks by hash: from the cache, or by cutting the slot.
    fn running_chunks(&self, info: &ChunksInfo) -> HashMap<[u8; 32], (u64, u32)> {
        let Ok(running) = self.running() else {
            return HashMap::new();
        };
        let path = cache_path(&self.cfg.state_dir, running);
        let index = if let Some(index) = read_cache(&path, info) {
            index
        } else {
            let slot_path = self.slots.path(running);
            let started = Instant::now();
            let built = File::open(slot_path).and_then(|mut f| {
                let len = f.seek(SeekFrom::End(0))?;
                f.seek(SeekFrom::Start(0))?;
                chunked::index_stream(std::io::BufReader::with_capacity(1 << 20, f), len, info)
            });
            match built {
                Ok(index) => {
                    tracing::info!(slot = %running, chunks = index.chunks.len(),
                        secs = started.elapsed().as_secs_f64(), "indexed the running slot");
                    write_cache(&path, info, &index);
                    index
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

    /// Pass 1: keeps chunks the target holds, copies those the running slot holds; returns the
    /// others.
    fn copy_local(
        &mut self,
        index: &ChunkIndex,
        info: &ChunksInfo,
        file: &File,
        existing: &File,
        target: Slot,
        target_path: &Path,
    ) -> Result<Vec<Missing>, Stop> {
        let running = self.running_chunks(info);
        let running_file = self
            .running()
            .ok()
            .and_then(|slot| File::open(self.slots.path(slot)).ok());
        let mut buf = Vec::with_capacity(info.max_size as usize);
        let mut missing = Vec::new();
        let (mut kept, mut copied) = (0u64, 0u64);
        for (i, c) in index.chunks.iter().enumerate() {
            if i % 256 == 0
                && let Some(stop) = self.interrupted()
            {
                return Err(stop);
            }
            if read_verified(existing, c.offset, c, &mut buf) {
                kept += u64::from(c.size);
                continue;
            }
            let from_running = running.get(&c.sha256).is_some_and(|&(offset, size)| {
                size == c.size
                    && running_file
                        .as_ref()
                        .is_some_and(|f| read_verified(f, offset, c, &mut buf))
            });
            if from_running {
                file.write_all_at(&buf, c.offset)
                    .map_err(|e| slot_stop(target, target_path, "write a copied chunk", e))?;
                copied += u64::from(c.size);
                continue;
            }
            missing.push(Missing { index: i, chunk: *c });
        }
        tracing::info!(slot = %target, kept, copied, missing = missing.len(), "chunks found locally");
        Ok(missing)
    }

    /// Pass 2: fetches the missing chunks in coalesced `Range` requests.
    #[allow(
        clippy::too_many_arguments,
        reason = "one pass over the index: the fetch needs the plan, both slots, the fetcher and the progress"
    )]
    fn fetch(
        &mut self,
        source: &str,
        data_offset: u64,
        missing: &[Missing],
        to_fetch: u64,
        file: &File,
        target: Slot,
        target_path: &Path,
    ) -> Result<(), Stop> {
        let mut dctx =
            chunked::decompressor().map_err(|e| Stop::Upgrade(ErrorCode::Internal, e.to_string()))?;
        let mut frame = Vec::new();
        let mut out = Vec::new();
        let mut fetched = 0u64;
        let mut unsynced = 0u64;
        let mut last_sync = Instant::now();
        let checkpoint = self.cfg.download.checkpoint_bytes.max(4096);
        let mut rest = missing;
        while let Some(first) = rest.first() {
            let mut n = 1;
            while let Some(next) = rest.get(n) {
                let prev = &rest[n - 1].chunk;
                if next.chunk.data_offset - prev.data_end() > COALESCE_GAP
                    || next.chunk.data_end() - first.chunk.data_offset > MAX_RUN
                {
                    break;
                }
                n += 1;
            }
            let (run, tail) = rest.split_at(n);
            rest = tail;
            let start = first.chunk.data_offset;
            let len = run[n - 1].chunk.data_end() - start;
            let fetch_stop = |this: &Self, e: crate::download::DownloadError| {
                this.interrupted()
                    .unwrap_or(Stop::Upgrade(e.code(), e.to_string()))
            };
            let mut reader = self
                .fetcher
                .open_range(source, data_offset + start, len)
                .map_err(|e| fetch_stop(self, e))?;
            let mut pos = start;
            for m in run {
                if let Some(stop) = self.interrupted() {
                    let _ = file.sync_data();
                    return Err(stop);
                }
                let c = &m.chunk;
                let gap = c.data_offset - pos;
                if gap > 0 {
                    std::io::copy(&mut (&mut reader).take(gap), &mut std::io::sink())
                        .map_err(|e| self.read_stop(e))?;
                }
                frame.resize(c.data_len as usize, 0);
                reader.read_exact(&mut frame).map_err(|e| self.read_stop(e))?;
                pos = c.data_end();
                chunked::decompress(m.index, c, &frame, &mut out, &mut dctx).map_err(chunk_stop)?;
                file.write_all_at(&out, c.offset)
                    .map_err(|e| slot_stop(target, target_path, "write a fetched chunk", e))?;
                fetched += u64::from(c.data_len);
                unsynced += u64::from(c.size);
                crate::failpoint::download(fetched);
                self.observer.progress(fetched, to_fetch);
                if unsynced >= checkpoint || last_sync.elapsed() >= SYNC_INTERVAL {
                    file.sync_data()
                        .map_err(|e| slot_stop(target, target_path, "fsync", e))?;
                    unsynced = 0;
                    last_sync = Instant::now();
                }
            }
        }
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

/// Reads chunk `c`'s length at `offset` of `file` into `buf`; true when it hashes to `c.sha256`.
fn read_verified(file: &File, offset: u64, c: &Chunk, buf: &mut Vec<u8>) -> bool {
    buf.resize(c.size as usize, 0);
    file.read_exact_at(buf, offset).is_ok() && <[u8; 32]>::from(Sha256::digest(&buf[..])) == c.sha256
}
