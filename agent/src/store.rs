//! sled persistence of [`DeviceState`]: one record, written and flushed as a whole.
//!
//! sled makes a write durable only after `flush()`, so [`Store::save`] always flushes: a phase is on
//! disk before the side effect it announces (write-ahead).
//!
//! `flush()` alone is not enough for a power cut: on Linux sled 0.34 ends it with
//! `sync_file_range(2)`, which writes the pages but neither the inode nor the disk cache, and sled
//! never fsyncs a directory. The power-loss tests (`agent/tests/power_loss.rs`) lost saved phases
//! and whole stores that way. So `save` fsyncs sled's data file after the flush, and `open`
//! fsyncs the directories sled created, once.
//!
//! Every other tree in the same database (the daemon's queued commands, outbox, report sequence
//! and history) is made durable the same way, through [`Durable::sync`]: `save` uses it too.

use crate::state::DeviceState;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const DEVICE_KEY: &[u8] = b"device";
/// The format of the record under [`DEVICE_KEY`] ([`crate::state::STATE_FORMAT`], decimal ASCII),
/// kept beside the record rather than in it: agents up to format 1 decode the record strictly, and
/// one of them may be the fallback image that opens this store next.
const FORMAT_KEY: &[u8] = b"device-format";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process has the database open (sled holds an exclusive lock).
    #[error(
        "state store {path} is in use by another flightnode-agent process; wait for it or use its socket"
    )]
    Locked {
        /// Database directory.
        path: PathBuf,
    },
    /// A file or directory of the store could not be made durable.
    #[error("state store {path}: cannot fsync it")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// sled failed.
    #[error("state store {path}")]
    Sled {
        /// Database directory.
        path: PathBuf,
        /// Why.
        source: sled::Error,
    },
    /// The stored record cannot be decoded: damaged (a record of any agent version decodes, see
    /// [`crate::state`]).
    #[error(
        "state store {path}: stored device state is unreadable ({message}); move the directory aside to start over"
    )]
    Decode {
        /// Database directory.
        path: PathBuf,
        /// Decoder message.
        message: String,
    },
}

/// The device's persistent state.
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// sled's data file (`db/db`), fsynced after every flush.
    data: Arc<std::fs::File>,
}

/// A handle on the store's database for trees other than the device state: a write is durable
/// once [`Durable::sync`] returned (sled's `flush()` followed by an fsync of its data file; see
/// the module docs). Cheap to clone; every clone syncs the same file.
#[derive(Clone)]
pub struct Durable {
    db: sled::Db,
    path: PathBuf,
    data: Arc<std::fs::File>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Durable {
    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write to the database so far durable: a power cut after this returns keeps
    /// them.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|source| StoreError::Sled {
            path: self.path.clone(),
            source,
        })?;
        self.data.sync_all().map_err(|source| StoreError::Sync {
            path: self.path.join("db"),
            source,
        })
    }
}

/// fsyncs `path` (a file or a directory).
fn fsync(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Sync {
            path: path.to_owned(),
            source,
        })
}

impl Store {
    /// Opens (or creates) the store under `state_dir/db`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join("db");
        let db = sled::open(&path).map_err(|source| match &source {
            sled::Error::Io(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(11) =>
            {
                StoreError::Locked { path: path.clone() }
            }
            _ if source.to_string().contains("lock") => StoreError::Locked { path: path.clone() },
            _ => StoreError::Sled {
                path: path.clone(),
                source,
            },
        })?;
        // sled creates these entries without ever syncing their directories: make them durable
        // once, or a power cut after the first commit can leave no store at all.
        let blobs = path.join("blobs");
        let parent = state_dir.parent().filter(|p| !p.as_os_str().is_empty());
        for dir in [
            Some(blobs.as_path()),
            Some(path.as_path()),
            Some(state_dir),
            parent,
        ]
        .into_iter()
        .flatten()
        {
            if dir.exists() {
                fsync(dir)?;
            }
        }
        let data_path = path.join("db");
        let data = std::fs::File::open(&data_path).map_err(|source| StoreError::Sync {
            path: data_path,
            source,
        })?;
        Ok(Self {
            db,
            path,
            data: Arc::new(data),
        })
    }

    /// Loads the device state, or `None` on a fresh device.
    pub fn load(&self) -> Result<Option<DeviceState>, StoreError> {
        let raw = self.db.get(DEVICE_KEY).map_err(|source| self.sled(source))?;
        let format = self
            .db
            .get(FORMAT_KEY)
            .map_err(|source| self.sled(source))?
            .and_then(|f| std::str::from_utf8(&f).ok()?.trim().parse().ok())
            .unwrap_or(1);
        raw.map(|bytes| {
            DeviceState::decode(&bytes, format).map_err(|e| StoreError::Decode {
                path: self.path.clone(),
                message: e.to_string(),
            })
        })
        .transpose()
    }

    /// Writes the whole device state and flushes it to disk before returning.
    pub fn save(&self, state: &DeviceState) -> Result<(), StoreError> {
        let bytes = state.encode().map_err(|e| StoreError::Decode {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        // One batch: the record and its format are never seen apart.
        let mut batch = sled::Batch::default();
        batch.insert(DEVICE_KEY, bytes);
        batch.insert(FORMAT_KEY, crate::state::STATE_FORMAT.to_string().as_bytes());
        self.db.apply_batch(batch).map_err(|source| self.sled(source))?;
        self.durable().sync()
    }

    /// A handle that makes writes to other trees of this database durable.
    pub fn durable(&self) -> Durable {
        Durable {
            db: self.db.clone(),
            path: self.path.clone(),
            data: Arc::clone(&self.data),
        }
    }

    /// The database, for other trees (the daemon's outbox and upgrade history).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn sled(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }
}

/// The device state as last saved in `db`: lets a test's fake backend see what the engine had
/// persisted when it was called.
#[cfg(test)]
pub(crate) fn saved(db: &sled::Db) -> Option<DeviceState> {
    let bytes = db.get(DEVICE_KEY).ok()??;
    DeviceState::decode(&bytes, crate::state::STATE_FORMAT).ok()
}

/// Reopens the store of a test that just dropped it. sled's flusher thread lets go of the
/// database's lock a moment after the last handle is dropped, so a reopen in the same process
/// can see it still held: wait for it, up to 5 s.
#[cfg(test)]
pub(crate) fn reopen(state_dir: &Path) -> Store {
    for _ in 0..100 {
        match Store::open(state_dir) {
            Err(StoreError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(50)),
            r => return r.unwrap(),
        }
    }
    panic!(
        "{} stayed locked for 5 s after the test dropped it",
        state_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_survives_reopen_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let mut state = DeviceState::factory(semver::Version::new(1, 0, 0));
        state.begin("u1".into(), "file:///x".into(), false);
        store.save(&state).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), Some(state));
    }
}
