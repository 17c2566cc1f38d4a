//! Bootloader backends for reboot mode, shaped like RAUC's boot chooser (`bootchooser.h`).
//!
//! The agent never boots anything itself: it tells the bootloader which slot to try next and reads
//! back what the bootloader decided. Backends are synchronous (they run small tools on small files)
//! and are called from blocking threads.

mod grub;
mod script;
mod uboot;

pub use grub::Grub;
pub use script::Script;
pub use uboot::UBoot;

use flightnode_proto::Slot;
use std::path::PathBuf;

/// What went wrong talking to the bootloader.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A tool could not be started.
    #[error("failed to run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tool exited non-zero.
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its arguments, joined.
        args: String,
        /// Exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The bootloader environment holds something we cannot interpret.
    #[error("bootloader environment {location}: {problem}")]
    Env {
        /// File or tool the value came from.
        location: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The booted slot could not be determined.
    #[error("cannot tell which slot is booted from {path}: {problem}")]
    Booted {
        /// Where we looked (e.g. the kernel command line file).
        path: PathBuf,
        /// What is missing.
        problem: String,
    },
}

/// Bootloader-side view of the A/B slots. Impls: [`UBoot`], [`Grub`], [`Script`].
///
/// "Good" means the bootloader may boot the slot; "primary" is tried first. A trial boot is
/// `set_trial(slot)`: primary for exactly one attempt, after which the bootloader falls back on
/// its own unless the agent calls `mark_good` from inside the trial.
pub trait BootBackend: Send + Sync {
    /// Backend name for logs (`uboot`, `grub`, `script`).
    fn name(&self) -> &'static str;
    /// The slot the running system was booted from.
    fn booted(&self) -> Result<Slot, BootError>;
    /// The slot the bootloader will try first.
    fn primary(&self) -> Result<Slot, BootError>;
    /// Whether the bootloader considers `slot` bootable.
    fn is_good(&self, slot: Slot) -> Result<bool, BootError>;
    /// Makes `slot` primary for a single attempt; if it does not come up and mark itself good,
    /// the bootloader boots the other slot next time.
    fn set_trial(&self, slot: Slot) -> Result<(), BootError>;
    /// Makes `slot` primary and good with full attempts (commit).
    fn mark_good(&self, slot: Slot) -> Result<(), BootError>;
    /// Marks `slot` unbootable; the other slot becomes primary.
    fn mark_bad(&self, slot: Slot) -> Result<(), BootError>;
}

/// TEMPORARY STUB (replaced by the boot branch).
pub fn open(_cfg: &crate::config::BootConfig) -> Result<Box<dyn BootBackend>, BootError> {
    todo!()
}
