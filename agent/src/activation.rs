//! Switching the active slot.
//!
//! - `command` mode: a `current` symlink in the state dir names the active slot. It is switched by
//!   creating `current.new` and `rename(2)`-ing it over `current`, then fsyncing the directory, so
//!   after a power cut it points at either the old or the new slot, never at nothing.
//! - `reboot` mode: the bootloader backend gets a one-shot trial of the new slot and the reboot
//!   command runs; after boot the backend says which slot came up.

use crate::boot::{BootBackend, BootError};
use crate::config::{ActivationMode, Config};
use flightnode_proto::Slot;
use std::path::{Path, PathBuf};

/// Why the active slot could not be read or switched.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The `current` pointer.
    #[error("slot pointer {path}: {action}")]
    Pointer {
        /// The symlink.
        path: PathBuf,
        /// What we were doing.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The pointer names neither slot.
    #[error("slot pointer {path} points at {target}, which is neither slots.a nor slots.b")]
    Foreign {
        /// The symlink.
        path: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// The bootloader backend.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The boot id file.
    #[error("cannot read boot id {path}")]
    BootId {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// fsyncs a directory, so a rename or a new file in it survives a power cut.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The `current` pointer of command mode.
pub struct Pointer {
    path: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

impl Pointer {
    /// The pointer for `cfg`: `state_dir/current`.
    pub fn new(cfg: &Config) -> Self {
        Self {
            path: cfg.state_dir.join("current"),
            a: cfg.slots.a.clone(),
            b: cfg.slots.b.clone(),
        }
    }

    fn err(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> ActivationError + '_ {
        move |source| ActivationError::Pointer {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// The slot `current` points at, or `None` when there is no pointer yet.
    pub fn read(&self) -> Result<Option<Slot>, ActivationError> {
        match std::fs::read_link(&self.path) {
            Ok(target) if target == self.a => Ok(Some(Slot::A)),
            Ok(target) if target == self.b => Ok(Some(Slot::B)),
            Ok(target) => Err(ActivationError::Foreign {
                path: self.path.clone(),
                target,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("read")(e)),
        }
    }

    /// Atomically points `current` at `slot` and makes that durable.
    pub fn set(&self, slot: Slot) -> Result<(), ActivationError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if self.read()? == Some(slot) {
            // Already there, but maybe only in the page cache: a crash after an earlier rename
            // and before its directory fsync leaves a link that a power cut can still undo.
            return fsync_dir(dir).map_err(self.err("fsync state directory"));
        }
        let target = match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        };
        let tmp = dir.join("current.new");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(self.err("remove stale current.new")(e));
            }
            _ => {}
        }
        std::os::unix::fs::symlink(target, &tmp).map_err(self.err("create current.new"))?;
        std::fs::rename(&tmp, &self.path).map_err(self.err("rename current.new over current"))?;
        crate::failpoint::hit("pointer_renamed");
        fsync_dir(dir).map_err(self.err("fsync state directory"))?;
        tracing::info!(%slot, pointer = %self.path.display(), "switched current slot pointer");
        Ok(())
    }
}

/// How the agent tells which slot runs and switches between them.
pub enum Activation {
    /// `command` mode.
    Command {
        /// The `current` pointer.
        pointer: Pointer,
    },
    /// `reboot` mode.
    Reboot {
        /// The bootloader.
        boot: Box<dyn BootBackend>,
        /// Boot id file.
        boot_id: PathBuf,
    },
}

impl Activation {
    /// Builds the configured activation.
    pub fn open(cfg: &Config) -> Result<Self, ActivationError> {
        match (cfg.activation.mode, &cfg.boot) {
            (ActivationMode::Reboot, Some(boot)) => Ok(Activation::Reboot {
                boot: crate::boot::open(boot)?,
                boot_id: boot.boot_id.clone(),
            }),
            _ => Ok(Activation::Command {
                pointer: Pointer::new(cfg),
            }),
        }
    }

    /// The slot that runs now. Command mode: where `current` points (`fallback` before the first switch).
    pub fn booted(&self, fallback: Slot) -> Result<Slot, ActivationError> {
        match self {
            Activation::Command { pointer } => Ok(pointer.read()?.unwrap_or(fallback)),
            Activation::Reboot { boot, .. } => Ok(boot.booted()?),
        }
    }

    /// The current boot id (reboot mode); `None` in command mode.
    pub fn boot_id(&self) -> Result<Option<String>, ActivationError> {
        match self {
            Activation::Command { .. } => Ok(None),
            Activation::Reboot { boot_id, .. } => std::fs::read_to_string(boot_id)
                .map(|s| Some(s.trim().to_owned()))
                .map_err(|source| ActivationError::BootId {
                    path: boot_id.clone(),
                    source,
                }),
        }
    }
}
