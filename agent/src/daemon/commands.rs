//! What the daemon does with a command, whichever way it came (MQTT or the local socket):
//! one `match (command, what is in flight)`.
//!
//! - the upgrade in flight, again → republish its current state (never restart);
//! - an upgrade that already ended → republish its final state (from the history);
//! - a new upgrade while another is in flight → `busy`;
//! - cancel before the image is written → the download stops and ends `canceled`; cancel later →
//!   the upgrade finishes or rolls back and reports what really happened.

use super::reports::{self, Sequencer};
use super::worker::{Job, Worker};
use crate::engine::{Outcome, Request};
use crate::state::DeviceState;
use flightnode_proto::mqtt::{Command, StatusError, StatusMessage};
use flightnode_proto::status::LastUpgrade;
use flightnode_proto::{ErrorCode, Phase};
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

/// Upgrades remembered for redelivery after they ended.
const HISTORY_CAP: usize = 256;

/// Final results by upgrade id, so a redelivered command republishes instead of reinstalling.
pub struct History {
    tree: sled::Tree,
}

impl History {
    /// Opens the history in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            tree: db.open_tree("history")?,
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
        serde_json::from_slice(&raw)
            .map_err(
                |e| tracing::warn!(upgrade_id, error = %e, "upgrade history: the record does not decode"),
            )
            .ok()
    }

    /// Records how an upgrade ended, dropping the oldest beyond the cap.
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
                    serde_json::from_slice::<LastUpgrade>(&v)
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

    /// A report for a payload that is not a command.
    pub fn malformed(&mut self, worker: &Worker, reason: String) -> StatusMessage {
        tracing::warn!(device_id = %self.device_id, "malformed command: {reason}");
        let state = worker.state.borrow().clone();
        reports::refused(
            &self.device_id,
            self.seq.take(),
            &state,
            None,
            StatusError::malformed(reason),
        )
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
            (Command::Upgrade(_), None, _) if worker.is_busy() || state.upgrade.is_some() => {
                let current = state.upgrade.as_ref().map_or("a queued job".to_owned(), |u| {
                    format!("upgrade {} ({})", u.id, u.phase)
                });
                let message = format!("{current} is in flight; send {id} again when it has ended");
                tracing::warn!(upgrade_id = %id, "refused: busy");
                let report = reports::refused(
                    &self.device_id,
                    self.seq.take(),
                    &state,
                    Some(id),
                    StatusError::code(ErrorCode::Busy, message),
                );
                Reply::Report(report)
            }
            (Command::Upgrade(cmd), None, _) => {
                let (tx, rx) = if want_reply {
                    let (t, r) = oneshot::channel();
                    (Some(t), Some(r))
                } else {
                    (None, None)
                };
                let req = Request {
                    id: cmd.upgrade_id,
                    source: cmd.url,
                    allow_downgrade: cmd.allow_downgrade,
                };
                tracing::info!(upgrade_id = %req.id, source = %req.source, "upgrade accepted");
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
                worker.interrupts.cancel.store(true, Ordering::SeqCst);
                Reply::Nothing
            }
            (Command::Cancel { .. }, Some(report), _) => {
                tracing::info!(upgrade_id = %id, phase = %state.phase(), "cancel too late or after the end; it runs to its real end");
                Reply::Report(report)
            }
            (Command::Cancel { .. }, None, _) => {
                tracing::warn!(upgrade_id = %id, "cancel of an unknown upgrade ignored");
                Reply::Nothing
            }
        }
    }
}
