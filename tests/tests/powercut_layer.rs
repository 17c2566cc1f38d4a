//! The power-cut layer itself: what survives a cut is exactly what was synced.

use flightnode_tests::powercut::{Durability, PowerCut, without_sync_file_range};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

struct Disk {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
}

impl Disk {
    /// A backing dir holding `old` (b"old contents") and `sub/`.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(disk.join("sub")).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(disk.join("old"), b"old contents").unwrap();
        Self {
            _dir: dir,
            backing: disk,
            mnt,
        }
    }

    fn mount(&self, mode: Durability) -> PowerCut {
        PowerCut::mount(&self.backing, &self.mnt, mode).unwrap()
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn d(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn the_mount_shows_the_backing_dir_and_a_clean_shutdown_keeps_everything() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    assert_eq!(std::fs::read(d.m("old")).unwrap(), b"old contents");
    assert_eq!(names(&d.mnt), ["old", "sub"]);
    std::fs::write(d.m("sub/new"), b"x").unwrap();
    std::os::unix::fs::symlink("../old", d.m("sub/link")).unwrap();
    assert_eq!(std::fs::read(d.m("sub/link")).unwrap(), b"old contents");
    layer.shutdown().unwrap();
    assert_eq!(std::fs::read(d.d("sub/new")).unwrap(), b"x");
    assert_eq!(std::fs::read_link(d.d("sub/link")).unwrap(), Path::new("../old"));
    assert!(names(&d.mnt).is_empty(), "unmounted");
}

#[test]
fn a_write_without_fsync_vanishes_and_with_fsync_survives() {
    for mode in [Durability::Journal, Durability::Posix] {
        let d = Disk::new();
        let layer = d.mount(mode);
        // Overwrite of an existing file: not synced.
        std::fs::write(d.m("old"), b"NEW").unwrap();
        // A second existing file: overwritten and fsynced.
        let mut f = OpenOptions::new().write(true).open(d.m("old")).unwrap();
        f.write_all(b"new contents, synced").unwrap();
        f.sync_all().unwrap();
        f.write_all(b" and a tail that is not").unwrap();
        drop(f);
        assert_eq!(
            std::fs::read(d.m("old")).unwrap(),
            b"new contents, synced and a tail that is not",
            "the live view sees everything"
        );
        layer.cut().unwrap();
        assert_eq!(
            std::fs::read(d.d("old")).unwrap(),
            b"new contents, synced",
            "{mode:?}: only the synced prefix survives"
        );
    }
}

#[test]
fn fdatasync_keeps_data_and_an_unsynced_write_after_it_is_lost() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    let mut f = File::create(d.m("slot")).unwrap();
    f.write_all(&[1u8; 10_000]).unwrap();
    f.sync_data().unwrap();
    f.seek(SeekFrom::Start(5000)).unwrap();
    f.write_all(&[2u8; 10_000]).unwrap();
    drop(f);
    layer.cut().unwrap();
    // fdatasync of a new file commits its name (ext4 datasync of a new inode commits the journal).
    assert_eq!(std::fs::read(d.d("slot")).unwrap(), vec![1u8; 10_000]);
}

#[test]
fn a_new_file_needs_a_commit_for_its_name() {
    // Journal: the file's own fsync commits its creation. Posix: only the directory's fsync does.
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    let mut f = File::create(d.m("sub/a")).unwrap();
    f.write_all(b"a").unwrap();
    f.sync_all().unwrap();
    std::fs::write(d.m("sub/b"), b"b, never synced").unwrap();
    layer.cut().unwrap();
    assert_eq!(names(&d.d("sub")), ["a"]);
    assert_eq!(std::fs::read(d.d("sub/a")).unwrap(), b"a");

    let d = Disk::new();
    let layer = d.mount(Durability::Posix);
    let mut f = File::create(d.m("sub/a")).unwrap();
    f.write_all(b"a").unwrap();
    f.sync_all().unwrap();
    layer.cut().unwrap();
    assert!(
        names(&d.d("sub")).is_empty(),
        "Posix: no directory fsync, no name"
    );

    let d = Disk::new();
    let layer = d.mount(Durability::Posix);
    let mut f = File::create(d.m("sub/a")).unwrap();
    f.write_all(b"a").unwrap();
    f.sync_all().unwrap();
    std::fs::write(d.m("sub/b"), b"b, never synced").unwrap();
    fsync_dir(&d.m("sub"));
    layer.cut().unwrap();
    assert_eq!(names(&d.d("sub")), ["a", "b"]);
    assert_eq!(std::fs::read(d.d("sub/a")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(d.d("sub/b")).unwrap(),
        b"",
        "a durable name whose data was never synced is an empty file"
    );
}

#[test]
fn rename_without_a_directory_fsync_reverts() {
    for mode in [Durability::Journal, Durability::Posix] {
        let d = Disk::new();
        std::fs::write(d.d("sub/current"), b"A").unwrap();
        let layer = d.mount(mode);
        let mut f = File::create(d.m("sub/current.new")).unwrap();
        f.write_all(b"B").unwrap();
        f.sync_all().unwrap();
        fsync_dir(&d.m("sub"));
        std::fs::rename(d.m("sub/current.new"), d.m("sub/current")).unwrap();
        assert_eq!(std::fs::read(d.m("sub/current")).unwrap(), b"B");
        layer.cut().unwrap();
        assert_eq!(std::fs::read(d.d("sub/current")).unwrap(), b"A", "{mode:?}");
        assert_eq!(std::fs::read(d.d("sub/current.new")).unwrap(), b"B", "{mode:?}");

        // The same with the directory fsync: the rename survives.
        let layer = d.mount(mode);
        std::fs::rename(d.m("sub/current.new"), d.m("sub/current")).unwrap();
        fsync_dir(&d.m("sub"));
        layer.cut().unwrap();
        assert_eq!(names(&d.d("sub")), ["current"], "{mode:?}");
        assert_eq!(std::fs::read(d.d("sub/current")).unwrap(), b"B", "{mode:?}");
    }
}

#[test]
fn the_symlink_pointer_switch_survives_only_with_the_directory_fsync() {
    for (sync, expect) in [(false, "slots/a.img"), (true, "slots/b.img")] {
        let d = Disk::new();
        std::os::unix::fs::symlink("slots/a.img", d.d("sub/current")).unwrap();
        let layer = d.mount(Durability::Journal);
        std::os::unix::fs::symlink("slots/b.img", d.m("sub/current.new")).unwrap();
        std::fs::rename(d.m("sub/current.new"), d.m("sub/current")).unwrap();
        if sync {
            fsync_dir(&d.m("sub"));
        }
        layer.cut().unwrap();
        assert_eq!(std::fs::read_link(d.d("sub/current")).unwrap(), Path::new(expect));
        assert_eq!(names(&d.d("sub")), ["current"]);
    }
}

#[test]
fn journal_commits_every_earlier_change_posix_only_the_synced_directory() {
    // A rename in sub/, then an fsync of an unrelated file that was written: ext4 commits the
    // running transaction, which holds the rename too.
    let run = |mode| {
        let d = Disk::new();
        std::fs::write(d.d("sub/x"), b"x").unwrap();
        let layer = d.mount(mode);
        std::fs::rename(d.m("sub/x"), d.m("sub/y")).unwrap();
        let mut f = OpenOptions::new().write(true).open(d.m("old")).unwrap();
        f.write_all(b"OLD").unwrap();
        f.sync_all().unwrap();
        layer.cut().unwrap();
        assert_eq!(std::fs::read(d.d("old")).unwrap(), b"OLD contents");
        names(&d.d("sub"))
    };
    assert_eq!(run(Durability::Journal), ["y"]);
    assert_eq!(run(Durability::Posix), ["x"]);
}

#[test]
fn fsync_of_a_clean_file_and_fdatasync_of_an_overwrite_commit_nothing() {
    let d = Disk::new();
    std::fs::write(d.d("sub/x"), b"x").unwrap();
    let layer = d.mount(Durability::Journal);
    std::fs::rename(d.m("sub/x"), d.m("sub/y")).unwrap();
    // Clean inode: nothing to commit.
    File::open(d.m("old")).unwrap().sync_all().unwrap();
    // Overwrite in place without a size change: fdatasync writes the data, no journal commit.
    let mut f = OpenOptions::new().write(true).open(d.m("old")).unwrap();
    f.write_all(b"OLD").unwrap();
    f.sync_data().unwrap();
    let stats = layer.stats();
    layer.cut().unwrap();
    assert_eq!(stats.commits, 0, "{stats:?}");
    assert_eq!(std::fs::read(d.d("old")).unwrap(), b"OLD contents");
    assert_eq!(names(&d.d("sub")), ["x"], "the rename was never committed");
}

#[test]
fn unlink_without_a_commit_brings_the_file_back() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    std::fs::remove_file(d.m("old")).unwrap();
    std::fs::remove_dir(d.m("sub")).unwrap();
    assert!(names(&d.mnt).is_empty());
    layer.cut().unwrap();
    assert_eq!(names(&d.backing), ["old", "sub"]);
    assert_eq!(std::fs::read(d.d("old")).unwrap(), b"old contents");

    let layer = d.mount(Durability::Journal);
    std::fs::remove_file(d.m("old")).unwrap();
    fsync_dir(&d.mnt);
    layer.cut().unwrap();
    assert_eq!(names(&d.backing), ["sub"]);
}

#[test]
fn a_committed_truncation_shortens_an_unsynced_extension_does_not() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    let f = OpenOptions::new().write(true).open(d.m("old")).unwrap();
    f.set_len(3).unwrap();
    f.set_len(100).unwrap();
    // Commit through a directory change elsewhere.
    std::fs::write(d.m("sub/n"), b"").unwrap();
    fsync_dir(&d.m("sub"));
    layer.cut().unwrap();
    assert_eq!(std::fs::read(d.d("old")).unwrap(), b"old");
}

#[test]
fn a_new_directory_and_its_files_need_their_parents_synced_in_posix_mode() {
    let d = Disk::new();
    let layer = d.mount(Durability::Posix);
    std::fs::create_dir(d.m("db")).unwrap();
    let mut f = File::create(d.m("db/log")).unwrap();
    f.write_all(b"log").unwrap();
    f.sync_all().unwrap();
    fsync_dir(&d.m("db"));
    layer.cut().unwrap();
    assert_eq!(
        names(&d.backing),
        ["old", "sub"],
        "db/ itself was never linked durably"
    );

    let layer = d.mount(Durability::Posix);
    std::fs::create_dir(d.m("db")).unwrap();
    std::fs::write(d.m("db/log"), b"log").unwrap();
    File::open(d.m("db/log")).unwrap().sync_all().unwrap();
    fsync_dir(&d.mnt);
    layer.cut().unwrap();
    assert!(
        names(&d.d("db")).is_empty(),
        "db/ survives, its entries were never synced"
    );
}

#[test]
fn nothing_reaches_the_disk_after_the_cut() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    let mut f = OpenOptions::new().write(true).open(d.m("old")).unwrap();
    layer.cut().unwrap();
    // The open file now belongs to a dead mount.
    assert!(f.write_all(b"zombie").and_then(|()| f.sync_all()).is_err());
    drop(f);
    assert_eq!(std::fs::read(d.d("old")).unwrap(), b"old contents");
    // Power on again: the mount shows what survived, and works normally.
    let layer = d.mount(Durability::Journal);
    assert_eq!(std::fs::read(d.m("old")).unwrap(), b"old contents");
    std::fs::write(d.m("sub/after"), b"after").unwrap();
    layer.shutdown().unwrap();
    assert_eq!(std::fs::read(d.d("sub/after")).unwrap(), b"after");
}

#[test]
fn no_space_is_reported_missing() {
    let d = Disk::new();
    let _layer = d.mount(Durability::Journal);
    // SAFETY: statvfs on a valid path into a zeroed out-parameter.
    let free = unsafe {
        let c = std::ffi::CString::new(d.mnt.to_str().unwrap()).unwrap();
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &raw mut st), 0);
        st.f_bavail as u64 * st.f_frsize as u64
    };
    assert!(
        free > 1 << 30,
        "slot backends check free space before writing: {free}"
    );
}

/// A child under [`without_sync_file_range`] gets ENOSYS from sync_file_range(2); without it, the
/// call succeeds and the layer never sees it (no durability).
#[test]
fn sync_file_range_is_no_durability_point_and_the_filter_turns_it_off() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    let script = format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]\n\
         fd = os.open({:?}, os.O_RDWR)\nos.pwrite(fd, b'NEW', 0)\n\
         print('ok' if libc.sync_file_range(fd, 0, 3, 7) == 0 else 'errno %d' % ctypes.get_errno())\n",
        d.m("old").to_str().unwrap()
    );
    let run = |filtered: bool| {
        let mut cmd = std::process::Command::new("python3");
        cmd.arg("-c").arg(&script);
        if filtered {
            without_sync_file_range(&mut cmd);
        }
        let o = cmd.output().expect("python3 runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(run(false), "ok");
    assert_eq!(run(true), format!("errno {}", libc::ENOSYS));
    assert_eq!(layer.stats().file_syncs, 0, "sync_file_range never reaches FUSE");
    layer.cut().unwrap();
    assert_eq!(std::fs::read(d.d("old")).unwrap(), b"old contents");
}

#[test]
fn a_cut_at_a_change_freezes_the_disk_at_that_instant() {
    let d = Disk::new();
    let layer = d.mount(Durability::Journal);
    // Changes: create (0), write (1), fsync (2), rename (3) -> the rename is refused.
    layer.cut_at_change(3);
    let mut f = File::create(d.m("sub/new")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    assert!(std::fs::rename(d.m("sub/new"), d.m("sub/renamed")).is_err());
    assert!(layer.tripped());
    assert!(std::fs::read(d.m("old")).is_err(), "a dead disk answers nothing");
    layer.cut().unwrap();
    assert_eq!(names(&d.d("sub")), ["new"]);
    assert_eq!(std::fs::read(d.d("sub/new")).unwrap(), b"synced");
}
