//! What the daemon does with a command, whichever way it came (MQTT or the local socket):
//! one `match (command, what is in flight)`.
//!
//! - the upgrade in flight, again → republish its current state (never restart);
//! - an upgrade that already ended → republish its final state (from the history);
//! - a new upgrade while another is in flight (or accepted and waiting to start) → `busy`;
//! - every refusal (busy, a malformed payload, an install the engine refuses before it starts)
//!   is reported on the status topic and, with a hub, as an outbox event against the upgrade id
//!   the command named, so a rollout learns it from the drone instead of from its timeout;
//! - an upgrade while the engine is only finishing other work (start-up recovery, a mark-good)
//!   → accepted: it starts when that work is done. An MQTT command is kept in sled ([`Queued`])
//!   until its install has ended, so a restart before it started does not lose it (the broker
//!   has its PUBACK already); the next start takes it up again, and its upgrade id keeps a
//!   second delivery from installing twice;
//! - cancel of an upgrade still waiting to start → it never starts and ends `canceled`; one the
//!   engine has taken up but not yet saved → it stops before it writes and ends `canceled`;
//! - cancel of an upgrade this drone has not seen → it ends `canceled` without running, so the
//!   upgrade never installs if it arrives later; either of these is reported to the hub as the
//!   heartbeat's last upgrade, which is how the hub knows its cancel arrived;
//! - cancel before the image is written → the download stops and ends `canceled`; cancel later →
//!   the upgrade finishes or rolls back and reports what really happened.

use super::queued::Queued;
use super::reports::{self, Sequencer};
use super::worker::{Job, Worker};
use crate::engine::{Outcome, Request};
use crate::outbox::{Event, Outbox};
use crate::state::DeviceState;
use crate::store::Durable;
use flightnode_proto::error::Chain;
use flightnode_proto::mqtt::{Command, StatusError, StatusMessage};
use flightnode_proto::status::LastUpgrade;
use flightnode_proto::{ErrorCode, Phase};
use tokio::sync::oneshot;

/// Upgrades remembered for redelivery after they ended.
const HISTORY_CAP: usize = 256;

/// Final results by upgrade id, so a redelivered command republishes instead of reinstalling.
pub struct History {
    tree: sled::Tree,
    store: Durable,
}

impl History {
    /// Opens the history in `store`.
    pub fn open(store: &Durable) -> Result<Self, sled::Error> {
        Ok(Self {
            tree: store.db().open_tree("history")?,
            store: store.clone(),
        })
    }

    /// The final record of `upgrade_id`. One that cannot be read or decoded is logged: the
    /// upgrade then counts as unknown, so a redelivered command would run again.
    pub fn get(&self, upgrade_id: &str) -> Option<LastUpgrade> {
        let raw = match self.tree.get(upgrade_id.as_bytes()) {
            Ok(raw) => raw?,
            Err(e) => {
                tracing::warn!(upgrade_id, error = %e, "upgrade history: the record cannot be read");
                return None;
            }
        };
        crate::state::decode_last_upgrade(&raw)
            .map_err(
                |e| tracing::warn!(upgrade_id, error = %e, "upgrade history: the record does not decode"),
            )
            .ok()
    }

    /// Records how an upgrade ended, dropping the oldest beyond the cap, durably: a redelivery
    /// after a power cut must not install it again.
    pub fn record(&self, last: &LastUpgrade) {
        let Ok(bytes) = serde_json::to_vec(last) else {
            return;
        };
        if let Err(e) = self.tree.insert(last.upgrade_id.as_bytes(), bytes) {
            tracing::warn!(upgrade_id = %last.upgrade_id, "cannot record upgrade history: {e}");
        }
        while self.tree.len() > HISTORY_CAP {
            let oldest = self
                .tree
                .iter()
                .filter_map(Result::ok)
                .filter_map(|(k, v)| {
                    crate::state::decode_last_upgrade(&v)
                        .ok()
                        .map(|l| (l.finished, k))
                })
                .min_by_key(|(finished, _)| *finished);
            match oldest {
                Some((_, key)) => {
                    let _ = self.tree.remove(key);
                }
                None => break,
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::warn!(upgrade_id = %last.upgrade_id, error = %Chain(&e), "cannot make the upgrade history durable");
        }
    }
}

/// The daemon's command handling.
pub struct Dispatcher {
    /// This drone's id (the MQTT topic and every report name it).
    pub device_id: String,
    /// Upgrade ids already answered, so a redelivered command is not run twice.
    pub history: History,
    /// Numbers the reports this agent publishes.
    pub seq: Sequencer,
    /// MQTT commands accepted but not ended.
    pub queued: Queued,
    /// Hub-bound events (refusals go there too), when a hub is configured.
    pub outbox: Option<Outbox>,
}

/// What a command led to.
pub enum Reply {
    /// Publish this report (republish, busy, malformed).
    Report(StatusMessage),
    /// An install was queued; reports follow from its transitions.
    Started(Option<oneshot::Receiver<Result<Outcome, String>>>),
    /// Nothing to publish.
    Nothing,
}

impl Dispatcher {
    fn report_for(
        &mut self,
        state: &DeviceState,
        worker: &Worker,
        upgrade_id: &str,
    ) -> Option<StatusMessage> {
        let seq = self.seq.take();
        if state.upgrade.as_ref().is_some_and(|u| u.id == upgrade_id) {
            return Some(reports::current(
                &self.device_id,
                seq,
                state,
                *worker.progress.borrow(),
            ));
        }
        if let Some(last) = state.last.as_ref().filter(|l| l.upgrade_id == upgrade_id) {
            return Some(reports::finished(&self.device_id, seq, state, last));
        }
        self.history
            .get(upgrade_id)
            .map(|last| reports::finished(&self.device_id, seq, state, &last))
    }

    /// A report for a payload that is not a command; `upgrade_id` is the one it still names.
    pub fn malformed(
        &mut self,
        worker: &Worker,
        reason: String,
        upgrade_id: Option<String>,
    ) -> StatusMessage {
        let state = worker.state.borrow().clone();
        self.refuse(&state, upgrade_id, StatusError::malformed(reason))
    }

    /// Reports a refused command: the status report to publish, and (with a hub, when the
    /// command named an upgrade) a durable outbox event with the same code.
    pub fn refuse(
        &mut self,
        state: &DeviceState,
        upgrade_id: Option<String>,
        error: StatusError,
    ) -> StatusMessage {
        tracing::warn!(device_id = %self.device_id, upgrade_id = upgrade_id.as_deref().unwrap_or(""),
            code = %error.code, "command refused: {}", error.message);
        if let (Some(outbox), Some(id)) = (&self.outbox, &upgrade_id)
            && let Err(e) = outbox.push_refusal(&Event::refused(id, &error.code, &error.message))
        {
            tracing::error!(upgrade_id = %id, "cannot record the refusal for the hub: {}", Chain(&e));
        }
        reports::refused(&self.device_id, self.seq.take(), state, upgrade_id, error)
    }

    /// At start: takes up the MQTT commands accepted before a restart whose install never ended.
    /// Returns the reports to publish (for commands whose upgrade is known by now).
    pub fn replay_queued(&mut self, worker: &Worker) -> Vec<StatusMessage> {
        let mut reports = Vec::new();
        for cmd in self.queued.all(&self.device_id) {
            let id = cmd.upgrade_id.clone();
            tracing::info!(upgrade_id = %id, "taking up a command accepted before the restart");
            match self.handle(worker, Command::Upgrade(cmd), false) {
                Reply::Started(_) => {}
                Reply::Report(report) => {
                    // Known (ran, or runs) or refused: either way the command is answered.
                    self.queued.remove(&id);
                    reports.push(report);
                }
                Reply::Nothing => self.queued.remove(&id),
            }
        }
        reports
    }

    /// Handles one command. `want_reply` asks for the install outcome (local socket).
    pub fn handle(&mut self, worker: &Worker, command: Command, want_reply: bool) -> Reply {
        let state = worker.state.borrow().clone();
        let id = command.upgrade_id().to_owned();
        // An upgrade whose download failed after verification is resumed when sent again,
        // not answered with its old report.
        let resumable =
            matches!(command, Command::Upgrade(_)) && state.resumable.as_ref().is_some_and(|u| u.id == id);
        let known = if resumable {
            None
        } else {
            self.report_for(&state, worker, &id)
        };
        match (command, known, &state.upgrade) {
            (Command::Upgrade(_), Some(report), _) => {
                tracing::info!(upgrade_id = %id, "upgrade delivered again; republishing its state");
                Reply::Report(report)
            }
            (Command::Upgrade(_), None, _) if worker.install().as_deref() == Some(id.as_str()) => {
                tracing::info!(upgrade_id = %id, "upgrade delivered again before it started; it runs once");
                Reply::Nothing
            }
            (Command::Upgrade(_), None, _) if state.upgrade.is_some() || worker.install().is_some() => {
                let current = match (&state.upgrade, worker.install()) {
                    (Some(u), _) => format!("upgrade {} ({})", u.id, u.phase),
                    (None, Some(queued)) => format!("upgrade {queued} (accepted, about to start)"),
                    (None, None) => "another upgrade".to_owned(),
                };
                let message = format!("{current} is in flight; send {id} again when it has ended");
                Reply::Report(self.refuse(&state, Some(id), StatusError::code(ErrorCode::Busy, message)))
            }
            (Command::Upgrade(cmd), None, _) => {
                let (tx, rx) = if want_reply {
                    let (t, r) = oneshot::channel();
                    (Some(t), Some(r))
                } else {
                    (None, None)
                };
                if !want_reply {
                    self.queued.put(&self.device_id, &cmd);
                    crate::failpoint::hit("command_queued");
                }
                let req = Request {
                    id: cmd.upgrade_id,
                    source: cmd.url,
                    allow_downgrade: cmd.allow_downgrade,
                };
                if worker.is_busy() {
                    tracing::info!(upgrade_id = %req.id, source = %req.source,
                        "upgrade accepted; it starts once the engine has finished its current work (start-up recovery)");
                } else {
                    tracing::info!(upgrade_id = %req.id, source = %req.source, "upgrade accepted");
                }
                if worker.submit(Job::Install { req, reply: tx }) {
                    Reply::Started(rx)
                } else {
                    Reply::Nothing
                }
            }
            (Command::Cancel { .. }, _, Some(u))
                if u.id == id
                    && (u.phase == Phase::Downloading
                        || (u.phase == Phase::Waiting
                            && matches!(u.step_phase(), Phase::Downloading | Phase::Staged))) =>
            {
                tracing::info!(upgrade_id = %id, phase = %u.phase, "cancel: stopping the download or the wait");
                worker.interrupts.cancel(&id);
                Reply::Nothing
            }
            (Command::Cancel { .. }, None, None) if worker.cancel_waiting(&id) => {
                tracing::info!(upgrade_id = %id, "cancel: the upgrade had not started; it never will");
                self.canceled_before_start(
                    &state,
                    &id,
                    format!("upgrade {id} was canceled before it started"),
                )
            }
            (Command::Cancel { .. }, None, None) if worker.install().as_deref() == Some(id.as_str()) => {
                // The engine took the command up but has not saved its first phase yet: the
                // cancel waits for it in the interrupts, and the download stops before it writes.
                tracing::info!(upgrade_id = %id, "cancel: the upgrade is starting; it stops before it writes");
                worker.interrupts.cancel(&id);
                Reply::Nothing
            }
            (Command::Cancel { .. }, Some(report), _) => {
                tracing::info!(upgrade_id = %id, phase = %state.phase(), "cancel too late or after the end; it runs to its real end");
                Reply::Report(report)
            }
            (Command::Cancel { .. }, None, _) => {
                // The cancel overtook its upgrade (the upgrade is still in a broker's queue, or
                // comes again from a hub that re-publishes it), or the upgrade never reaches
                // this drone. Either way it must not install when it arrives, and the hub keeps
                // sending the cancel until it hears the upgrade is over.
                tracing::info!(upgrade_id = %id, "cancel of an upgrade this drone has not seen; it will not install if it arrives");
                self.canceled_before_start(
                    &state,
                    &id,
                    format!("upgrade {id} was canceled before it arrived"),
                )
            }
        }
    }

    /// Ends `id` as canceled without it having run: in the history (a later delivery of the
    /// command republishes this instead of installing) and, with a hub, as the heartbeat's last
    /// upgrade (the hub's acknowledgement of its cancel).
    fn canceled_before_start(&mut self, state: &DeviceState, id: &str, message: String) -> Reply {
        if let Some(outbox) = &self.outbox
            && let Err(e) = outbox.push_refusal(&Event::canceled(id, &message))
        {
            tracing::error!(upgrade_id = %id, "cannot record the cancel for the hub: {}", Chain(&e));
        }
        let last = LastUpgrade {
            upgrade_id: id.to_owned(),
            version: None,
            result: flightnode_proto::UpgradeResult::Canceled,
            error: Some(flightnode_proto::status::ErrorReport {
                code: ErrorCode::Canceled,
                message,
            }),
            finished: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        self.history.record(&last);
        Reply::Report(reports::finished(&self.device_id, self.seq.take(), state, &last))
    }
}
