//! `file` slots: images as regular files, e.g. `/var/lib/flightnode/slots/b.img`.

use super::{SlotBackend, SlotError, pick};
use flightnode_proto::Slot;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Slots as image files; created (with their directory) when missing.
pub struct FileSlots {
    a: PathBuf,
    b: PathBuf,
}

impl FileSlots {
    /// Slots at `a` and `b`.
    pub fn new(a: PathBuf, b: PathBuf) -> Self {
        Self { a, b }
    }
}

impl SlotBackend for FileSlots {
    fn path(&self, slot: Slot) -> &Path {
        pick(&self.a, &self.b, slot)
    }

    fn check_room(&self, slot: Slot, size: u64) -> Result<(), SlotError> {
        let path = self.path(slot);
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action: "create slot directory",
            source,
        })?;
        let existing = std::fs::metadata(path).map_or(0, |m| m.len());
        // Refused before writing rather than ENOSPC halfway.
        let available = crate::resources::free_bytes(dir).map_err(|source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action: "statvfs",
            source,
        })? + existing;
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
        use std::io::Seek;
        let path = self.path(slot);
        let io = |action, source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        };
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open for writing", e))?;
        if created {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            // The checkpoints that follow fsync the file; its directory entry needs its own fsync,
            // or a power cut can lose the file under a recorded offset.
            crate::activation::fsync_dir(dir).map_err(|e| io("fsync slot directory", e))?;
        }
        // Anything past `offset` was not recorded as durable: drop it rather than trust it.
        file.set_len(offset)
            .map_err(|e| io("truncate to the resume offset", e))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| io("seek", e))?;
        Ok(file)
    }

    fn finish(&self, slot: Slot, file: &File, size: u64) -> Result<(), SlotError> {
        let path = self.path(slot);
        let io = |action, source| SlotError::Io {
            slot,
            path: path.to_owned(),
            action,
            source,
        };
        file.set_len(size).map_err(|e| io("truncate to image size", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        if let Some(dir) = path.parent() {
            crate::activation::fsync_dir(dir).map_err(|e| io("fsync slot directory", e))?;
        }
        Ok(())
    }
}
