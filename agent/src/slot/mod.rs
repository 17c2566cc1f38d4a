//! Where images go: the `file` and `block` slot backends.
//!
//! A slot backend opens the target slot for writing at an offset, re-reads a written prefix to
//! rebuild the hash after a crash, and makes what was written durable.

mod block;
mod file;

pub use block::BlockSlots;
pub use file::FileSlots;

use crate::config::{SlotBackendKind, SlotsConfig};
use flightnode_proto::Slot;
use sha2::Digest;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A slot operation that failed, naming the slot's path.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Opening, writing, reading or syncing the slot failed.
    #[error("slot {slot} ({path}): {action}")]
    Io {
        /// Which slot.
        slot: Slot,
        /// File or device.
        path: PathBuf,
        /// What we were doing.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The slot is mounted or held open exclusively by someone else: writing it would corrupt a
    /// live filesystem (or the running root).
    #[error("slot {slot} ({path}) is in use: {reason}; refusing to write it")]
    InUse {
        /// Which slot.
        slot: Slot,
        /// The device.
        path: PathBuf,
        /// Mounted where, or the open error.
        reason: String,
    },
    /// The image does not fit.
    #[error("slot {slot} ({path}) has room for {available} bytes, the image needs {needed}")]
    NoSpace {
        /// Which slot.
        slot: Slot,
        /// File or device.
        path: PathBuf,
        /// Bytes the image needs.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
}

impl SlotError {
    /// The contract code: `no_space` for a full disk or a small partition, else `internal`.
    pub fn code(&self) -> flightnode_proto::ErrorCode {
        match self {
            SlotError::NoSpace { .. } => flightnode_proto::ErrorCode::NoSpace,
            SlotError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                flightnode_proto::ErrorCode::NoSpace
            }
            SlotError::Io { .. } | SlotError::InUse { .. } => flightnode_proto::ErrorCode::Internal,
        }
    }
}

/// Slots as image files or as raw partitions. Impls: [`FileSlots`], [`BlockSlots`].
pub trait SlotBackend: Send + Sync {
    /// The file or device of `slot`.
    fn path(&self, slot: Slot) -> &Path;

    /// Fails with [`SlotError::NoSpace`] unless `size` image bytes fit into `slot`.
    fn check_room(&self, slot: Slot, size: u64) -> Result<(), SlotError>;

    /// Opens `slot` for writing with the cursor at `offset`; bytes before `offset` are kept.
    fn open_at(&self, slot: Slot, offset: u64) -> Result<File, SlotError>;

    /// Makes the first `size` bytes of `slot` durable (and, for files, cuts anything after them).
    fn finish(&self, slot: Slot, file: &File, size: u64) -> Result<(), SlotError>;

    /// Feeds the first `len` bytes of `slot` into `hasher` (to resume an interrupted write).
    fn hash_prefix(&self, slot: Slot, len: u64, hasher: &mut sha2::Sha256) -> Result<(), SlotError> {
        let path = self.path(slot);
        let io = |action, source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        };
        let file = File::open(path).map_err(|e| io("open for re-hashing", e))?;
        let mut reader = file.take(len);
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| io("re-read written prefix", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
        if done < len {
            return Err(io(
                "re-read written prefix",
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("only {done} of {len} bytes present"),
                ),
            ));
        }
        Ok(())
    }
}

/// Builds the configured slot backend.
pub fn open(cfg: &SlotsConfig) -> Box<dyn SlotBackend> {
    match cfg.backend {
        SlotBackendKind::File => Box::new(FileSlots::new(cfg.a.clone(), cfg.b.clone())),
        SlotBackendKind::Block => Box::new(BlockSlots::new(cfg.a.clone(), cfg.b.clone())),
    }
}

fn pick<'p>(a: &'p Path, b: &'p Path, slot: Slot) -> &'p Path {
    match slot {
        Slot::A => a,
        Slot::B => b,
    }
}
