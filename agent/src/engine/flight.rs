//! The flight gate inside the engine: hold the upgrade in [`Phase::Waiting`] until the vehicle
//! allows the next step (see [`crate::flight`]).
//!
//! The wait is persisted (phase `waiting`, the held phase, the reason, when it began), so a power
//! cut while waiting comes back waiting; `flight.max_wait` counts from the first moment, across
//! restarts.

use super::{Engine, Stop};
use crate::activation::{Activation, ActivationError};
use crate::flight::Verdict;
use flightnode_proto::{ErrorCode, Phase};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Engine {
    fn held(&self) -> Result<&crate::state::Upgrade, Stop> {
        self.state
            .upgrade
            .as_ref()
            .ok_or_else(|| Stop::Upgrade(ErrorCode::Internal, "no upgrade in flight".into()))
    }

    /// Returns once the flight gate lets the step of the current phase touch the vehicle; until
    /// then the upgrade waits in phase `waiting`. Without `[flight]` it returns at once.
    ///
    /// Ends early with: a cancel (before the switch only), a shutdown (the wait resumes on the next
    /// start) or `flight.max_wait` (`flight_gate_timeout`; a rollback is never given up).
    pub(super) fn flight_gate(&mut self) -> Result<(), Stop> {
        let Some(gate) = self.flight.as_ref() else {
            return Ok(());
        };
        let poll = gate.poll_interval();
        let max_wait = gate.config().max_wait;
        loop {
            let verdict = self
                .flight
                .as_ref()
                .map_or(Verdict::Go, crate::flight::Gate::check);
            let u = self.held()?;
            let held = u.step_phase();
            match verdict {
                Verdict::Go => {
                    if u.phase == Phase::Waiting {
                        tracing::info!(upgrade_id = %u.id, phase = %held, "flight gate open; going on");
                        self.state.release();
                        self.save()?;
                    }
                    return Ok(());
                }
                Verdict::Settling => {}
                Verdict::Wait(reason, why) => {
                    if u.wait_reason() != Some(reason) {
                        tracing::warn!(upgrade_id = %u.id, phase = %held, reason = %reason,
                            "flight gate: waiting before {held}: {why}");
                        self.state.hold(reason);
                        self.save()?;
                    }
                }
            }
            let u = self.held()?;
            let before_switch = matches!(u.step_phase(), Phase::Downloading | Phase::Staged);
            if self.interrupts.pause.load(SeqCst) {
                return Err(Stop::Paused);
            }
            if before_switch && self.interrupts.cancel.load(SeqCst) {
                return Err(Stop::Upgrade(
                    ErrorCode::Canceled,
                    "canceled while waiting for the vehicle".into(),
                ));
            }
            if let Some(w) = u.wait.as_ref().filter(|_| u.phase == Phase::Waiting)
                && now_unix().saturating_sub(w.since) >= max_wait.as_secs()
                && u.step_phase() != Phase::RollingBack
            {
                let message = format!(
                    "the vehicle did not allow the upgrade within flight.max_wait {} (last reason: {})",
                    humantime::format_duration(max_wait),
                    w.reason
                );
                return self.flight_gate_timeout(message);
            }
            std::thread::sleep(poll.min(Duration::from_secs(1)));
        }
    }

    /// `flight.max_wait` ran out. Before the switch nothing was touched: the upgrade ends. Once
    /// the switch began, the old slot must come back: in reboot mode the bootloader's trial is
    /// withdrawn as a rollback withdraws it, the target marked bad and out of the boot order (no
    /// reboot happened, and the old slot runs; only making it primary would leave the trial one
    /// failed boot of the old slot away); in command mode the apply may have run before a
    /// restart, so the upgrade rolls back (which waits for the vehicle too, without a limit).
    fn flight_gate_timeout(&mut self, message: String) -> Result<(), Stop> {
        let u = self.held()?.clone();
        match (u.step_phase(), &self.activation) {
            (Phase::Downloading | Phase::Staged, _) => {
                Err(Stop::Upgrade(ErrorCode::FlightGateTimeout, message))
            }
            (_, Activation::Reboot { boot, .. }) => {
                boot.mark_bad(u.target).map_err(ActivationError::from)?;
                Err(Stop::Upgrade(ErrorCode::FlightGateTimeout, message))
            }
            (Phase::Switching, Activation::Command { .. }) => {
                // The apply runs in Testing: nothing reached the vehicle; `end` puts the pointer back.
                Err(Stop::Upgrade(ErrorCode::FlightGateTimeout, message))
            }
            (_, Activation::Command { .. }) => {
                self.state.release();
                self.begin_roll_back(ErrorCode::FlightGateTimeout, message)?;
                // Back in `drive`, which runs the rollback (gated itself).
                Err(Stop::Again)
            }
        }
    }
}
