//! When a cancel the node reconciler sent is acknowledged by the drone, and when to send it
//! again, as a pure function over what the drone reports.
//!
//! The broker's PUBACK says only that the broker has the cancel: it is lost with a broker that
//! restarts before it saved it, or with a drone's session the broker dropped, and a drone that
//! was offline may still get the upgrade itself (queued in its session, or in its own queue of
//! accepted commands). So a cancel stays in `status.firmwareSync.pendingCancels` until the drone
//! shows it is past the upgrade, and is sent again with a back-off until then:
//!
//! - it reports the upgrade ended: `Canceled` (the cancel arrived), or any other result (it ran
//!   to its real end before the cancel came, or the cancel came too late to stop it);
//! - it reports a command the hub sent **after** the cancel (in flight or ended): one drone's
//!   commands travel one topic in order, so it has handled the upgrade and the cancel before.
//!
//! A drone that reports the upgrade in flight has not acknowledged: the cancel still stops a
//! download or a wait at the drone's gate, so it goes out again when due. An idle drone that
//! names neither is no acknowledgement either: the upgrade may still be on its way to it. The
//! agent answers a cancel of an upgrade it never saw by reporting it canceled (and never
//! installs it when it arrives later), so every drone answers in the end.

use crate::api::flightnode::PendingCancel;
use std::time::Duration;

/// What the drone reports that bears on a cancel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported<'a> {
    /// `status.currentUpgrade.id`.
    pub current_upgrade: Option<&'a str>,
    /// `status.lastUpgrade`: (id, result CamelCase).
    pub last_upgrade: Option<(&'a str, &'a str)>,
    /// The upgrade id the hub published after the cancel (the current record's), if any.
    pub sent_after: Option<&'a str>,
}

/// Back-off of the resends: `first` after the first send, doubling per send, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    /// Wait after the first send.
    pub first: Duration,
    /// Longest wait.
    pub max: Duration,
}

/// What to do about one pending cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The drone is past the upgrade: forget the cancel. Says how (for the log).
    Acknowledged(String),
    /// Send it again now.
    Resend,
    /// Not acknowledged, not due: look again after this long.
    Wait(Duration),
}

fn unix(t: &str) -> i64 {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_or(0, time::OffsetDateTime::unix_timestamp)
}

/// What to do about `cancel` at `now` (unix seconds), given what the drone reports.
pub fn step(cancel: &PendingCancel, reported: Reported<'_>, resend: Resend, now: i64) -> Step {
    let id = cancel.upgrade_id.as_str();
    if let Some((_, result)) = reported.last_upgrade.filter(|(last, _)| *last == id) {
        return Step::Acknowledged(if result == "Canceled" {
            format!("the drone reports {id} canceled")
        } else {
            format!("{id} ran to its end ({result}) before the cancel could stop it")
        });
    }
    if reported.current_upgrade != Some(id)
        && let Some(later) = reported.sent_after.filter(|later| *later != id)
        && (reported.current_upgrade == Some(later) || reported.last_upgrade.is_some_and(|(l, _)| l == later))
    {
        return Step::Acknowledged(format!(
            "the drone took up {later}, sent after the cancel of {id}"
        ));
    }
    let wait = flightnode_proto::backoff::exponential(resend.first, cancel.sends.max(1), resend.max);
    let due = unix(&cancel.last_sent_time).saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
    if now >= due {
        Step::Resend
    } else {
        Step::Wait(Duration::from_secs(u64::try_from(due - now).unwrap_or(1).max(1)))
    }
}

/// A record's pending cancels after one look at the drone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// What the record keeps: the ones not acknowledged (those due marked sent now), and the
    /// new one.
    pub pending: Vec<PendingCancel>,
    /// Upgrade ids to send a cancel for now, before the record is stored.
    pub send: Vec<String>,
    /// The ones the drone acknowledged, and how.
    pub acknowledged: Vec<(String, String)>,
    /// Look again after this long at the latest.
    pub requeue: Option<Duration>,
}

/// Carries `stored` pending cancels over one look at the drone ([`step`] each), and adds a
/// cancel of `new` (an upgrade the spec moved away from), sent now.
pub fn carry(
    stored: &[PendingCancel],
    new: Option<&str>,
    reported: Reported<'_>,
    resend: Resend,
    now: i64,
    now_rfc3339: &str,
) -> Carried {
    let mut out = Carried::default();
    let mut look_again = |d: Duration| out.requeue = Some(out.requeue.map_or(d, |r| r.min(d)));
    let mut sent = Vec::new();
    for p in stored {
        match step(p, reported, resend, now) {
            Step::Acknowledged(how) => out.acknowledged.push((p.upgrade_id.clone(), how)),
            Step::Resend => {
                sent.push(p.upgrade_id.clone());
                out.pending.push(PendingCancel {
                    last_sent_time: now_rfc3339.to_owned(),
                    sends: p.sends.saturating_add(1),
                    ..p.clone()
                });
                look_again(resend.first);
            }
            Step::Wait(d) => {
                out.pending.push(p.clone());
                look_again(d);
            }
        }
    }
    if let Some(id) = new.filter(|id| !out.pending.iter().any(|p| p.upgrade_id == *id)) {
        sent.push(id.to_owned());
        out.pending.push(PendingCancel {
            upgrade_id: id.to_owned(),
            first_sent_time: now_rfc3339.to_owned(),
            last_sent_time: now_rfc3339.to_owned(),
            sends: 1,
        });
        look_again(resend.first);
    }
    out.send = sent;
    out
}

/// How a record's message names the cancels still waiting for the drone.
const UNACKED: &str = "; cancel of ";

/// Ends `message` with the cancels in `pending` the drone has not acknowledged (all but `fresh`,
/// the one sent just now, which the message names already), replacing what an earlier pass
/// wrote there.
pub fn note(message: &mut String, pending: &[PendingCancel], fresh: Option<&str>) {
    if let Some(at) = message.find(UNACKED) {
        message.truncate(at);
    }
    let unacked: Vec<&str> = pending
        .iter()
        .map(|p| p.upgrade_id.as_str())
        .filter(|id| fresh != Some(*id))
        .collect();
    if !unacked.is_empty() {
        message.push_str(UNACKED);
        message.push_str(&unacked.join(", "));
        message.push_str(" not acknowledged by the drone yet");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;

    fn at(secs: i64) -> String {
        crate::decide::status::unix_rfc3339(secs).unwrap_or_default()
    }

    fn pending(sends: u32, last_sent: i64) -> PendingCancel {
        PendingCancel {
            upgrade_id: "x".into(),
            first_sent_time: at(T0),
            last_sent_time: at(last_sent),
            sends,
        }
    }

    const RESEND: Resend = Resend {
        first: Duration::from_secs(30),
        max: Duration::from_mins(10),
    };

    #[test]
    fn acknowledged_only_when_the_drone_shows_it_is_past_the_upgrade() {
        let r = |current, last, sent_after| Reported {
            current_upgrade: current,
            last_upgrade: last,
            sent_after,
        };
        let acked = |s: &Step| matches!(s, Step::Acknowledged(_));
        // (what the drone reports, acknowledged?)
        let table: &[(Reported<'_>, bool, &str)] = &[
            (r(None, Some(("x", "Canceled")), None), true, "canceled"),
            (r(None, Some(("x", "Committed")), None), true, "ran to its end"),
            (
                r(None, Some(("x", "RolledBack")), Some("y")),
                true,
                "ran to its end",
            ),
            (
                r(Some("x"), None, None),
                false,
                "in flight: the cancel may still stop it",
            ),
            (
                r(Some("x"), Some(("y", "Rejected")), Some("y")),
                false,
                "busy with x, y refused",
            ),
            (
                r(None, None, None),
                false,
                "idle, names neither: x may be on its way",
            ),
            (
                r(None, Some(("older", "Committed")), None),
                false,
                "an older upgrade",
            ),
            (
                r(None, Some(("older", "Committed")), Some("y")),
                false,
                "y not taken up yet",
            ),
            (r(Some("y"), None, Some("y")), true, "took up the later command"),
            (
                r(None, Some(("y", "Committed")), Some("y")),
                true,
                "ended the later command",
            ),
            (
                r(None, Some(("y", "Rejected")), Some("y")),
                true,
                "refused the later one: past x",
            ),
            (r(Some("z"), None, Some("y")), false, "some other upgrade"),
        ];
        for (reported, want, why) in table {
            let got = step(&pending(1, T0), *reported, RESEND, T0 + 1);
            assert_eq!(acked(&got), *want, "{why}: {reported:?} -> {got:?}");
        }
        let Step::Acknowledged(how) = step(
            &pending(1, T0),
            r(None, Some(("x", "Canceled")), None),
            RESEND,
            T0,
        ) else {
            panic!("not acknowledged");
        };
        assert!(how.contains("canceled"), "{how}");
    }

    #[test]
    fn resent_after_a_doubling_back_off_up_to_the_cap() {
        let idle = Reported::default();
        // (sends so far, seconds since the last send, step)
        let table = [
            (1, 0, Step::Wait(Duration::from_secs(30))),
            (1, 29, Step::Wait(Duration::from_secs(1))),
            (1, 30, Step::Resend),
            (2, 59, Step::Wait(Duration::from_secs(1))),
            (2, 60, Step::Resend),
            (3, 119, Step::Wait(Duration::from_secs(1))),
            (3, 120, Step::Resend),
            (10, 599, Step::Wait(Duration::from_secs(1))),
            (10, 600, Step::Resend),
            (40, 600, Step::Resend),
        ];
        for (sends, since, want) in table {
            let got = step(&pending(sends, T0), idle, RESEND, T0 + since);
            assert_eq!(got, want, "sends {sends}, {since} s after the last");
        }
        // In flight on the drone: not acknowledged, resent on the same schedule.
        let busy = Reported {
            current_upgrade: Some("x"),
            ..Reported::default()
        };
        assert_eq!(step(&pending(1, T0), busy, RESEND, T0 + 30), Step::Resend);
        // A record without a readable time is due at once.
        let mut broken = pending(1, T0);
        broken.last_sent_time = "yesterday".into();
        assert_eq!(step(&broken, idle, RESEND, T0), Step::Resend);
    }
}
