//! The node reconciler's decision for one `FlightNode`: `spec.firmware` against what the drone
//! reports, as a pure function. No clock, no I/O: the caller passes the time, writes the returned
//! [`FirmwareSync`] record, and only then publishes the returned command.
//!
//! Exactly-once install: the upgrade id is derived from the object's uid, its generation and the
//! attempt number ([`upgrade_id`]). The record with that id is persisted before the command goes
//! out, so a retry of the same attempt, a hub restart or a new leader re-publishes the **same**
//! id, which the agent treats as a redelivery. A new attempt (a new id) is only made after the
//! drone reported the previous attempt's end, and only for transient failures (`Failed`,
//! `Canceled`, and a command `Rejected` as `busy`), with exponential back-off and a bound per
//! generation. Every other `Rejected` (bad signature, incompatible hardware, downgrade…) and
//! `RolledBack` (the image failed its health check on this drone) are never retried: the same
//! bundle would fail the same way.
//!
//! A new generation replaces the record. When the old record's command was published and the
//! drone has neither started nor ended it, the decision also names it in [`Decision::cancel`]:
//! it goes out before the new record is stored (so a failed publish leaves the record, and the
//! cancel is sent again next pass), together with the new command when the gates allow one.
//! The new record keeps the cancel in `pendingCancels` until the drone acknowledges it, and it
//! is sent again after a back-off until then ([`super::cancel`]): a broker's PUBACK is no
//! delivery.

use super::cancel;
use crate::api::flightnode::{FirmwareSync, FirmwareTarget, FlightNode, condition};
use sha2::Digest;
use std::fmt::Write as _;
use std::time::Duration;

/// Reasons of `status.firmwareSync` and of the `FirmwareSynced` condition.
pub mod reason {
    /// Wanted, nothing published yet.
    pub const PENDING: &str = "Pending";
    /// A gate holds the upgrade back (offline, busy, flight state, no bundle URL).
    pub const WAITING: &str = "Waiting";
    /// Published; the drone is (or is about to be) working on it.
    pub const IN_PROGRESS: &str = "InProgress";
    /// The previous attempt failed; the next one waits for its back-off.
    pub const RETRYING: &str = "Retrying";
    /// The committed version is the wanted one.
    pub const SYNCED: &str = "Synced";
    /// Given up for this generation (rejected, rolled back, or attempts exhausted).
    pub const FAILED: &str = "Failed";
    /// No firmware wanted; a cancel waits for the drone's acknowledgement.
    pub const CANCELING: &str = "Canceling";
}

/// Retry policy of the node reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per generation (1 = never retry).
    pub max_attempts: u32,
    /// Back-off after the first failed attempt; doubles per attempt. Unacknowledged cancels are
    /// sent again on the same schedule.
    pub backoff: Duration,
    /// Back-off cap.
    pub backoff_max: Duration,
    /// Re-publish the same upgrade id when the drone has not picked it up after this long
    /// (the command may have been lost with a broker restart).
    pub redeliver_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_attempts: 3,
            backoff: Duration::from_secs(30),
            backoff_max: Duration::from_mins(10),
            redeliver_after: Duration::from_mins(1),
        }
    }
}

/// What the flight state allows, from `status.observedState` when the drone reports one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlightGate {
    /// States an upgrade may start in.
    pub allowed: Vec<String>,
    /// Whether a drone without a known flight state may start (the agent gates again itself).
    pub allow_unknown: bool,
    /// Minimum battery, checked when the drone reports one (the agent gates again itself).
    pub min_battery_percent: Option<u32>,
}

impl FlightGate {
    /// A rollout's gates as the node reconciler applies them.
    pub fn of(gates: &crate::api::rollout::Gates) -> FlightGate {
        FlightGate {
            allowed: gates.flight_states.clone(),
            allow_unknown: gates.allow_unknown_flight_state,
            min_battery_percent: gates.min_battery_percent,
        }
    }

    /// The gate for `node`: the gates of the rollout that dispatched it (from its
    /// [`ANNOTATION_GATES`](crate::api::rollout::ANNOTATION_GATES)), else `default`. A rollout's
    /// battery and flight-state gates thus hold at publish time too, not only at dispatch.
    pub fn for_node(node: &FlightNode, default: &FlightGate) -> FlightGate {
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::api::rollout::ANNOTATION_GATES))
            .and_then(|json| serde_json::from_str::<crate::api::rollout::Gates>(json).ok())
            .map_or_else(|| default.clone(), |g| FlightGate::of(&g))
    }
}

impl Default for FlightGate {
    fn default() -> Self {
        FlightGate {
            allowed: vec!["disarmed".to_owned()],
            allow_unknown: true,
            min_battery_percent: None,
        }
    }
}

impl FlightGate {
    /// `None` when allowed, else why not.
    pub fn check(&self, observed: Option<&str>) -> Option<String> {
        match observed {
            None | Some("unknown" | "") if self.allow_unknown => None,
            None | Some("unknown" | "") => Some("flight state unknown".to_owned()),
            Some(state) if self.allowed.iter().any(|a| a == state) => None,
            Some(state) => Some(format!("flight state {state}")),
        }
    }

    /// `None` when the reported battery (if any) meets the minimum, else why not.
    pub fn check_battery(&self, battery_percent: Option<i32>) -> Option<String> {
        let (min, battery) = (self.min_battery_percent?, battery_percent?);
        (i64::from(battery) < i64::from(min)).then(|| format!("battery {battery}% below the minimum {min}%"))
    }
}

/// The flight state a drone reports (`status.observedState`, added by the flight gate), read
/// from the serialised status so this compiles with or without that field.
pub fn observed_flight_state(node: &FlightNode) -> Option<String> {
    let status = serde_json::to_value(node.status.as_ref()?).ok()?;
    status.get("observedState")?.as_str().map(str::to_owned)
}

/// The device id commands for `node` go to: `status.deviceId` (what the drone calls itself) when
/// it maps to this object's name, else the object's name. An id that is not a valid Kubernetes
/// name (upper case, `_`…) lives in an object with a derived name
/// ([`crate::api::flightnode::object_name`]); publishing to the object's name would reach nobody.
/// NB: the mapping is checked so that a status copied onto another object cannot redirect that
/// object's commands to a different drone.
pub fn device_id(node: &FlightNode) -> String {
    let name = node.metadata.name.clone().unwrap_or_default();
    match node.status.as_ref().and_then(|s| s.device_id.as_deref()) {
        Some(id) if crate::api::flightnode::object_name(id) == name => id.to_owned(),
        Some(id) => {
            tracing::warn!(device_id = %id, name = %name, "status.deviceId does not map to this object; using the object name");
            name
        }
        None => name,
    }
}

/// Everything [`decide`] looks at, taken from one `FlightNode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// `spec.firmware`.
    pub target: Option<FirmwareTarget>,
    /// `Online` condition is True.
    pub online: bool,
    /// `status.phase` (`Idle` when not upgrading).
    pub phase: String,
    /// `status.firmware.committedVersion`.
    pub committed: Option<String>,
    /// `status.currentUpgrade.id`.
    pub current_upgrade: Option<String>,
    /// `status.lastUpgrade`: (id, result CamelCase, error code).
    pub last_upgrade: Option<(String, String, String)>,
    /// Why the flight gate holds (from [`FlightGate::check`]).
    pub flight_blocked: Option<String>,
    /// `status.firmwareSync`.
    pub sync: Option<FirmwareSync>,
}

impl NodeView {
    /// Reads a `FlightNode`.
    pub fn of(node: &FlightNode, gate: &FlightGate) -> NodeView {
        let status = node.status.clone().unwrap_or_default();
        NodeView {
            uid: node.metadata.uid.clone().unwrap_or_default(),
            generation: node.metadata.generation.unwrap_or(1),
            target: node.spec.firmware.clone(),
            online: status
                .conditions
                .iter()
                .any(|c| c.type_ == condition::ONLINE && c.status == "True"),
            phase: status.phase.clone().unwrap_or_else(|| "Idle".to_owned()),
            committed: status.firmware.as_ref().and_then(|f| f.committed_version.clone()),
            current_upgrade: status.current_upgrade.as_ref().and_then(|u| u.id.clone()),
            last_upgrade: status.last_upgrade.as_ref().and_then(|l| {
                Some((
                    l.id.clone()?,
                    l.result.clone().unwrap_or_default(),
                    l.error_code.clone().unwrap_or_default(),
                ))
            }),
            flight_blocked: gate
                .check(observed_flight_state(node).as_deref())
                .or_else(|| gate.check_battery(status.flight.as_ref().and_then(|f| f.battery_percent))),
            sync: status.firmware_sync,
        }
    }
}

/// What to do after persisting the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send.
    None,
    /// Publish an upgrade command with this id.
    Publish {
        /// Upgrade id.
        upgrade_id: String,
    },
}

/// The decision for one drone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The record to store in `status.firmwareSync` (`None`: no wanted firmware, clear it).
    pub sync: Option<FirmwareSync>,
    /// Upgrades to cancel **before** `sync` is stored: an older generation's upgrade the drone
    /// has not started (the spec moved on; the stored record is the only place naming it), and
    /// cancels of `sync.pendingCancels` due again. The cancel of `X` and a publish of `Y` can
    /// come together; `X` is never the id being published.
    pub cancel: Vec<String>,
    /// Pending cancels the drone acknowledged, and how (dropped from the record).
    pub acknowledged: Vec<(String, String)>,
    /// The command to publish once `sync` is stored.
    pub action: Action,
    /// Look again after this long (back-off, redelivery); `None`: on the next change.
    pub requeue: Option<Duration>,
}

/// The upgrade id of one attempt at one generation of one object: the same inputs always give
/// the same id, on every replica, across restarts.
pub fn upgrade_id(uid: &str, generation: i64, attempt: u32) -> String {
    let digest = sha2::Sha256::digest(format!("{uid}/{generation}").as_bytes());
    format!("fn-{}-g{generation}-a{attempt}", &hex::encode(digest)[..12])
}

fn backoff(policy: &Policy, attempts: u32) -> Duration {
    flightnode_proto::backoff::exponential(policy.backoff, attempts, policy.backoff_max)
}

fn parse_time(t: Option<&str>) -> i64 {
    t.and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        .map_or(0, time::OffsetDateTime::unix_timestamp)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The upgrade of an older generation's record that was published and that the drone has
/// neither reported in flight nor ended: it may still be waiting on the drone (queued behind
/// other work) or in the broker, and would install firmware the spec no longer asks for.
/// Records that ended (`Retrying`, `Failed`, `Synced`) or never published have nothing to cancel.
fn stale_upgrade(view: &NodeView) -> Option<String> {
    view.sync
        .as_ref()
        .filter(|s| s.observed_generation != view.generation && s.reason == reason::IN_PROGRESS)
        .and_then(|s| s.upgrade_id.clone())
        .filter(|id| {
            view.current_upgrade.as_deref() != Some(id.as_str())
                && view.last_upgrade.as_ref().map(|l| l.0.as_str()) != Some(id.as_str())
        })
}

fn cancels(
    view: &NodeView,
    stale: Option<&str>,
    sent_after: Option<&str>,
    policy: &Policy,
    now: i64,
    now_rfc3339: &str,
) -> cancel::Carried {
    let reported = cancel::Reported {
        current_upgrade: view.current_upgrade.as_deref(),
        last_upgrade: view.last_upgrade.as_ref().map(|l| (l.0.as_str(), l.1.as_str())),
        sent_after,
    };
    let resend = cancel::Resend {
        first: policy.backoff,
        max: policy.backoff_max,
    };
    let stored = view
        .sync
        .as_ref()
        .map_or(&[][..], |s| s.pending_cancels.as_slice());
    cancel::carry(stored, stale, reported, resend, now, now_rfc3339)
}

/// Decides for one drone at `now` (unix seconds; `now_rfc3339` is the same instant).
pub fn decide(view: &NodeView, policy: &Policy, now: i64, now_rfc3339: &str) -> Decision {
    let stale = stale_upgrade(view);
    let Some(target) = view.target.clone() else {
        // No firmware wanted: the record stays only for cancels the drone has not acknowledged.
        let c = cancels(view, stale.as_deref(), None, policy, now, now_rfc3339);
        let sync = (!c.pending.is_empty()).then(|| {
            let ids: Vec<&str> = c.pending.iter().map(|p| p.upgrade_id.as_str()).collect();
            FirmwareSync {
                observed_generation: view.generation,
                version: String::new(),
                reason: reason::CANCELING.to_owned(),
                message: format!(
                    "no firmware wanted; cancel of {} sent, waiting for the drone to acknowledge",
                    ids.join(", ")
                ),
                pending_cancels: c.pending,
                ..FirmwareSync::default()
            }
        });
        return Decision {
            sync,
            cancel: c.send,
            acknowledged: c.acknowledged,
            action: Action::None,
            requeue: c.requeue,
        };
    };
    let mut rec = match &view.sync {
        Some(s) if s.observed_generation == view.generation && s.version == target.version => s.clone(),
        _ => FirmwareSync {
            observed_generation: view.generation,
            version: target.version.clone(),
            reason: reason::PENDING.to_owned(),
            ..FirmwareSync::default()
        },
    };
    let c = cancels(
        view,
        stale.as_deref(),
        rec.upgrade_id.as_deref(),
        policy,
        now,
        now_rfc3339,
    );
    // Every decision below is about a record of this generation; when it replaces an older
    // one whose command is still unstarted, that command is canceled with it, and the record
    // says so (the operator sees both ids in the `FirmwareSynced` message), and keeps every
    // cancel the drone has not acknowledged.
    let keep = |mut sync: FirmwareSync, action: Action, requeue: Option<Duration>| {
        if let Some(old) = &stale {
            let _ = write!(sync.message, "; {old} (an earlier spec, not started) canceled");
        }
        cancel::note(&mut sync.message, &c.pending, stale.as_deref());
        sync.pending_cancels.clone_from(&c.pending);
        let requeue = match (requeue, c.requeue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Decision {
            sync: Some(sync),
            cancel: c.send.clone(),
            acknowledged: c.acknowledged.clone(),
            action,
            requeue,
        }
    };
    let set = |rec: &mut FirmwareSync, reason: &str, message: String| {
        reason.clone_into(&mut rec.reason);
        rec.message = message;
    };

    if view.committed.as_deref() == Some(target.version.as_str()) {
        set(
            &mut rec,
            reason::SYNCED,
            format!("committed version is {}", target.version),
        );
        return keep(rec, Action::None, None);
    }
    if rec.reason == reason::FAILED {
        return keep(rec, Action::None, None);
    }
    if let Some(id) = rec.upgrade_id.clone() {
        if let Some((_, result, code)) = view.last_upgrade.as_ref().filter(|l| l.0 == id) {
            // Busy is the one refusal that says nothing about the bundle: the drone was working
            // on another upgrade. A new attempt after the back-off can succeed.
            let busy = result == "Rejected" && code == flightnode_proto::ErrorCode::Busy.as_str();
            match result.as_str() {
                "Committed" | "AlreadyInstalled" => {
                    // It installed, yet the committed version is another one: the bundle does not
                    // carry the version the spec names. Installing it again changes nothing.
                    let have = view.committed.as_deref().unwrap_or("unknown");
                    set(
                        &mut rec,
                        reason::FAILED,
                        format!(
                            "{id} ended {result} but the committed version is {have}, not {}",
                            target.version
                        ),
                    );
                    return keep(rec, Action::None, None);
                }
                "Rejected" | "RolledBack" if !busy => {
                    set(
                        &mut rec,
                        reason::FAILED,
                        format!("{id} ended {result} ({code}); not retried for this generation"),
                    );
                    return keep(rec, Action::None, None);
                }
                _ if rec.attempts >= policy.max_attempts => {
                    let message = format!("{id} ended {result} ({code}); {} attempts made", rec.attempts);
                    set(&mut rec, reason::FAILED, message);
                    return keep(rec, Action::None, None);
                }
                _ => {
                    let next =
                        parse_time(rec.last_attempt_time.as_deref()) + secs(backoff(policy, rec.attempts));
                    if now < next {
                        let message = format!(
                            "{id} ended {result} ({code}); attempt {} after back-off",
                            rec.attempts + 1
                        );
                        set(&mut rec, reason::RETRYING, message);
                        let wait = Duration::from_secs(u64::try_from(next - now).unwrap_or(1));
                        return keep(rec, Action::None, Some(wait));
                    }
                    // Falls through to the gates for the next attempt.
                    rec.upgrade_id = None;
                }
            }
        } else if view.current_upgrade.as_deref() == Some(id.as_str()) {
            set(
                &mut rec,
                reason::IN_PROGRESS,
                format!("{id}: phase {}", view.phase),
            );
            return keep(rec, Action::None, None);
        } else {
            // Published, not picked up yet. Re-publishing the same id is harmless (the agent
            // deduplicates), so a lost command does not stall the drone forever.
            let since = now - parse_time(rec.last_attempt_time.as_deref());
            let idle = view.online && view.phase == "Idle";
            if idle && since >= secs(policy.redeliver_after) {
                rec.last_attempt_time = Some(now_rfc3339.to_owned());
                set(
                    &mut rec,
                    reason::IN_PROGRESS,
                    format!("{id} published again (not picked up)"),
                );
                return keep(
                    rec,
                    Action::Publish { upgrade_id: id },
                    Some(policy.redeliver_after),
                );
            }
            set(
                &mut rec,
                reason::IN_PROGRESS,
                format!("{id} published, waiting for the drone"),
            );
            let left = secs(policy.redeliver_after).saturating_sub(since).max(1);
            return keep(
                rec,
                Action::None,
                Some(Duration::from_secs(u64::try_from(left).unwrap_or(1))),
            );
        }
    }

    // Gates before a new attempt.
    let blocked = if !view.online {
        Some("drone is offline".to_owned())
    } else if view.phase != "Idle" {
        Some(format!(
            "drone is busy (phase {}, upgrade {})",
            view.phase,
            view.current_upgrade.as_deref().unwrap_or("unknown")
        ))
    } else {
        view.flight_blocked.clone()
    };
    if let Some(why) = blocked {
        set(&mut rec, reason::WAITING, why);
        return keep(rec, Action::None, None);
    }
    rec.attempts += 1;
    let id = upgrade_id(&view.uid, view.generation, rec.attempts);
    rec.upgrade_id = Some(id.clone());
    rec.last_attempt_time = Some(now_rfc3339.to_owned());
    let message = format!(
        "attempt {} of {}: {id} published",
        rec.attempts, policy.max_attempts
    );
    set(&mut rec, reason::IN_PROGRESS, message);
    keep(
        rec,
        Action::Publish { upgrade_id: id },
        Some(policy.redeliver_after),
    )
}

#[cfg(test)]
mod tests;
