//! `block` slots: raw partitions such as `/dev/mmcblk0p2`.

use super::{SlotBackend, SlotError, pick};
use flightnode_proto::Slot;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Slots as existing block devices (or any pre-sized file standing in for one). Never created,
/// never truncated: the partition size is the slot size.
pub struct BlockSlots {
    a: PathBuf,
    b: PathBuf,
}

impl BlockSlots {
    /// Slots at `a` and `b`.
    pub fn new(a: PathBuf, b: PathBuf) -> Self {
        Self { a, b }
    }
}

impl SlotBackend for BlockSlots {
    fn path(&self, slot: Slot) -> &Path {
        pick(&self.a, &self.b, slot)
    }

    fn check_room(&self, slot: Slot, size: u64) -> Result<(), SlotError> {
        let path = self.path(slot);
        let mut dev = File::open(path).map_err(|source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action: "open block device",
            source,
        })?;
        // Block devices report size 0 in metadata; seeking to the end gives the real capacity.
        let available = dev.seek(SeekFrom::End(0)).map_err(|source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action: "read device size",
            source,
        })?;
        if size > available {
            return Err(SlotError::NoSpace {
                slot,
                path: path.to_owned(),
                needed: size,
                available,
            });
        }
        Ok(())
    }

    fn open_at(&self, slot: Slot, offset: u64) -> Result<File, SlotError> {
        let path = self.path(slot);
        let io = |action, source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        };
        let mut dev = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io("open block device for writing", e))?;
        dev.seek(SeekFrom::Start(offset)).map_err(|e| io("seek", e))?;
        Ok(dev)
    }

    fn finish(&self, slot: Slot, file: &File, _size: u64) -> Result<(), SlotError> {
        file.sync_all().map_err(|source| SlotError::Io {
            slot,
            path: self.path(slot).to_owned(),
            action: "fsync block device",
            source,
        })
    }
}
