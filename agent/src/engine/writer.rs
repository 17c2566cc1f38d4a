//! The slot writer: counts image bytes, checkpoints them durably, honours cancel, reports progress.

use super::Observer;
use crate::state::DeviceState;
use crate::store::Store;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Checkpoint at least every `download.checkpoint_bytes`, or after this long, whichever comes first.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// The download was canceled (carried through `io::Error::other`).
#[derive(Debug, thiserror::Error)]
#[error("canceled")]
pub struct Canceled;

/// The download was paused for shutdown, its offset saved (carried through `io::Error::other`).
#[derive(Debug, thiserror::Error)]
#[error("paused for shutdown")]
pub struct Paused;

/// Writes image bytes into the target slot. Every checkpoint fsyncs the slot **before** recording
/// the byte count in sled, so a recorded count is never ahead of what is on the medium.
pub struct SlotWriter<'a> {
    pub file: File,
    pub written: u64,
    pub total: u64,
    pub checkpoint_bytes: u64,
    checkpointed: u64,
    last: Instant,
    store: &'a Store,
    state: &'a mut DeviceState,
    observer: &'a mut dyn Observer,
    interrupts: &'a Interrupts,
}

/// Flags other threads set to stop a download: cancel ends the upgrade, pause keeps it resumable.
#[derive(Default)]
pub struct Interrupts {
    /// Cancel the upgrade (before the image is written). Set through [`Interrupts::cancel`].
    pub cancel: AtomicBool,
    /// Pause for shutdown: checkpoint and stop.
    pub pause: AtomicBool,
    /// The upgrade the cancel is for.
    cancel_for: std::sync::Mutex<Option<String>>,
}

impl Interrupts {
    /// Cancels upgrade `upgrade_id`, whether it runs already or is about to start: a new
    /// upgrade clears the flag only when it was meant for another one
    /// ([`Interrupts::start_upgrade`]), so a cancel that arrives between the engine taking up
    /// the command and saving its first phase still wins.
    pub fn cancel(&self, upgrade_id: &str) {
        *self.lock_for() = Some(upgrade_id.to_owned());
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// An upgrade starts (or resumes): a cancel left over from another upgrade no longer applies.
    pub fn start_upgrade(&self, upgrade_id: &str) {
        let mut cancel_for = self.lock_for();
        if cancel_for.as_deref() != Some(upgrade_id) {
            *cancel_for = None;
            self.cancel.store(false, Ordering::SeqCst);
        }
    }

    fn lock_for(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.cancel_for
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<'a> SlotWriter<'a> {
    pub fn new(
        file: File,
        start: u64,
        total: u64,
        store: &'a Store,
        state: &'a mut DeviceState,
        observer: &'a mut dyn Observer,
        interrupts: &'a Interrupts,
    ) -> Self {
        Self {
            file,
            written: start,
            total,
            checkpoint_bytes: 8 << 20,
            checkpointed: start,
            last: Instant::now(),
            store,
            state,
            observer,
            interrupts,
        }
    }

    pub fn checkpoint(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.state.written(self.written);
        self.store.save(self.state).map_err(std::io::Error::other)?;
        self.checkpointed = self.written;
        self.last = Instant::now();
        Ok(())
    }
}

impl Write for SlotWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.interrupts.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(Canceled));
        }
        if self.interrupts.pause.load(Ordering::SeqCst) {
            self.checkpoint()?;
            return Err(std::io::Error::other(Paused));
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        crate::failpoint::download(self.written);
        self.observer.progress(self.written, self.total);
        if self.written - self.checkpointed >= self.checkpoint_bytes
            || self.last.elapsed() >= CHECKPOINT_INTERVAL
        {
            self.checkpoint()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
