//! A power-loss filesystem for crash tests: a FUSE mount whose contents live in memory and which
//! knows, for every file and directory, what an fsync has made durable. [`PowerCut::cut`] throws
//! away everything else and writes exactly what survived into the backing directory.
//!
//! The model is deliberately conservative, for a filesystem with an ordered metadata journal
//! (ext4 `data=ordered` without `fast_commit`, the default on Linux boards):
//!
//! - File data survives only as of the file's last `fsync`/`fdatasync`. Data written since is
//!   lost, even if the kernel would have written it back by itself (no 5 s writeback is modelled).
//! - Namespace changes (create, mkdir, rename, unlink, symlink) and truncations are journal
//!   entries. In [`Durability::Journal`] mode a journal commit makes all of them durable at once,
//!   in order, as jbd2 does; a commit happens on `fsync` of a file or directory that has unsynced
//!   metadata, and on `fdatasync` of a file whose size changed or which is new (ext4's
//!   `i_datasync_tid`). An `fsync` of a clean inode commits nothing.
//! - [`Durability::Posix`] is stricter: a namespace change survives only when its own directory
//!   was fsynced, the minimum POSIX promises (some flash filesystems are close to this).
//! - A new file that became durable by name but was never fsynced is empty; a truncation that
//!   was committed shortens the durable data, an extension never lengthens it.
//!
//! `sync_file_range(2)` never reaches a FUSE filesystem (the kernel handles it in the page cache),
//! so it is not a durability point here, which matches its man page: it flushes neither metadata
//! nor the disk cache. sled 0.34 uses it for `flush()` on Linux and falls back to `fsync` when it
//! fails with `ENOSYS`; [`without_sync_file_range`] makes a child process see that.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use flightnode_tests::powercut::{Durability, PowerCut};
//! let dir = tempfile::tempdir()?;
//! let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
//! std::fs::create_dir_all(&disk)?;
//! std::fs::create_dir_all(&mnt)?;
//! let layer = PowerCut::mount(&disk, &mnt, Durability::Journal)?;
//! std::fs::write(mnt.join("lost"), b"never synced")?;
//! layer.cut()?; // disk/ holds what a power cut would have left: no `lost`
//! # Ok(()) }
//! ```
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "FUSE and seccomp ABI fields: offsets and sizes of an in-memory test disk, BPF opcodes"
)]

use anyhow::{Context, bail};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How namespace changes become durable; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Ordered metadata journal (ext4 `data=ordered`): a commit makes every earlier namespace
    /// change durable at once.
    Journal,
    /// Only an fsync of the directory itself makes its entries durable.
    Posix,
}

const ROOT: u64 = fuser::FUSE_ROOT_ID;
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u64 = 4096;
/// Reported as free space, so slot backends that check room before writing find enough.
const FREE_BYTES: u64 = 64 << 30;

enum Kind {
    File {
        /// What readers see now.
        data: Vec<u8>,
        /// What survives a cut (as of the last data sync).
        synced: Vec<u8>,
        /// Smallest size since the last commit: a committed truncation shortens `synced`.
        min_len: u64,
        /// Size changed or the file is new since the last commit (ext4 `i_datasync_tid`).
        size_dirty: bool,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        /// Entries that survive a cut.
        durable: BTreeMap<OsString, u64>,
        parent: u64,
    },
    Symlink {
        target: OsString,
    },
}

struct Inode {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Metadata changed since the last commit (ext4 `i_sync_tid`).
    meta_dirty: bool,
}

impl Inode {
    fn new(kind: Kind, perm: u16) -> Self {
        let now = SystemTime::now();
        Self {
            kind,
            perm,
            mtime: now,
            ctime: now,
            meta_dirty: true,
        }
    }

    fn file_type(&self) -> FileType {
        match self.kind {
            Kind::File { .. } => FileType::RegularFile,
            Kind::Dir { .. } => FileType::Directory,
            Kind::Symlink { .. } => FileType::Symlink,
        }
    }

    fn size(&self) -> u64 {
        match &self.kind {
            Kind::File { data, .. } => data.len() as u64,
            Kind::Dir { entries, .. } => BLOCK.max(entries.len() as u64 * 32),
            Kind::Symlink { target } => target.len() as u64,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
        self.meta_dirty = true;
    }
}

/// Counters of what the layer saw, for test diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync`/`fdatasync` of files.
    pub file_syncs: u64,
    /// `fsync` of directories.
    pub dir_syncs: u64,
    /// Journal commits ([`Durability::Journal`]).
    pub commits: u64,
    /// Bytes written through the mount.
    pub bytes_written: u64,
    /// Requests that change something (writes, truncations, namespace changes, syncs).
    pub changes: u64,
}

struct State {
    mode: Durability,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Set by the cut: every later request fails with EIO, so nothing sneaks in.
    dead: bool,
    /// [`PowerCut::cut_at_change`]: the power fails when this many more changes arrived.
    trip: Option<u64>,
    stats: Stats,
}

type Errno = libc::c_int;

impl State {
    fn load(backing: &Path, mode: Durability) -> anyhow::Result<Self> {
        let mut st = State {
            mode,
            inodes: HashMap::new(),
            next_ino: ROOT + 1,
            dead: false,
            trip: None,
            stats: Stats::default(),
        };
        let meta =
            std::fs::metadata(backing).with_context(|| format!("backing dir {}", backing.display()))?;
        st.inodes.insert(
            ROOT,
            Inode::new(
                Kind::Dir {
                    entries: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: ROOT,
                },
                (meta.permissions().mode() & 0o7777) as u16,
            ),
        );
        st.load_dir(backing, ROOT)?;
        for inode in st.inodes.values_mut() {
            inode.meta_dirty = false;
            if let Kind::File { size_dirty, .. } = &mut inode.kind {
                *size_dirty = false;
            }
        }
        Ok(st)
    }

    /// Everything already on the backing directory is durable.
    fn load_dir(&mut self, dir: &Path, ino: u64) -> anyhow::Result<()> {
        let mut list: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        list.sort_by_key(std::fs::DirEntry::file_name);
        for entry in list {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let perm = (meta.permissions().mode() & 0o7777) as u16;
            let child = self.alloc();
            let kind = if meta.file_type().is_symlink() {
                Kind::Symlink {
                    target: std::fs::read_link(&path)?.into_os_string(),
                }
            } else if meta.is_dir() {
                Kind::Dir {
                    entries: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: ino,
                }
            } else if meta.is_file() {
                let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                Kind::File {
                    min_len: data.len() as u64,
                    synced: data.clone(),
                    data,
                    size_dirty: false,
                }
            } else {
                bail!(
                    "{}: only files, directories and symlinks are supported",
                    path.display()
                );
            };
            let is_dir = matches!(kind, Kind::Dir { .. });
            self.inodes.insert(child, Inode::new(kind, perm));
            if let Some(Kind::Dir { entries, durable, .. }) = self.inodes.get_mut(&ino).map(|i| &mut i.kind) {
                entries.insert(entry.file_name(), child);
                durable.insert(entry.file_name(), child);
            }
            if is_dir {
                self.load_dir(&path, child)?;
            }
        }
        Ok(())
    }

    /// Counts a change; when the armed trip point is reached the power fails right here: this
    /// change and every later request are refused, so the durable state is frozen as it was.
    fn tick(&mut self) -> Result<(), Errno> {
        if self.dead {
            return Err(libc::EIO);
        }
        self.stats.changes += 1;
        match self.trip {
            Some(0) => {
                self.dead = true;
                Err(libc::EIO)
            }
            Some(n) => {
                self.trip = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn alloc(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        if self.dead {
            return Err(libc::EIO);
        }
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        if self.dead {
            return Err(libc::EIO);
        }
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let i = self.get(ino)?;
        let size = i.size();
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: i.mtime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.ctime,
            kind: i.file_type(),
            perm: i.perm,
            nlink: if matches!(i.kind, Kind::Dir { .. }) { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.get(dir)?.kind {
            Kind::Dir { entries, .. } => Ok(entries),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.get_mut(dir)?.kind {
            Kind::Dir { entries, .. } => Ok(entries),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn lookup(&self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// Links a new inode under `parent/name`.
    fn create(&mut self, parent: u64, name: &OsStr, kind: Kind, perm: u16) -> Result<u64, Errno> {
        self.tick()?;
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.alloc();
        self.inodes.insert(ino, Inode::new(kind, perm));
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        self.get_mut(parent)?.touch();
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        self.tick()?;
        let ino = self.lookup(parent, name)?;
        match (&self.get(ino)?.kind, want_dir) {
            (Kind::Dir { entries, .. }, true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
            (Kind::Dir { .. }, false) => return Err(libc::EISDIR),
            (Kind::Dir { .. }, true) | (_, false) => {}
            (_, true) => return Err(libc::ENOTDIR),
        }
        // The inode stays in the table: a durable entry or an open file may still name it.
        self.entries_mut(parent)?.remove(name);
        self.get_mut(parent)?.touch();
        self.get_mut(ino)?.touch();
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        self.tick()?;
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        let moving_dir = matches!(self.get(ino)?.kind, Kind::Dir { .. });
        if let Ok(existing) = self.lookup(newparent, newname) {
            if existing == ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            match (&self.get(existing)?.kind, moving_dir) {
                (Kind::Dir { entries, .. }, true) if !entries.is_empty() => return Err(libc::ENOTEMPTY),
                (Kind::Dir { .. }, false) => return Err(libc::EISDIR),
                (Kind::Dir { .. }, true) | (_, false) => {}
                (_, true) => return Err(libc::ENOTDIR),
            }
            self.get_mut(existing)?.touch();
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(newparent)?.insert(newname.to_owned(), ino);
        self.get_mut(parent)?.touch();
        self.get_mut(newparent)?.touch();
        let moved = self.get_mut(ino)?;
        moved.touch();
        if let Kind::Dir { parent: p, .. } = &mut moved.kind {
            *p = newparent;
        }
        Ok(())
    }

    fn write(&mut self, ino: u64, offset: u64, buf: &[u8]) -> Result<usize, Errno> {
        self.tick()?;
        let inode = self.get_mut(ino)?;
        let Kind::File { data, size_dirty, .. } = &mut inode.kind else {
            return Err(libc::EISDIR);
        };
        let end = offset as usize + buf.len();
        if end > data.len() {
            data.resize(end, 0);
            *size_dirty = true;
        }
        data[offset as usize..end].copy_from_slice(buf);
        inode.touch();
        self.stats.bytes_written += buf.len() as u64;
        Ok(buf.len())
    }

    fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        self.tick()?;
        let inode = self.get_mut(ino)?;
        let Kind::File {
            data,
            min_len,
            size_dirty,
            ..
        } = &mut inode.kind
        else {
            return Err(libc::EISDIR);
        };
        if data.len() as u64 != size {
            data.resize(size as usize, 0);
            *min_len = (*min_len).min(size);
            *size_dirty = true;
        }
        inode.touch();
        Ok(())
    }

    /// fsync/fdatasync of a file.
    fn sync_file(&mut self, ino: u64, datasync: bool) -> Result<(), Errno> {
        self.tick()?;
        self.stats.file_syncs += 1;
        let mode = self.mode;
        let inode = self.get_mut(ino)?;
        let meta_dirty = inode.meta_dirty;
        let commit = match &mut inode.kind {
            Kind::File {
                data,
                synced,
                min_len,
                size_dirty,
            } => {
                synced.clone_from(data);
                *min_len = data.len() as u64;
                if datasync { *size_dirty } else { meta_dirty }
            }
            _ => meta_dirty,
        };
        if commit && mode == Durability::Journal {
            self.commit();
        }
        Ok(())
    }

    fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        self.tick()?;
        self.stats.dir_syncs += 1;
        let mode = self.mode;
        let inode = self.get_mut(ino)?;
        let dirty = inode.meta_dirty;
        match mode {
            Durability::Journal => {
                if dirty {
                    self.commit();
                }
            }
            Durability::Posix => {
                if let Kind::Dir { entries, durable, .. } = &mut inode.kind {
                    durable.clone_from(entries);
                }
            }
        }
        Ok(())
    }

    /// A jbd2 commit: every namespace change and truncation so far becomes durable.
    fn commit(&mut self) {
        self.stats.commits += 1;
        for inode in self.inodes.values_mut() {
            inode.meta_dirty = false;
            match &mut inode.kind {
                Kind::Dir { entries, durable, .. } => durable.clone_from(entries),
                Kind::File {
                    data,
                    synced,
                    min_len,
                    size_dirty,
                } => {
                    synced.truncate(*min_len as usize);
                    *min_len = data.len() as u64;
                    *size_dirty = false;
                }
                Kind::Symlink { .. } => {}
            }
        }
    }

    /// Like sync(2): everything is durable.
    fn sync_everything(&mut self) {
        for inode in self.inodes.values_mut() {
            if let Kind::File {
                data,
                synced,
                min_len,
                ..
            } = &mut inode.kind
            {
                synced.clone_from(data);
                *min_len = data.len() as u64;
            }
        }
        self.commit();
    }

    /// Replaces the contents of `backing` with the durable tree.
    fn materialize(&self, backing: &Path) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(backing)? {
            let path = entry?.path();
            if std::fs::symlink_metadata(&path)?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("clearing {}", path.display()))?;
        }
        self.write_durable(ROOT, backing)
    }

    fn write_durable(&self, dir: u64, path: &Path) -> anyhow::Result<()> {
        let Some(Inode {
            kind: Kind::Dir { durable, .. },
            ..
        }) = self.inodes.get(&dir)
        else {
            bail!("inode {dir} is not a directory");
        };
        for (name, ino) in durable {
            let child = path.join(name);
            let inode = &self.inodes[ino];
            match &inode.kind {
                Kind::File { synced, .. } => std::fs::write(&child, synced)?,
                Kind::Dir { .. } => {
                    std::fs::create_dir(&child)?;
                    self.write_durable(*ino, &child)?;
                }
                Kind::Symlink { target } => std::os::unix::fs::symlink(target, &child)?,
            }
            if !matches!(inode.kind, Kind::Symlink { .. }) {
                std::fs::set_permissions(&child, std::fs::Permissions::from_mode(u32::from(inode.perm)))?;
            }
        }
        Ok(())
    }
}

/// The FUSE side: every request locks the shared [`State`].
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn st(&self) -> MutexGuard<'_, State> {
        // A panic in another request must not hide the state from the test.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn reply_entry(st: &State, ino: Result<u64, Errno>, reply: ReplyEntry) {
    match ino.and_then(|ino| st.attr(ino)) {
        Ok(attr) => reply.entry(&TTL, &attr, 0),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // No FUSE_WRITEBACK_CACHE: every write reaches this process when it happens. Large
        // write requests keep one application write one change (see `cut_at_change`).
        if let Err(nearest) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let st = self.st();
        let ino = st.lookup(parent, name);
        reply_entry(&st, ino, reply);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.st().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let r = (|| {
            if let Some(size) = size {
                st.truncate(ino, size)?;
            }
            let inode = st.get_mut(ino)?;
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            if let Some(t) = mtime {
                inode.mtime = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
            }
            inode.ctime = SystemTime::now();
            inode.meta_dirty = true;
            st.attr(ino)
        })();
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.st().get(ino).map(|i| &i.kind) {
            Ok(Kind::Symlink { target }) => reply.data(target.as_bytes()),
            Ok(_) => reply.error(libc::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(libc::EPERM);
        }
        let ino = st.create(parent, name, new_file(), perm(mode, umask));
        reply_entry(&st, ino, reply);
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let kind = Kind::Dir {
            entries: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent,
        };
        let ino = st.create(parent, name, kind, perm(mode, umask));
        reply_entry(&st, ino, reply);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.st().remove(parent, name, false), reply);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.st().remove(parent, name, true), reply);
    }

    fn symlink(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let kind = Kind::Symlink {
            target: target.as_os_str().to_owned(),
        };
        let ino = st.create(parent, link_name, kind, 0o777);
        reply_entry(&st, ino, reply);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.st().rename(parent, name, newparent, newname, flags), reply);
    }

    fn link(&mut self, _req: &Request<'_>, _ino: u64, _newparent: u64, _newname: &OsStr, reply: ReplyEntry) {
        // Hard links are not modelled; nothing on the device uses them.
        reply.error(libc::EPERM);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.st().get(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        match self.st().get(ino).map(|i| &i.kind) {
            Ok(Kind::File { data, .. }) => {
                let start = (offset.max(0) as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Ok(_) => reply.error(libc::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match self.st().write(ino, offset.max(0).cast_unsigned(), data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // close(2) is not a durability point.
        reply_empty(self.st().get(ino).map(|_| ()), reply);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.st().sync_file(ino, datasync), reply);
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.st().entries(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let st = self.st();
        let parent = match st.get(ino).map(|i| &i.kind) {
            Ok(Kind::Dir { parent, .. }) => *parent,
            Ok(_) => return reply.error(libc::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, child) in st.entries(ino).into_iter().flatten() {
            if let Ok(i) = st.get(*child) {
                all.push((*child, i.file_type(), name.clone()));
            }
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(child, i as i64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _flags: i32, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.st().sync_dir(ino), reply);
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = FREE_BYTES / BLOCK;
        reply.statfs(
            blocks * 2,
            blocks,
            blocks,
            1 << 20,
            1 << 19,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply_empty(self.st().get(ino).map(|_| ()), reply);
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let existed = st.lookup(parent, name);
        let ino = match existed {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(libc::EEXIST),
            Ok(ino) => Ok(ino),
            Err(libc::ENOENT) => st.create(parent, name, new_file(), perm(mode, umask)),
            Err(e) => Err(e),
        };
        match ino.and_then(|ino| {
            if flags & libc::O_TRUNC != 0 && existed.is_ok() {
                st.truncate(ino, 0)?;
            }
            st.attr(ino)
        }) {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        if mode != 0 {
            return reply.error(libc::EOPNOTSUPP);
        }
        let end = (offset + length).max(0).cast_unsigned();
        let r = match st.get(ino).map(Inode::size) {
            Ok(size) if end > size => st.truncate(ino, end),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        reply_empty(r, reply);
    }
}

fn new_file() -> Kind {
    Kind::File {
        data: Vec::new(),
        synced: Vec::new(),
        min_len: 0,
        size_dirty: true,
    }
}

/// A mounted power-loss layer over a backing directory.
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    backing: PathBuf,
    mountpoint: PathBuf,
}

impl PowerCut {
    /// Loads `backing` (all of it durable) and mounts it at `mountpoint` (an existing, empty
    /// directory). Needs root and `/dev/fuse`; no libfuse or `fusermount`.
    pub fn mount(backing: &Path, mountpoint: &Path, mode: Durability) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(State::load(backing, mode)?));
        let options = [
            MountOption::FSName("powercut".into()),
            MountOption::Subtype("powercut".into()),
            MountOption::RW,
            MountOption::Exec,
        ];
        let session = fuser::spawn_mount2(Fs(state.clone()), mountpoint, &options).with_context(|| {
            format!(
                "mounting the power-cut layer at {} (needs root and /dev/fuse)",
                mountpoint.display()
            )
        })?;
        Ok(Self {
            state,
            session: Some(session),
            backing: backing.to_owned(),
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// Where the layer is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The directory that holds what survived.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// What the layer saw so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Arms a power failure at the `n`-th change from now (0: the next one). From that request
    /// on the mount answers EIO and nothing more becomes durable; [`PowerCut::cut`] then writes
    /// out the state of that instant. This cuts between any two writes or syncs, including
    /// inside tools the agent runs (`fw_setenv`, `grub-editenv`).
    pub fn cut_at_change(&self, n: u64) {
        self.lock().trip = Some(n);
    }

    /// Whether an armed [`PowerCut::cut_at_change`] has fired.
    pub fn tripped(&self) -> bool {
        let st = self.lock();
        st.dead && st.trip == Some(0)
    }

    /// Makes everything durable, like sync(2) (for test setup, not for the code under test).
    pub fn sync(&self) {
        self.lock().sync_everything();
    }

    /// The power cut: from now on every request fails, everything not durable is dropped, the
    /// backing directory is rewritten with what survived, and the layer is unmounted. Kill the
    /// processes using the mount first (their later requests would fail with EIO anyway).
    pub fn cut(mut self) -> anyhow::Result<()> {
        {
            let mut st = self.lock();
            st.dead = true;
            st.materialize(&self.backing)
                .with_context(|| format!("writing the surviving state into {}", self.backing.display()))?;
        }
        self.unmount();
        Ok(())
    }

    /// A clean shutdown: everything is synced, then unmounted.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.sync();
        self.cut()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            // Lazy unmount first: fuser's own umount(2) fails with EBUSY while a file on the
            // mount is still open (a test's handle, a process being reaped), and the next
            // power-on mounts at the same place. The session loop ends once nothing refers to
            // the detached mount any more.
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()) {
                // SAFETY: `c` is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let guard = {
                let s = session;
                s.guard
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !guard.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if guard.is_finished() {
                let _ = guard.join();
            }
        }
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if self.session.is_some() {
            self.lock().dead = true;
            self.unmount();
        }
    }
}

/// Makes `sync_file_range(2)` fail with `ENOSYS` in the process `cmd` starts (a seccomp filter
/// installed between fork and exec, inherited by its children). sled 0.34 then makes `flush()`
/// durable with `fsync`, its own fallback for kernels without the call.
pub fn without_sync_file_range(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls async-signal-safe prctl(2) on data it owns.
    unsafe { cmd.pre_exec(deny_sync_file_range) }
}

fn deny_sync_file_range() -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    let filter = [
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(ARCH, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(libc::SYS_sync_file_range as u32, 0, 1),
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `prog` and `filter` outlive them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const prog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
