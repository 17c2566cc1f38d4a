//! `block` slots: raw partitions such as `/dev/mmcblk0p2`.

use super::{SlotBackend, SlotError, pick};
use flightnode_proto::Slot;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
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
        let in_use = |reason: String| SlotError::InUse {
            slot,
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| io("stat block device", e))?;
        if meta.file_type().is_block_device() {
            let mountinfo =
                std::fs::read_to_string(MOUNTINFO).map_err(|e| io("read /proc/self/mountinfo", e))?;
            if let Some(point) = mount_point(&mountinfo, meta.rdev()) {
                return Err(in_use(format!("mounted on {point}")));
            }
        }
        // O_EXCL on a block device: the open fails (EBUSY) while the kernel has it mounted or
        // another exclusive opener holds it, so a mount racing the check above is caught too.
        let mut dev = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => in_use(format!("held by the kernel or another program ({e})")),
                _ => io("open block device for writing", e),
            })?;
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

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Where the block device `rdev` is mounted, from `/proc/self/mountinfo` text (field 3 is the
/// `major:minor` of the mounted device, field 5 the mount point).
fn mount_point(mountinfo: &str, rdev: u64) -> Option<String> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let wanted = format!("{major}:{minor}");
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        (dev == wanted).then(|| point.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 179:2 / / rw,relatime shared:1 - ext4 /dev/mmcblk0p2 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
31 22 179:3 / /mnt/other rw,relatime shared:9 - ext4 /dev/mmcblk0p3 rw
";

    #[test]
    fn mounted_devices_are_found_by_device_number() {
        let cases = [
            (libc::makedev(179, 2), Some("/")),
            (libc::makedev(179, 3), Some("/mnt/other")),
            (libc::makedev(179, 4), None),
            (libc::makedev(17, 92), None),
        ];
        for (rdev, want) in cases {
            assert_eq!(mount_point(SAMPLE, rdev).as_deref(), want, "{rdev:x}");
        }
    }

    #[test]
    fn a_mounted_device_is_refused_before_a_byte_is_written() {
        // A device node for the filesystem that holds the temp dir: that filesystem is mounted,
        // so the slot is refused by the mount check, before any open for writing.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mknod of a block device node needs root (CI runs as root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let st_dev = std::fs::metadata(dir.path()).unwrap().dev();
        let node = dir.path().join("mounted-dev");
        let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path; creates a device node, opens nothing.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, st_dev as libc::dev_t) };
        assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
        let slots = BlockSlots::new(node.clone(), dir.path().join("other"));
        match slots.open_at(Slot::A, 0) {
            Err(SlotError::InUse { reason, .. }) => assert!(reason.contains("mounted on"), "{reason}"),
            other => panic!("a mounted device must be refused, got {other:?}"),
        }
    }
}
