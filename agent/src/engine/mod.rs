//! The upgrade flow: install, resume after a crash, commit or roll back.
//!
//! One loop, [`Engine::drive`], matches on the persisted phase and runs the step for it; every step
//! first changes [`DeviceState`] in memory, then saves it, then does the side effect it announced.
//! A crash at any point therefore leaves a phase on disk whose step is safe to run again, which is
//! all that [`Engine::resume`] does on start.
//!
//! ```text
//! Downloading ──► Staged ──► Switching ──► Testing ──► (committed)
//!      │                                     │
//!      └─► (rejected / failed / canceled)    └─► RollingBack ──► (rolled_back)
//! ```

mod chunked;
mod flight;
mod hold;
mod steps;
#[cfg(test)]
mod tests;
mod tuf;
mod writer;

pub use writer::Interrupts;

use crate::activation::{Activation, ActivationError};
use crate::bundle::{BundleError, TrustedKeys};
use crate::config::Config;
use crate::download::{DownloadError, Fetcher};
use crate::slot::SlotBackend;
use crate::state::DeviceState;
use crate::store::{Store, StoreError};
use flightnode_proto::status::{DeviceStatus, LastUpgrade};
use flightnode_proto::{ErrorCode, Phase, Slot, SlotState};
use sha2::Digest;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A local failure that stops the engine itself (as opposed to an upgrade that ends badly, which is
/// an [`Outcome`]). The device stays on whatever the persisted state says.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The state store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Trusted keys could not be loaded.
    #[error("cannot load trusted keys")]
    Keys(#[source] BundleError),
    /// The slot pointer or bootloader.
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// `[tuf]` cannot be used (its root, its metadata store).
    #[error("cannot set up TUF mode")]
    Tuf(#[source] crate::tuf::TufError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// Another upgrade is in flight and cannot be set aside.
    #[error("upgrade {id} is in phase {phase}; wait for it to finish (or run `flightnode-agent resume`)")]
    Busy {
        /// The upgrade in flight.
        id: String,
        /// Its phase.
        phase: Phase,
    },
    /// mark-good / mark-bad of something that cannot be marked.
    #[error("{0}")]
    Refused(String),
}

impl EngineError {
    /// The contract code.
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Busy { .. } | EngineError::Store(StoreError::Locked { .. }) => ErrorCode::Busy,
            _ => ErrorCode::Internal,
        }
    }
}

/// How a call to [`Engine::install`] or [`Engine::resume`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was in flight.
    Idle,
    /// The upgrade ended; `result` says how.
    Finished(LastUpgrade),
    /// Reboot mode: the reboot command ran but the system is still up. The bootloader will try the
    /// new slot on the next boot and the agent evaluates it after that boot.
    AwaitingReboot {
        /// The slot that boots next.
        slot: Slot,
    },
    /// Shutdown paused the download; the next start resumes it from the saved offset.
    Paused,
}

/// What to install.
#[derive(Debug, Clone)]
pub struct Request {
    /// Upgrade id; see [`derive_upgrade_id`].
    pub id: String,
    /// Bundle path or URL.
    pub source: String,
    /// Allow a lower version (never below the security floor).
    pub allow_downgrade: bool,
}

/// The state of a device without a store: the slot that runs holds the factory version and is
/// good. Reboot mode asks the bootloader which slot booted (an error when it cannot tell: assuming
/// slot a could mean writing the running root); command mode follows an existing `current`.
fn fresh_state(cfg: &Config, activation: &Activation) -> Result<DeviceState, EngineError> {
    let running = activation.booted(Slot::A)?;
    Ok(DeviceState::adopt(cfg.factory_version.clone(), running))
}

/// A deterministic upgrade id for a command that carries none (a bare URL, a local install):
/// the same payload always names the same upgrade.
pub fn derive_upgrade_id(payload: &str) -> String {
    let digest = sha2::Sha256::digest(payload.trim().as_bytes());
    format!("u-{}", &hex::encode(digest)[..16])
}

/// Gets told what the engine does, for progress bars, MQTT status and heartbeats.
pub trait Observer: Send {
    /// A transition was saved.
    fn changed(&mut self, _state: &DeviceState) {}
    /// Image bytes written so far, out of `total`. Called often; rate-limit in the observer.
    fn progress(&mut self, _bytes: u64, _total: u64) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// The upgrade engine of one device.
pub struct Engine {
    cfg: Config,
    store: Store,
    state: DeviceState,
    slots: Box<dyn SlotBackend>,
    activation: Activation,
    keys: TrustedKeys,
    fetcher: Fetcher,
    observer: Box<dyn Observer>,
    interrupts: Arc<Interrupts>,
    fleet_gate: Option<FleetGate>,
    flight: Option<crate::flight::Gate>,
    /// TUF mode (`[tuf]`); `None`: `trusted_keys` only.
    tuf: Option<crate::tuf::Tuf>,
    /// The target entry verified for the upgrade in flight (its id), so the final check after
    /// the write does not fetch the metadata again; after a restart it is verified again.
    tuf_target: Option<(String, crate::tuf::TrustedTarget)>,
    /// The trusted time TUF expiry is judged by.
    clock: crate::clock::Clock,
}

/// Waits up to the given time for the fleet (broker or hub) to be reachable; true when it is.
pub type FleetGate = Box<dyn Fn(std::time::Duration) -> bool + Send>;

/// Why a step ended the upgrade, or stopped the engine.
enum Stop {
    /// The upgrade ends with this code before anything is activated (or as a rollback result).
    Upgrade(ErrorCode, String),
    /// Reboot requested and still up.
    Rebooting(Slot),
    /// Shutdown asked the download to pause; its offset is saved.
    Paused,
    /// A local failure: propagate, leave the persisted phase for the next start.
    Engine(EngineError),
    /// The step moved the upgrade to another phase instead of finishing: run that one.
    Again,
}

impl<E: Into<EngineError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Engine(e.into())
    }
}

/// The engine's hands on the device: where images go and how the running slot changes.
/// [`Engine::open`] builds them from the configuration; [`Engine::with_backends`] takes them
/// ready-made (a test's recording fakes, a board with its own bootloader code).
pub struct Backends {
    /// The slot backend images are written through.
    pub slots: Box<dyn SlotBackend>,
    /// The command-mode pointer or the reboot-mode bootloader.
    pub activation: Activation,
}

impl Backends {
    /// The backends `cfg` names.
    pub fn open(cfg: &Config) -> Result<Self, EngineError> {
        Ok(Self {
            activation: Activation::open(cfg)?,
            slots: crate::slot::open(&cfg.slots),
        })
    }
}

impl Engine {
    /// Opens the state store (creating a factory state on a fresh device) and the backends.
    /// Does not resume anything: call [`Engine::resume`] for that.
    pub fn open(cfg: Config, rt: tokio::runtime::Handle) -> Result<Self, EngineError> {
        Self::build(cfg, rt, Backends::open)
    }

    /// [`Engine::open`] with the given backends instead of the configured ones; `cfg.slots`,
    /// `cfg.boot` and `cfg.activation.mode` are not consulted for them.
    pub fn with_backends(
        cfg: Config,
        rt: tokio::runtime::Handle,
        backends: Backends,
    ) -> Result<Self, EngineError> {
        Self::build(cfg, rt, |_| Ok(backends))
    }

    /// `backends` runs after the store, keys and fetcher are set up, where `open` always built
    /// them: a locked store is reported before any bootloader tool runs.
    fn build(
        cfg: Config,
        rt: tokio::runtime::Handle,
        backends: impl FnOnce(&Config) -> Result<Backends, EngineError>,
    ) -> Result<Self, EngineError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StoreError::Sled {
            path: cfg.state_dir.clone(),
            source: sled::Error::Io(source),
        })?;
        let store = Store::open(&cfg.state_dir)?;
        let keys = TrustedKeys::load(&cfg.trusted_keys).map_err(EngineError::Keys)?;
        let mut fetcher = Fetcher::new(&cfg.download, rt)?;
        let interrupts = Arc::new(Interrupts::default());
        let flags = interrupts.clone();
        fetcher.set_stop(Arc::new(move || {
            flags.cancel.load(Ordering::SeqCst) || flags.pause.load(Ordering::SeqCst)
        }));
        let tuf = cfg
            .tuf
            .as_ref()
            .map(|t| crate::tuf::Tuf::new(t, &cfg.state_dir, fetcher.client(), fetcher.runtime()))
            .transpose()
            .map_err(EngineError::Tuf)?;
        let clock = crate::clock::Clock::open(&store.durable()).map_err(|source| {
            EngineError::Store(StoreError::Sled {
                path: cfg.state_dir.join("db"),
                source,
            })
        })?;
        let Backends { slots, activation } = backends(&cfg)?;
        let cfg_flight = cfg.flight.clone().map(crate::flight::Gate::new);
        let state = if let Some(state) = store.load()? {
            state
        } else {
            let state = fresh_state(&cfg, &activation)?;
            store.save(&state)?;
            tracing::info!(device_id = %cfg.device_id, version = %cfg.factory_version, slot = %state.active,
                "fresh device: the running slot {} is active and good", state.active);
            state
        };
        let engine = Self {
            cfg,
            store,
            state,
            slots,
            activation,
            keys,
            fetcher,
            observer: Box::new(Quiet),
            interrupts,
            fleet_gate: None,
            flight: cfg_flight,
            tuf,
            tuf_target: None,
            clock,
        };
        engine.settle_pointer()?;
        Ok(engine)
    }

    /// Reboot mode: commit a trial only once `gate` says the fleet is reachable again (the daemon
    /// sets this; without it the health check alone decides).
    pub fn set_fleet_gate(&mut self, gate: FleetGate) {
        self.fleet_gate = Some(gate);
    }

    /// The flight state read over MAVLink (opens the link); `None` without `flight.mavlink`.
    pub fn flight_state(&self) -> Option<tokio::sync::watch::Receiver<crate::flight::FlightState>> {
        self.flight
            .as_ref()?
            .monitor()
            .map(crate::flight::Monitor::subscribe)
    }

    /// Where the arming lock the MAVLink link carries is set; `None` without a link.
    pub fn arm_switch(&self) -> Option<crate::flight::arm::ArmSwitch> {
        self.flight
            .as_ref()?
            .monitor()
            .map(crate::flight::Monitor::arm_switch)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the observer.
    pub fn set_observer(&mut self, observer: Box<dyn Observer>) {
        self.observer = observer;
    }

    /// Flags that cancel or pause the download in flight when set from another thread.
    pub fn interrupts(&self) -> Arc<Interrupts> {
        self.interrupts.clone()
    }

    /// The state database, shared with the daemon's other trees.
    pub fn db(&self) -> sled::Db {
        self.store.db().clone()
    }

    /// The store's database with its durability point, for the daemon's own trees.
    pub fn durable(&self) -> crate::store::Durable {
        self.store.durable()
    }

    /// The trusted clock (TUF expiry); the daemon feeds it GPS and hub time and shares it.
    pub fn clock(&self) -> crate::clock::Clock {
        self.clock.clone()
    }

    /// The persisted device state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Network bytes fetched by this engine so far.
    pub fn bytes_received(&self) -> u64 {
        self.fetcher.bytes_received()
    }

    /// The `status` view.
    pub fn status(&self) -> Result<DeviceStatus, EngineError> {
        let booted = self.activation.booted(self.state.active)?;
        Ok(self.state.report(&self.cfg.device_id, booted))
    }

    /// The `status` view without an engine: reads the store (or, on a fresh device, computes the
    /// state it would start with) and **changes nothing** — no store created or written, no
    /// pointer set, no bootloader write.
    pub fn inspect(cfg: &Config) -> Result<DeviceStatus, EngineError> {
        let activation = Activation::open(cfg)?;
        let stored = if cfg.state_dir.join("db").exists() {
            Store::open(&cfg.state_dir)?.load()?
        } else {
            None
        };
        let mut state = match stored {
            Some(state) => state,
            None => fresh_state(cfg, &activation)?,
        };
        // Shown as the next start will leave it (in memory only).
        state.end_dropped();
        let booted = activation.booted(state.active)?;
        Ok(state.report(&cfg.device_id, booted))
    }

    /// The slot that runs now: reboot mode, the booted one; command mode, where `current` points
    /// (the active slot before the first switch).
    fn running(&self) -> Result<Slot, EngineError> {
        Ok(self.activation.booted(self.state.active)?)
    }

    /// Installs a bundle. An interrupted upgrade of the same source (or id) is resumed instead of
    /// restarted; one that never reached a slot switch is set aside; one that did is finished first.
    pub fn install(&mut self, req: Request) -> Result<Outcome, EngineError> {
        self.end_dropped()?;
        if self.state.upgrade.is_none() {
            // Whatever the last boot showed (a fallback, a lost confirmation) is settled first,
            // so the policy compares against the version that really runs.
            self.confirm_boot()?;
        }
        if self.state.resume_failed(&req.id, &req.source) {
            self.interrupts.start_upgrade(&req.id);
            tracing::info!(upgrade_id = %req.id, "resuming the upgrade whose download failed, from its written prefix");
            self.save()?;
            return self.drive();
        }
        if let Some(u) = self.state.upgrade.clone() {
            if u.id == req.id || u.source == req.source {
                tracing::info!(upgrade_id = %u.id, phase = %u.phase, "resuming the interrupted upgrade");
                return self.drive();
            }
            match u.step_phase() {
                Phase::Downloading | Phase::Staged => {
                    let msg = format!("superseded by upgrade {} from {}", req.id, req.source);
                    self.state.fail(ErrorCode::Canceled, msg);
                    self.save()?;
                }
                _ => {
                    if let Outcome::AwaitingReboot { .. } = self.drive()? {
                        return Err(EngineError::Busy {
                            id: u.id,
                            phase: self.state.phase(),
                        });
                    }
                }
            }
        }
        self.interrupts.start_upgrade(&req.id);
        let running = self.running()?;
        if self.state.slot(running).state != SlotState::Good {
            // The other slot may be the only good image left: never overwrite it from here.
            return Err(EngineError::Refused(format!(
                "slot {running} is running but is not known good ({}); refusing to install over slot {}, \
                 which may be the only good image. Reboot into slot {} first",
                format!("{:?}", self.state.slot(running).state).to_lowercase(),
                !running,
                !running
            )));
        }
        if running != self.state.active {
            return Err(EngineError::Refused(format!(
                "slot {running} is running but the agent knows slot {} as the active one; refusing to \
                 install into the running slot. Boot slot {} again (or mark slot {running} good if it \
                 holds a complete image)",
                self.state.active, self.state.active
            )));
        }
        tracing::info!(upgrade_id = %req.id, source = %req.source, "upgrade requested");
        self.state.begin(req.id, req.source, req.allow_downgrade);
        self.save()?;
        self.drive()
    }

    /// Finishes or undoes whatever was in flight when the agent stopped. Running it again in the
    /// same state does nothing new.
    pub fn resume(&mut self) -> Result<Outcome, EngineError> {
        self.end_dropped()?;
        if self.state.upgrade.is_none() {
            self.confirm_boot()?;
            return Ok(Outcome::Idle);
        }
        let outcome = self.drive()?;
        if self.state.upgrade.is_none() {
            self.confirm_boot()?;
        }
        Ok(outcome)
    }

    /// Reboot mode, nothing in flight: tells the bootloader that this boot of a good slot worked,
    /// as RAUC's mark-good service does (GRUB's script counts every boot as a try). When the
    /// bootloader fell back from the active slot, the slot that runs becomes the active and
    /// committed one and the other is marked bad.
    fn confirm_boot(&mut self) -> Result<(), EngineError> {
        let Activation::Reboot { boot, .. } = &self.activation else {
            return Ok(());
        };
        let booted = boot.booted().map_err(ActivationError::from)?;
        if self.state.slot(booted).state != SlotState::Good {
            tracing::warn!(slot = %booted, state = ?self.state.slot(booted).state,
                "booted a slot that is not known good; not confirming it");
            return Ok(());
        }
        if self.state.active != booted {
            let failed = self.state.active;
            tracing::warn!(slot = %booted, active = %failed,
                "the bootloader started slot {booted} instead of the active slot {failed}; \
                 slot {booted} is active now and slot {failed} is bad");
            // Bootloader first: a crash before the save repeats this, never the other way round.
            if self.state.slot(failed).state != SlotState::Empty {
                boot.mark_bad(failed).map_err(ActivationError::from)?;
            }
            if let Some(last) = self.state.fell_back(booted)
                && let Some(error) = &last.error
            {
                tracing::warn!(upgrade_id = %last.upgrade_id, code = %error.code,
                    "the committed upgrade is undone: {}", error.message);
            }
            self.save()?;
        }
        if let Activation::Reboot { boot, .. } = &self.activation {
            boot.mark_good(booted).map_err(ActivationError::from)?;
        }
        Ok(())
    }

    /// Reboot mode, an upgrade in flight: when the booted slot is a good one and not the target,
    /// it is the fallback and this boot of it worked, so its attempts are restored (U-Boot's
    /// `BOOT_x_LEFT` refilled, GRUB's `x_TRY` reset). A long or resumed download, or days at the
    /// flight gate with the board power-cycled in between, never use them up. The order is not
    /// touched: an armed trial stays armed.
    fn confirm_running(&self, target: Slot) -> Result<(), EngineError> {
        let Activation::Reboot { boot, .. } = &self.activation else {
            return Ok(());
        };
        let booted = boot.booted().map_err(ActivationError::from)?;
        if booted != target && self.state.slot(booted).state == SlotState::Good {
            boot.confirm(booted).map_err(ActivationError::from)?;
        }
        Ok(())
    }

    /// Runs the step of the persisted phase until the upgrade ends or must wait for a reboot.
    fn drive(&mut self) -> Result<Outcome, EngineError> {
        // First, before any step can wait (at the flight gate, for a download): a boot spent
        // waiting must not count as a failed boot of the fallback.
        if let Some(target) = self.state.upgrade.as_ref().map(|u| u.target) {
            self.confirm_running(target)?;
        }
        loop {
            let Some(phase) = self.state.upgrade.as_ref().map(crate::state::Upgrade::step_phase) else {
                return Ok(self.state.last.clone().map_or(Outcome::Idle, Outcome::Finished));
            };
            let step = match phase {
                Phase::Downloading => self.download(),
                Phase::Staged | Phase::Switching => self.switch(),
                Phase::Testing => self.test(),
                Phase::RollingBack => self.roll_back(),
                // Never persisted with an upgrade (or a wait without its record); treat like a
                // fresh start of the download.
                Phase::Idle | Phase::Waiting => {
                    self.state.enter(Phase::Downloading);
                    Ok(())
                }
            };
            match step {
                Ok(()) | Err(Stop::Again) => {}
                Err(Stop::Upgrade(code, message)) => self.end(code, message)?,
                Err(Stop::Rebooting(slot)) => return Ok(Outcome::AwaitingReboot { slot }),
                Err(Stop::Paused) => return Ok(Outcome::Paused),
                Err(Stop::Engine(e)) => return Err(e),
            }
        }
    }

    /// Ends the upgrade without the new image: records why, and makes sure the old slot is active.
    fn end(&mut self, code: ErrorCode, message: String) -> Result<(), EngineError> {
        let id = self
            .state
            .upgrade
            .as_ref()
            .map(|u| u.id.clone())
            .unwrap_or_default();
        if code == ErrorCode::AlreadyInstalled {
            tracing::info!(upgrade_id = %id, "{message}");
        } else {
            tracing::warn!(upgrade_id = %id, code = %code, "upgrade ended: {message}");
        }
        self.state.fail(code, message);
        self.save()?;
        self.settle_pointer()
    }

    /// Ends an upgrade the store held that this agent cannot carry on (a newer agent's, see
    /// [`crate::state`]) before anything else runs: the slot that runs stays (the caller confirms
    /// it with the bootloader), the other is bad, and the end is saved and reported.
    fn end_dropped(&mut self) -> Result<(), EngineError> {
        let Some(dropped) = &self.state.dropped else {
            return Ok(());
        };
        if let (Some(target), Activation::Reboot { boot, .. }) = (dropped.target, &self.activation) {
            // Out of the boot order before the save, as a rollback does: a crash repeats this.
            // Never the slot that runs: with no verdict on it the bootloader falls back later.
            let booted = boot.booted().map_err(ActivationError::from)?;
            if booted != target {
                boot.mark_bad(target).map_err(ActivationError::from)?;
            }
        }
        if let Some(last) = self.state.end_dropped() {
            let message = last
                .error
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or_default();
            tracing::warn!(upgrade_id = %last.upgrade_id, code = %ErrorCode::StateTooNew, slot = %self.state.active,
                "upgrade ended: {message}");
            self.save()?;
            self.settle_pointer()?;
        }
        Ok(())
    }

    /// Saves the state, then tells the observer.
    fn save(&mut self) -> Result<(), EngineError> {
        self.store.save(&self.state)?;
        self.observer.changed(&self.state);
        Ok(())
    }

    /// Command mode: makes the `current` pointer agree with the persisted active slot when no
    /// switch is in flight (a crash between rename and save, or a hand-edited pointer). From the
    /// switch to the end of a rollback the step of the phase sets the pointer itself: `active`
    /// then names the trial slot, which may be the failed one.
    fn settle_pointer(&self) -> Result<(), EngineError> {
        if let Activation::Command { pointer } = &self.activation {
            // A newer agent's dropped upgrade may have switched: wait for `end_dropped`.
            let settled = self.state.dropped.is_none()
                && matches!(
                    self.state
                        .upgrade
                        .as_ref()
                        .map_or(Phase::Idle, crate::state::Upgrade::step_phase),
                    Phase::Idle | Phase::Downloading | Phase::Staged
                );
            if settled && pointer.read()? != Some(self.state.active) {
                pointer.set(self.state.active)?;
            }
        }
        Ok(())
    }

    /// `mark-good`/`mark-bad` of `slot`, like `rauc status mark-good`.
    ///
    /// Guards on the slot that runs, not on `active`: `mark-good` commits only a slot that has
    /// booted (a pending trial is refused until its boot), and `mark-bad` refuses whatever would
    /// leave no good slot to boot. Marking a pending trial bad cancels it in the bootloader.
    pub fn mark(&mut self, slot: Slot, good: bool) -> Result<String, EngineError> {
        self.end_dropped()?;
        let running = self.running()?;
        let boot_id = self.activation.boot_id()?;
        let trial = self
            .state
            .upgrade
            .as_ref()
            .filter(|u| matches!(u.phase, Phase::Testing | Phase::Switching) && u.target == slot)
            .cloned();
        if let Some(u) = trial {
            // Command mode: `current` names the trial from the switch on. Reboot mode: only a
            // boot after the one that set the trial, on the trial slot, runs it.
            let booted = match &self.activation {
                Activation::Command { .. } => u.phase == Phase::Testing,
                Activation::Reboot { .. } => running == slot && boot_id != u.boot_id,
            };
            if good && !booted {
                return Err(EngineError::Refused(format!(
                    "slot {slot} has not booted yet (its trial starts at the next boot); refusing \
                     to commit an image that never ran. Mark it good from inside that boot"
                )));
            }
            let outcome = if good {
                if u.phase != Phase::Testing {
                    return Err(EngineError::Refused(format!(
                        "slot {slot} is being switched to; run `flightnode-agent resume` first"
                    )));
                }
                self.state.trial_runs();
                self.commit().map(|()| Outcome::Idle)
            } else {
                let (code, why) = if booted {
                    (ErrorCode::HealthCheckFailed, "marked bad by the operator")
                } else {
                    (
                        ErrorCode::Canceled,
                        "marked bad by the operator before its trial boot",
                    )
                };
                self.begin_roll_back(code, format!("slot {slot} {why}"))
                    .and_then(|()| self.roll_back().map(|()| Outcome::Idle))
            };
            return match outcome {
                Ok(_) => Ok(format!(
                    "slot {slot} marked {}",
                    if good {
                        "good (committed)"
                    } else {
                        "bad (rolled back)"
                    }
                )),
                Err(Stop::Rebooting(s)) => Ok(format!("slot {slot} marked bad; rebooting into slot {s}")),
                Err(Stop::Paused | Stop::Again) => Ok(format!("slot {slot}: paused")),
                Err(Stop::Upgrade(code, message)) => {
                    self.end(code, message.clone())?;
                    Ok(message)
                }
                Err(Stop::Engine(e)) => Err(e),
            };
        }
        let in_flight = self
            .state
            .upgrade
            .as_ref()
            .map(|u| (u.id.clone(), u.phase, u.target));
        if let Some((id, phase, target)) = &in_flight
            && *target == slot
        {
            return Err(EngineError::Refused(format!(
                "upgrade {id} is writing slot {slot} ({phase}); it is not bootable until that \
                 upgrade ends. Cancel it or let it finish"
            )));
        }
        let record = self.state.slot(slot).clone();
        if good {
            if slot != running {
                if record.state == SlotState::Good {
                    return Ok(format!("slot {slot} is already good"));
                }
                return Err(EngineError::Refused(format!(
                    "slot {slot} is not running (slot {running} is); only a slot that has booted \
                     can be marked good. Boot it first"
                )));
            }
            if record.version.is_none() {
                return Err(EngineError::Refused(format!(
                    "slot {slot} holds no complete image the agent knows; refusing to mark it good"
                )));
            }
        } else {
            let other = self.state.slot(!slot).state;
            let refusal = if slot == running && matches!(self.activation, Activation::Command { .. }) {
                Some(format!(
                    "slot {slot} is the running slot; install another image instead of marking it bad"
                ))
            } else if slot == running && (in_flight.is_some() || other != SlotState::Good) {
                Some(format!(
                    "slot {slot} is the running slot and slot {} is not a good fallback ({}); \
                     marking it bad would leave no good slot to boot",
                    !slot,
                    format!("{other:?}").to_lowercase()
                ))
            } else if slot != running && self.state.slot(running).state != SlotState::Good {
                Some(format!(
                    "slot {running} runs but is not known good; marking slot {slot} bad would leave \
                     no good slot to boot"
                ))
            } else {
                None
            };
            if let Some(message) = refusal {
                return Err(EngineError::Refused(message));
            }
        }
        if let Activation::Reboot { boot, .. } = &self.activation {
            if !good {
                boot.mark_bad(slot).map_err(ActivationError::from)?;
            } else if in_flight.is_some() {
                // An upgrade is in flight: restore this boot's attempts without touching the order.
                boot.confirm(slot).map_err(ActivationError::from)?;
            } else {
                boot.mark_good(slot).map_err(ActivationError::from)?;
            }
        }
        self.state.slot_mut(slot).state = if good { SlotState::Good } else { SlotState::Bad };
        if good
            && self.state.active == slot
            && in_flight.is_none()
            && let Some(v) = record.version
        {
            self.state.committed_version = v;
        }
        self.save()?;
        Ok(format!(
            "slot {slot} marked {}",
            if good { "good" } else { "bad" }
        ))
    }
}
