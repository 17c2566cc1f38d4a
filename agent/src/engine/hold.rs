//! The holds beside the flight gate: the download's link policy (`metered_link`,
//! `download_window`) and `install.require_charging` (`not_charging`).
//!
//! Each holds the upgrade in phase `waiting` with its reason, persisted like the flight gate's
//! (a power cut while waiting comes back waiting, and the reason reaches the status report, the
//! heartbeat and the FlightNode). None of them has a time limit: a drone on LTE may wait days
//! for its Wi-Fi, and the operator sees why and can cancel. `flight.max_wait` counts only the
//! flight gate's own waits (see `DeviceState::hold`).

use super::{Engine, Stop};
use crate::netpolicy::LinkVerdict;
use flightnode_proto::{ErrorCode, Phase, WaitReason};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

/// How often a held upgrade asks again.
const POLL: Duration = Duration::from_secs(1);

impl Engine {
    /// Returns once the link policy lets the download of `source` run; until then the upgrade
    /// waits. Without a policy it returns at once.
    pub(super) fn link_gate(&mut self, source: &str) -> Result<(), Stop> {
        self.fetcher.clear_held();
        if self.fetcher.link_policy().is_none() {
            return Ok(());
        }
        // Logged once per interface, with its name as a field, beside the hold's own log.
        let mut interface = None;
        self.hold_until(
            |this| match this.fetcher.link_policy().map(|l| l.check_source(source)) {
                Some(LinkVerdict::Hold(reason, why, on)) => {
                    if on != interface {
                        if let (Some(on), Some(u)) = (&on, this.state.upgrade.as_ref()) {
                            tracing::info!(upgrade_id = %u.id, interface = %on, reason = %reason,
                                "the download's route goes over a metered interface");
                        }
                        interface = on;
                    }
                    Err((reason, why))
                }
                Some(LinkVerdict::Go { .. }) | None => Ok(()),
            },
        )
    }

    /// `install.require_charging`: returns once the vehicle charges; until then the upgrade
    /// waits before its switch with reason `not_charging`.
    pub(super) fn power_gate(&mut self) -> Result<(), Stop> {
        if !self.cfg.install.require_charging {
            return Ok(());
        }
        self.hold_until(|this| this.charging().map_err(|why| (WaitReason::NotCharging, why)))
    }

    /// Whether the vehicle charges: BATTERY_STATUS `charge_state` CHARGING, else the charging
    /// command's exit 0. Nothing heard counts as not charging: switching on a battery that may be
    /// running down is what the setting exists to prevent.
    fn charging(&self) -> Result<(), String> {
        let mavlink = self.flight.as_ref().and_then(crate::flight::Gate::monitor);
        let heard = mavlink.map(|m| m.state().charging);
        if heard == Some(Some(true)) {
            return Ok(());
        }
        let said = match heard {
            Some(Some(_)) => "the vehicle reports BATTERY_STATUS charge_state other than charging",
            Some(None) => "no BATTERY_STATUS charge_state from the vehicle lately",
            None => "no MAVLink link to read the charge state from",
        };
        let install = &self.cfg.install;
        let Some(command) = install.charging_command.as_deref() else {
            return Err(said.to_owned());
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match crate::child::run(&mut cmd, None, install.charging_command_timeout) {
            Ok(done) if done.status.success() => Ok(()),
            Ok(done) => Err(format!(
                "{said}, and charging command `{command}` says not charging ({})",
                done.status
            )),
            Err(e) => Err(format!("{said}, and charging command `{command}` {e}")),
        }
    }

    /// The wait loop of the holds: `check` says go or why not; a changed reason is logged and
    /// persisted. Ends early with a cancel (before the switch) or a pause (shutdown; the wait
    /// resumes on the next start).
    fn hold_until(
        &mut self,
        mut check: impl FnMut(&Self) -> Result<(), (WaitReason, String)>,
    ) -> Result<(), Stop> {
        let mut first = true;
        loop {
            let verdict = check(self);
            let u = self.upgrade()?;
            let held = u.step_phase();
            match verdict {
                Ok(()) => {
                    if u.phase == Phase::Waiting {
                        tracing::info!(upgrade_id = %u.id, phase = %held, reason = ?u.wait_reason(),
                            "hold over; going on");
                        self.state.release();
                        self.save()?;
                    }
                    return Ok(());
                }
                Err((reason, why)) => {
                    if u.wait_reason() != Some(reason) {
                        tracing::warn!(upgrade_id = %u.id, phase = %held, reason = %reason,
                            "waiting before {held}: {why}");
                        self.state.hold(reason);
                        self.save()?;
                    } else if first {
                        // A restart (or a power cut) found it held: say so once.
                        tracing::info!(upgrade_id = %u.id, phase = %held, reason = %reason,
                            "still waiting before {held}: {why}");
                    }
                }
            }
            first = false;
            if self.interrupts.pause.load(SeqCst) {
                return Err(Stop::Paused);
            }
            if matches!(held, Phase::Downloading | Phase::Staged) && self.interrupts.cancel.load(SeqCst) {
                return Err(Stop::Upgrade(
                    ErrorCode::Canceled,
                    "canceled while waiting".into(),
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}
