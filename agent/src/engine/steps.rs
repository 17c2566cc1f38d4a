//! The steps of [`Engine::drive`], one per phase.

use super::chunked::TargetHeld;
use super::writer::SlotWriter;
use super::{Engine, Stop};
use crate::activation::{Activation, ActivationError};
use crate::boot::{BootBackend, BootError};
use crate::bundle::{self, BundleError};
use crate::download::DownloadError;
use crate::hooks::{self, Hook, HookEnv};
use crate::policy;
use flightnode_proto::{ErrorCode, Phase, Slot};
use sha2::Digest;
use std::time::Duration;

/// First request of a download: a format-1 header (manifest and signature are capped at 68 KiB)
/// fits; a chunked bundle's longer index takes a few doubling requests.
const HEAD_PROBE: u64 = 128 * 1024;

/// Trial boots that may end before their check finishes (power cuts) before the trial fails.
const TRIAL_BOOTS: u32 = 3;

/// Maps a bundle/copy error to the upgrade's end: a fetch failure carried through the reader keeps
/// its own code and message. (Cancel and pause are recognised by their flags, in `interrupted`.)
fn copy_stop(e: &BundleError) -> Stop {
    match e
        .io_source()
        .and_then(|io| io.get_ref())
        .and_then(|i| i.downcast_ref::<DownloadError>())
    {
        Some(d) => Stop::Upgrade(d.code(), flightnode_proto::error::chain(d)),
        None => Stop::Upgrade(e.code(), flightnode_proto::error::chain(e)),
    }
}

impl Engine {
    /// An interruption explains any download error that follows it: report that, not the error.
    pub(super) fn interrupted(&self) -> Option<Stop> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.interrupts.pause.load(SeqCst) {
            Some(Stop::Paused)
        } else if self.interrupts.cancel.load(SeqCst) {
            Some(Stop::Upgrade(
                ErrorCode::Canceled,
                "canceled before the image was written".into(),
            ))
        } else if self.fetcher.held() {
            // The link policy paused the download: `download` waits, then resumes it.
            Some(Stop::Again)
        } else {
            None
        }
    }

    pub(super) fn upgrade(&self) -> Result<&crate::state::Upgrade, Stop> {
        self.state
            .upgrade
            .as_ref()
            .ok_or_else(|| Stop::Upgrade(ErrorCode::Internal, "no upgrade in flight".into()))
    }

    /// Downloading: verify the manifest (unless already verified), then stream the image into the
    /// target slot from where the last checkpoint left it, and verify its hash.
    pub(super) fn download(&mut self) -> Result<(), Stop> {
        if self.flight.as_ref().is_some_and(|g| g.config().gate_download) {
            self.flight_gate()?;
        }
        let source = self.upgrade()?.source.clone();
        self.link_gate(&source)?;
        let u = self.upgrade()?.clone();
        let running = self.running()?;
        if running == u.target {
            return Err(Stop::Engine(super::EngineError::Refused(format!(
                "upgrade {} targets slot {} ({}), which is the running slot; refusing to write it",
                u.id,
                u.target,
                self.slots.path(u.target).display()
            ))));
        }
        // An interruption explains any fetch error that follows it: report that, not the error.
        let fetch_stop = |this: &Self, e: crate::download::DownloadError| {
            this.interrupted()
                .unwrap_or(Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))
        };
        let (manifest, start, hasher, reader) = match &u.manifest {
            None => {
                // TUF mode: the target must be listed before a single bundle byte is fetched.
                let target = self.tuf_target()?;
                let mut reader = self
                    .fetcher
                    .open_head(&u.source, HEAD_PROBE)
                    .map_err(|e| fetch_stop(self, e))?;
                if let (Some(t), Some(total)) = (&target, reader.total_len()) {
                    t.check_length(total)
                        .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
                }
                let header = bundle::read_header(&mut reader, &self.keys)
                    .map_err(|e| self.interrupted().unwrap_or_else(|| copy_stop(&e)))?;
                let m = header.manifest;
                // `already_installed` only for the version that runs (after a fallback the
                // committed version follows it too, see `DeviceState::fell_back`).
                let committed = match self.state.slot(running) {
                    r if r.state == flightnode_proto::SlotState::Good => r.version.clone(),
                    _ => None,
                }
                .unwrap_or_else(|| self.state.committed_version.clone());
                let device = policy::Device {
                    hardware: &self.cfg.hardware,
                    committed: &committed,
                    security_floor: self.state.security_floor,
                };
                policy::check(&m, &device, u.allow_downgrade, time::OffsetDateTime::now_utc())
                    .map_err(|r| Stop::Upgrade(r.code, r.message))?;
                if let Some(stop) = self.interrupted() {
                    return Err(stop);
                }
                self.slots
                    .check_room(u.target, m.image.size)
                    .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
                tracing::info!(upgrade_id = %u.id, version = %m.version, slot = %u.target, size = m.image.size,
                    "manifest verified; writing image");
                // Write-ahead, in RAUC's order: the slot is marked bad in the state, then in the
                // bootloader, before the first byte overwrites it.
                self.state.accept_manifest(m.clone(), header.image_offset);
                self.save()?;
                // What the target held, from its cached index, before the write drops that cache.
                let held = m
                    .chunks
                    .as_ref()
                    .map(|info| TargetHeld::cached(&self.cfg.state_dir, u.target, info));
                self.disable_target(u.target)?;
                crate::failpoint::hit("verified");
                if let (Some(index), Some(held)) = (header.chunks, held) {
                    // Only the chunks the device lacks are fetched, in ranges of neighbours.
                    drop(reader);
                    return self.install_chunks(&m, &index, header.image_offset, u.target, &held);
                }
                (m, 0, sha2::Sha256::new(), reader)
            }
            Some(m) if m.is_chunked() => {
                self.disable_target(u.target)?;
                // The index is not kept in the state: fetch the header again (up to `chunks.zst`)
                // and check it is the bundle whose manifest was accepted.
                let mut reader = self
                    .fetcher
                    .open_range(&u.source, 0, u.image_offset)
                    .map_err(|e| fetch_stop(self, e))?;
                let header = bundle::read_header(&mut reader, &self.keys)
                    .map_err(|e| self.interrupted().unwrap_or_else(|| copy_stop(&e)))?;
                drop(reader);
                let (Some(index), true) = (header.chunks, header.manifest == *m) else {
                    return Err(Stop::Upgrade(
                        ErrorCode::MalformedBundle,
                        format!(
                            "bundle {} changed since its manifest was accepted; refusing to mix two bundles in slot {}",
                            u.source, u.target
                        ),
                    ));
                };
                tracing::info!(upgrade_id = %u.id, slot = %u.target, "resuming chunked image download");
                return self.install_chunks(m, &index, header.image_offset, u.target, &TargetHeld::Any);
            }
            Some(m) => {
                // A crash between the save and the bootloader write above: do it again.
                self.disable_target(u.target)?;
                let mut start = u.written;
                let mut hasher = sha2::Sha256::new();
                if start > 0 && self.slots.hash_prefix(u.target, start, &mut hasher).is_err() {
                    tracing::warn!(upgrade_id = %u.id, slot = %u.target, "written prefix unreadable; starting the image again");
                    start = 0;
                }
                tracing::info!(upgrade_id = %u.id, slot = %u.target, offset = start, "resuming image download");
                let reader = self
                    .fetcher
                    .open(&u.source, u.image_offset + start)
                    .map_err(|e| fetch_stop(self, e))?;
                (m.clone(), start, hasher, reader)
            }
        };
        self.write_image(&manifest, start, hasher, reader, u.target)
    }

    /// Chunked bundle: write the image from local and fetched chunks, then stage it.
    fn install_chunks(
        &mut self,
        manifest: &flightnode_proto::Manifest,
        index: &flightnode_proto::chunks::ChunkIndex,
        data_offset: u64,
        target: Slot,
        held: &TargetHeld,
    ) -> Result<(), Stop> {
        self.write_chunks(manifest, index, data_offset, target, held)?;
        self.state.written(manifest.image.size);
        self.state.enter(Phase::Staged);
        self.save()?;
        tracing::info!(slot = %target, version = %manifest.version, "image written and verified");
        crate::failpoint::hit("staged");
        Ok(())
    }

    /// Reboot mode: the target slot is not bootable from now until its trial is set. Its cached
    /// chunk index no longer describes it.
    fn disable_target(&self, target: Slot) -> Result<(), Stop> {
        super::chunked::forget_cache(&self.cfg.state_dir, target);
        if let Activation::Reboot { boot, .. } = &self.activation {
            boot.mark_bad(target).map_err(ActivationError::from)?;
        }
        Ok(())
    }

    fn write_image(
        &mut self,
        manifest: &flightnode_proto::Manifest,
        start: u64,
        hasher: sha2::Sha256,
        mut reader: impl std::io::Read,
        target: Slot,
    ) -> Result<(), Stop> {
        let file = self
            .slots
            .open_at(target, start)
            .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
        let size = manifest.image.size;
        let mut writer = SlotWriter::new(
            file,
            start,
            size,
            &self.store,
            &mut self.state,
            self.observer.as_mut(),
            &self.interrupts,
        );
        writer.checkpoint_bytes = self.cfg.download.checkpoint_bytes.max(4096);
        let copied = bundle::copy_image(&mut reader, &mut writer, manifest, start, hasher);
        if copied.is_err() && self.fetcher.held() {
            // Paused by the link policy: what reached the slot counts, so the resume starts here.
            writer.checkpoint().map_err(|e| {
                Stop::Upgrade(
                    ErrorCode::Internal,
                    format!(
                        "cannot record the written prefix of slot {target} ({}): {e}",
                        self.slots.path(target).display()
                    ),
                )
            })?;
        }
        let file = writer.file;
        // Whatever broke after a cancel or shutdown is not the bundle's fault.
        copied.map_err(|e| self.interrupted().unwrap_or_else(|| copy_stop(&e)))?;
        self.slots
            .finish(target, &file, size)
            .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
        self.tuf_check_bundle(manifest, target)?;
        self.state.written(size);
        self.state.enter(Phase::Staged);
        self.save()?;
        tracing::info!(slot = %target, version = %manifest.version, "image written and verified");
        crate::failpoint::hit("staged");
        Ok(())
    }

    fn hook_env(&self, slot: Slot) -> (std::path::PathBuf, String) {
        let version = self
            .state
            .slot(slot)
            .version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        (self.slots.path(slot).to_owned(), version)
    }

    /// Runs a configured hook; an unconfigured one (`None`) succeeds.
    fn run_hook(
        &self,
        hook: Hook,
        command: Option<&str>,
        slot: Slot,
        timeout: Duration,
    ) -> Result<(), hooks::HookError> {
        let Some(command) = command else { return Ok(()) };
        let (path, version) = self.hook_env(slot);
        hooks::run(
            hook,
            command,
            &HookEnv {
                slot,
                path: &path,
                version: &version,
            },
            timeout,
        )
    }

    /// Staged/Switching: point the system at the target slot.
    pub(super) fn switch(&mut self) -> Result<(), Stop> {
        let u = self.upgrade()?.clone();
        let target = u.target;
        let boot_id = self.activation.boot_id()?;
        if let Activation::Reboot { boot, .. } = &self.activation
            && u.phase == Phase::Switching
            && u.boot_id != boot_id
            && boot.booted().map_err(ActivationError::from)? == target
        {
            // Power cut after the trial was set but before it was recorded: this is the trial
            // boot. Record it as such; `test` sees the new boot id and checks the slot.
            tracing::info!(slot = %target, "the trial boot happened before it was recorded");
            self.state.enter(Phase::Testing);
            self.save()?;
            return Ok(());
        }
        if u.step_phase() == Phase::Staged {
            // Before anything is switched: a charger, then the vehicle.
            self.power_gate()?;
        }
        self.flight_gate()?;
        if let Some(u) = self.state.upgrade.as_mut() {
            u.boot_id.clone_from(&boot_id);
        }
        self.state.enter(Phase::Switching);
        self.save()?;
        crate::failpoint::hit("switching");
        match &self.activation {
            Activation::Command { pointer } => {
                pointer.set(target)?;
                self.state.enter(Phase::Testing);
                self.state.trial_runs();
                self.save()?;
                crate::failpoint::hit("switched");
                Ok(())
            }
            Activation::Reboot { .. } => {
                self.arm_trial(!target, target)?;
                self.state.enter(Phase::Testing);
                self.save()?;
                crate::failpoint::hit("switched");
                self.reboot(target)
            }
        }
    }

    /// Reboot mode: makes `fallback` the slot the bootloader returns to, then arms one trial boot
    /// of `target`. An armed trial starts at the next power cut or watchdog reset too, so the
    /// flight gate is asked again right before each write, however recently it was open.
    fn arm_trial(&mut self, fallback: Slot, target: Slot) -> Result<(), Stop> {
        // GRUB's script counts every boot as a try until the slot is marked good.
        self.flight_gate()?;
        self.boot_write(|boot| boot.mark_good(fallback))?;
        self.flight_gate()?;
        self.boot_write(|boot| boot.set_trial(target))
    }

    /// One bootloader write; command mode has none.
    fn boot_write(&self, write: impl FnOnce(&dyn BootBackend) -> Result<(), BootError>) -> Result<(), Stop> {
        if let Activation::Reboot { boot, .. } = &self.activation {
            write(boot.as_ref()).map_err(ActivationError::from)?;
        }
        Ok(())
    }

    /// Runs the reboot command and waits for it to take us down. Every reboot the agent asks for
    /// comes through here, so the flight gate is asked here, right before the command, and no
    /// path (a switch, a retried trial, a rollback) can reboot the vehicle's computer in flight.
    fn reboot(&mut self, next: Slot) -> Result<(), Stop> {
        self.flight_gate()?;
        let a = &self.cfg.activation;
        tracing::info!(slot = %next, "rebooting into slot {next}");
        if let Err(e) = self.run_hook(Hook::Reboot, Some(&a.reboot_command), next, a.reboot_wait) {
            tracing::error!("{}", flightnode_proto::error::Chain(&e));
        }
        std::thread::sleep(a.reboot_wait);
        Err(Stop::Rebooting(next))
    }

    /// Testing: the new slot runs (or should). Apply (command mode), health check, then commit or
    /// roll back. In reboot mode, first find out whether the trial boot happened at all.
    pub(super) fn test(&mut self) -> Result<(), Stop> {
        let u = self.upgrade()?.clone();
        if let Activation::Reboot { boot, .. } = &self.activation {
            let boot_id = self.activation.boot_id()?;
            if boot_id == u.boot_id {
                // Same boot as the one that requested the trial: the reboot has not happened yet
                // (it asks the flight gate itself).
                return self.reboot(u.target);
            }
            let booted = boot.booted().map_err(ActivationError::from)?;
            if booted != u.target && u.trial_boot.is_some() {
                return self.retry_trial(&u, booted, boot_id);
            }
            if booted != u.target {
                boot.mark_bad(u.target).map_err(ActivationError::from)?;
                return Err(Stop::Upgrade(
                    ErrorCode::TrialBootFailed,
                    format!(
                        "slot {} did not come up; the bootloader fell back to slot {booted}",
                        u.target
                    ),
                ));
            }
            if u.trial_boot != boot_id {
                if u.trial_boots >= TRIAL_BOOTS {
                    return self.begin_roll_back(
                        ErrorCode::HealthCheckFailed,
                        format!(
                            "slot {} booted {} times but each boot ended before its health check finished",
                            u.target, u.trial_boots
                        ),
                    );
                }
                // The trial slot came up: it runs, and a power cut from here on is not a failed
                // boot (see `retry_trial`).
                if let Some(up) = self.state.upgrade.as_mut() {
                    up.trial_boot = boot_id;
                    up.trial_boots += 1;
                }
                self.state.trial_runs();
                self.save()?;
            }
        } else {
            // The apply may reflash the flight controller.
            self.flight_gate()?;
            if let Err(e) = self.run_hook(
                Hook::Apply,
                self.cfg.activation.apply_command.as_deref(),
                u.target,
                self.cfg.activation.apply_timeout,
            ) {
                return self
                    .begin_roll_back(ErrorCode::HealthCheckFailed, flightnode_proto::error::chain(&e));
            }
        }
        if let Err(e) = self.run_hook(
            Hook::Health,
            self.cfg.health.command.as_deref(),
            u.target,
            self.cfg.health.timeout,
        ) {
            return self.begin_roll_back(ErrorCode::HealthCheckFailed, flightnode_proto::error::chain(&e));
        }
        if let (Activation::Reboot { .. }, Some(gate)) = (&self.activation, &self.fleet_gate) {
            let timeout = self.cfg.daemon.fleet_timeout;
            tracing::info!(slot = %u.target, "healthy; waiting for the fleet before committing");
            if !gate(timeout) {
                return self.begin_roll_back(
                    ErrorCode::HealthCheckFailed,
                    format!(
                        "slot {} is healthy but reached neither broker nor hub within {timeout:?}",
                        u.target
                    ),
                );
            }
        }
        crate::failpoint::hit("healthy");
        self.commit()
    }

    /// Reboot mode: the trial slot came up in an earlier boot, but that boot ended (a power cut)
    /// before its health check or fleet gate decided, and the bootloader has since returned to the
    /// old slot. The image booted fine, so the trial is armed again and the check re-run; after
    /// [`TRIAL_BOOTS`] such boots it counts as failed. Arming and rebooting wait for the flight
    /// gate: the fallback may be running in the air.
    fn retry_trial(
        &mut self,
        u: &crate::state::Upgrade,
        booted: Slot,
        boot_id: Option<String>,
    ) -> Result<(), Stop> {
        let Activation::Reboot { boot, .. } = &self.activation else {
            return Ok(());
        };
        if u.trial_boots >= TRIAL_BOOTS {
            boot.mark_bad(u.target).map_err(ActivationError::from)?;
            return Err(Stop::Upgrade(
                ErrorCode::HealthCheckFailed,
                format!(
                    "slot {} booted {} times but each boot ended before its health check finished",
                    u.target, u.trial_boots
                ),
            ));
        }
        tracing::warn!(slot = %u.target, booted = %booted, trial_boots = u.trial_boots,
            "the trial boot ended before its check finished; trying slot {} again", u.target);
        self.arm_trial(booted, u.target)?;
        if let Some(up) = self.state.upgrade.as_mut() {
            up.boot_id = boot_id;
            up.trial_boot = None;
        }
        self.state.active = booted;
        self.save()?;
        self.reboot(u.target)
    }

    /// Makes the trial slot the committed one.
    pub(super) fn commit(&mut self) -> Result<(), Stop> {
        let target = self.upgrade()?.target;
        if let Activation::Reboot { boot, .. } = &self.activation {
            boot.mark_good(target).map_err(ActivationError::from)?;
        }
        if let Some(last) = self.state.commit() {
            tracing::info!(upgrade_id = %last.upgrade_id, slot = %target, version = ?last.version, "committed");
        }
        self.save()?;
        Ok(())
    }

    /// Health failed: record why and enter RollingBack.
    pub(super) fn begin_roll_back(&mut self, code: ErrorCode, message: String) -> Result<(), Stop> {
        tracing::warn!(code = %code, "rolling back: {message}");
        if let Some(u) = self.state.upgrade.as_mut() {
            u.error = Some(flightnode_proto::status::ErrorReport { code, message });
        }
        self.state.enter(Phase::RollingBack);
        self.save()?;
        crate::failpoint::hit("rolling_back");
        Ok(())
    }

    /// RollingBack: switch back to the previous slot and end with the recorded error.
    pub(super) fn roll_back(&mut self) -> Result<(), Stop> {
        // Command mode: the pointer and the re-apply touch the running system. Reboot mode: only
        // the reboot does, and `reboot` asks the gate; taking the failed slot out of the
        // bootloader first makes a power cut during the wait boot the old slot.
        if matches!(self.activation, Activation::Command { .. }) {
            self.flight_gate()?;
        }
        let u = self.upgrade()?.clone();
        let old = !u.target;
        let (code, message) = u
            .error
            .clone()
            .map_or((ErrorCode::HealthCheckFailed, "rolled back".to_owned()), |e| {
                (e.code, e.message)
            });
        match &self.activation {
            Activation::Command { pointer } => {
                pointer.set(old)?;
                // Asked again right before the hook: the vehicle may have armed since.
                self.flight_gate()?;
                let apply = self.cfg.activation.apply_command.as_deref();
                // The old slot is active whatever this says; a failure is logged, not fatal.
                if let Err(e) = self.run_hook(Hook::Apply, apply, old, self.cfg.activation.apply_timeout) {
                    tracing::error!(slot = %old, "re-applying the previous slot failed: {}", flightnode_proto::error::Chain(&e));
                }
            }
            Activation::Reboot { boot, .. } => {
                let booted = boot.booted().map_err(ActivationError::from)?;
                if booted == u.target {
                    // Still on the bad slot: make the old one primary and reboot into it.
                    boot.mark_bad(u.target).map_err(ActivationError::from)?;
                    let boot_id = self.activation.boot_id()?;
                    if u.boot_id != boot_id {
                        if let Some(up) = self.state.upgrade.as_mut() {
                            up.boot_id = boot_id;
                        }
                        self.save()?;
                    }
                    return self.reboot(old);
                }
                // Still (or again) on the old slot: a trial that is set but never ran must not
                // start at the next power-on.
                boot.mark_bad(u.target).map_err(ActivationError::from)?;
            }
        }
        Err(Stop::Upgrade(code, message))
    }
}
