//! Table tests of the node reconciler's decision.
use super::*;

const T0: i64 = 1_800_000_000;

fn view() -> NodeView {
    NodeView {
        uid: "uid-1".into(),
        generation: 2,
        target: Some(FirmwareTarget {
            version: "2.0.0".into(),
            url: "http://fw/2.0.0.fnb".into(),
            allow_downgrade: false,
            retry: 0,
        }),
        online: true,
        phase: "Idle".into(),
        committed: Some("1.0.0".into()),
        ..NodeView::default()
    }
}

fn at(secs: i64) -> String {
    crate::decide::status::unix_rfc3339(secs).unwrap_or_default()
}

fn step(v: &mut NodeView, now: i64) -> Decision {
    let d = decide(v, &Policy::default(), now, &at(now));
    v.sync = d.sync.clone();
    d
}

#[test]
fn publishes_once_and_the_same_id_after_a_restart() {
    let mut v = view();
    let d = step(&mut v, T0);
    let id = upgrade_id("uid-1", 2, 1);
    assert_eq!(
        d.action,
        Action::Publish {
            upgrade_id: id.clone()
        }
    );
    // The record is what a restarted leader reads: no new id, no second publish yet.
    let again = step(&mut v, T0 + 5);
    assert_eq!(again.action, Action::None);
    assert_eq!(again.sync.as_ref().unwrap().reason, reason::IN_PROGRESS);
    // Not picked up for the redelivery time: the *same* id again.
    let re = step(&mut v, T0 + 61);
    assert_eq!(
        re.action,
        Action::Publish {
            upgrade_id: id.clone()
        }
    );
    v.current_upgrade = Some(id.clone());
    v.phase = "Downloading".into();
    assert_eq!(step(&mut v, T0 + 200).action, Action::None);
    v.current_upgrade = None;
    v.phase = "Idle".into();
    v.committed = Some("2.0.0".into());
    v.last_upgrade = Some((id, "Committed".into(), String::new()));
    let done = step(&mut v, T0 + 300);
    assert_eq!(done.sync.unwrap().reason, reason::SYNCED);
    assert_eq!(upgrade_id("uid-1", 2, 1), upgrade_id("uid-1", 2, 1));
    assert_ne!(upgrade_id("uid-1", 2, 1), upgrade_id("uid-1", 3, 1));
}

#[test]
fn gates_hold_new_attempts() {
    let mut v = view();
    v.online = false;
    assert_eq!(step(&mut v, T0).sync.unwrap().reason, reason::WAITING);
    v.online = true;
    v.phase = "Downloading".into();
    v.current_upgrade = Some("manual".into());
    let d = step(&mut v, T0);
    assert_eq!(d.action, Action::None);
    assert!(d.sync.unwrap().message.contains("busy"));
    v.phase = "Idle".into();
    v.current_upgrade = None;
    v.flight_blocked = FlightGate::default().check(Some("in-air"));
    assert_eq!(step(&mut v, T0).sync.unwrap().reason, reason::WAITING);
    assert_eq!(FlightGate::default().check(None), None);
    assert!(
        FlightGate {
            allow_unknown: false,
            ..FlightGate::default()
        }
        .check(Some("unknown"))
        .is_some()
    );
    let low = FlightGate {
        min_battery_percent: Some(30),
        ..FlightGate::default()
    };
    assert!(low.check_battery(Some(12)).is_some());
    assert_eq!(low.check_battery(Some(30)), None);
    assert_eq!(
        low.check_battery(None),
        None,
        "unknown battery: the agent gates again"
    );
    assert_eq!(FlightGate::default().check_battery(Some(1)), None);
    v.flight_blocked = None;
    assert!(matches!(step(&mut v, T0).action, Action::Publish { .. }));
}

#[test]
fn transient_failures_retry_with_backoff_then_give_up() {
    let mut v = view();
    for attempt in 1..=3u32 {
        let t = T0 + i64::from(attempt) * 1000;
        let d = step(&mut v, t);
        let id = upgrade_id("uid-1", 2, attempt);
        assert_eq!(
            d.action,
            Action::Publish {
                upgrade_id: id.clone()
            },
            "attempt {attempt}"
        );
        v.last_upgrade = Some((id, "Failed".into(), "download_failed".into()));
        if attempt < 3 {
            let wait = step(&mut v, t + 1);
            assert_eq!(wait.action, Action::None);
            assert_eq!(wait.sync.unwrap().reason, reason::RETRYING);
        }
    }
    let end = step(&mut v, T0 + 10_000);
    assert_eq!(end.action, Action::None);
    assert_eq!(end.sync.unwrap().reason, reason::FAILED);
    // It stays failed for this generation.
    assert_eq!(step(&mut v, T0 + 20_000).action, Action::None);
    // A new generation starts over with a new id.
    v.generation = 3;
    assert_eq!(
        step(&mut v, T0 + 20_001).action,
        Action::Publish {
            upgrade_id: upgrade_id("uid-1", 3, 1)
        }
    );
}

#[test]
fn rejected_and_rolled_back_are_never_retried() {
    for (result, code) in [
        ("Rejected", "signature_invalid"),
        ("RolledBack", "health_check_failed"),
    ] {
        let mut v = view();
        let Action::Publish { upgrade_id } = step(&mut v, T0).action else {
            panic!("no publish");
        };
        v.last_upgrade = Some((upgrade_id, result.into(), code.into()));
        for t in [T0 + 1, T0 + 100_000] {
            let d = step(&mut v, t);
            assert_eq!(d.action, Action::None, "{result}");
            assert_eq!(d.sync.unwrap().reason, reason::FAILED);
        }
    }
}

/// Issue 22 k: the gates of the rollout that dispatched a drone hold at publish time, not
/// only at dispatch: its battery dropped under the rollout's minimum meanwhile.
#[test]
fn a_rollouts_gates_hold_at_publish() {
    use crate::api::flightnode::{Flight, FlightNodeSpec, FlightNodeStatus};
    use crate::api::rollout::{ANNOTATION_GATES, Gates};
    let mut node = FlightNode::new(
        "drone-1",
        FlightNodeSpec {
            firmware: Some(target("2.0.0")),
            ..FlightNodeSpec::default()
        },
    );
    node.status = Some(FlightNodeStatus {
        observed_state: Some("disarmed".into()),
        flight: Some(Flight {
            battery_percent: Some(30),
            ..Flight::default()
        }),
        ..FlightNodeStatus::default()
    });
    let global = FlightGate::default();
    assert_eq!(
        NodeView::of(&node, &FlightGate::for_node(&node, &global)).flight_blocked,
        None
    );
    let gates = Gates {
        min_battery_percent: Some(50),
        ..Gates::default()
    };
    node.metadata.annotations = Some(
        [(
            ANNOTATION_GATES.to_owned(),
            serde_json::to_string(&gates).unwrap(),
        )]
        .into_iter()
        .collect(),
    );
    let blocked = NodeView::of(&node, &FlightGate::for_node(&node, &global)).flight_blocked;
    assert!(
        blocked.as_deref().is_some_and(|b| b.contains("30")),
        "{blocked:?}"
    );
    // An annotation that does not parse falls back to the global gate.
    node.metadata.annotations = Some(
        [(ANNOTATION_GATES.to_owned(), "{not json".to_owned())]
            .into_iter()
            .collect(),
    );
    assert_eq!(FlightGate::for_node(&node, &global), global);
}

#[test]
fn a_command_refused_as_busy_is_tried_again_after_the_back_off() {
    let mut v = view();
    let Action::Publish { upgrade_id: first } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    v.last_upgrade = Some((first.clone(), "Rejected".into(), "busy".into()));
    let wait = step(&mut v, T0 + 1);
    assert_eq!(wait.action, Action::None);
    assert_eq!(wait.sync.unwrap().reason, reason::RETRYING);
    let Action::Publish { upgrade_id: second } = step(&mut v, T0 + 10_000).action else {
        panic!("busy was not tried again");
    };
    assert_ne!(second, first);
}

#[test]
fn a_changed_spec_cancels_a_command_not_started() {
    let mut v = view();
    let Action::Publish { upgrade_id } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    v.target = None;
    v.generation = 3;
    let d = step(&mut v, T0 + 1);
    assert_eq!(d.cancel, vec![upgrade_id.clone()]);
    assert_eq!(d.action, Action::None);
    // The record stays for the cancel until the drone acknowledges it.
    let rec = d.sync.clone().unwrap();
    assert_eq!(rec.reason, reason::CANCELING);
    assert_eq!(rec.pending_cancels.len(), 1);
    assert!(rec.message.contains(&upgrade_id), "{}", rec.message);
    // Not due again yet; then due after the back-off.
    assert!(step(&mut v, T0 + 2).cancel.is_empty());
    assert_eq!(step(&mut v, T0 + 31).cancel, vec![upgrade_id.clone()]);
    // The drone reports it canceled: the record goes.
    v.last_upgrade = Some((upgrade_id, "Canceled".into(), "canceled".into()));
    let d = step(&mut v, T0 + 32);
    assert!(d.cancel.is_empty());
    assert_eq!(d.sync, None);
    assert_eq!(d.acknowledged.len(), 1);
}

fn target(version: &str) -> FirmwareTarget {
    FirmwareTarget {
        version: version.into(),
        url: format!("http://fw/{version}.fnb"),
        allow_downgrade: false,
        retry: 0,
    }
}

#[test]
fn a_new_generation_on_an_idle_drone_cancels_the_unstarted_command_with_the_new_one() {
    let mut v = view();
    let Action::Publish { upgrade_id: mut old } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    // The drone stays idle and never reports the first command; the spec moves on twice.
    for (generation, version) in [(3, "2.1.0"), (4, "2.2.0")] {
        v.generation = generation;
        v.target = Some(target(version));
        let d = step(&mut v, T0 + generation);
        let new = upgrade_id("uid-1", generation, 1);
        assert_eq!(d.cancel, vec![old.clone()], "generation {generation}");
        assert_eq!(
            d.action,
            Action::Publish {
                upgrade_id: new.clone()
            }
        );
        assert_ne!(old, new);
        let rec = d.sync.unwrap();
        assert_eq!(rec.reason, reason::IN_PROGRESS);
        assert!(
            rec.message.contains(&old) && rec.message.contains(&new),
            "{}",
            rec.message
        );
        // Stored: the next pass cancels nothing and never the new one.
        let again = step(&mut v, T0 + generation + 1);
        assert!(again.cancel.is_empty());
        // The drone takes the new command up: it is past the old one, and the cancel is
        // acknowledged.
        v.current_upgrade = Some(new.clone());
        let acked = step(&mut v, T0 + generation + 2);
        assert!(acked.sync.unwrap().pending_cancels.is_empty());
        assert_eq!(acked.acknowledged.len(), 1);
        v.current_upgrade = None;
        old = new;
    }
}

#[test]
fn a_new_generation_waiting_at_a_gate_or_already_synced_still_cancels() {
    let mut v = view();
    let Action::Publish { upgrade_id: old } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    let mut offline = v.clone();
    offline.generation = 3;
    offline.online = false;
    let d = step(&mut offline, T0 + 1);
    assert_eq!(d.cancel, vec![old.clone()]);
    assert_eq!(d.action, Action::None);
    assert_eq!(d.sync.unwrap().reason, reason::WAITING);
    // The drone got the new version some other way: the old command must not install.
    let mut synced = v.clone();
    synced.generation = 3;
    synced.target = Some(target("3.0.0"));
    synced.committed = Some("3.0.0".into());
    let d = step(&mut synced, T0 + 1);
    assert_eq!(d.cancel, vec![old.clone()]);
    assert_eq!(d.sync.unwrap().reason, reason::SYNCED);
}

#[test]
fn an_upgrade_the_drone_started_or_ended_is_not_canceled() {
    let mut v = view();
    let Action::Publish { upgrade_id: old } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    let mut started = v.clone();
    started.current_upgrade = Some(old.clone());
    started.phase = "Downloading".into();
    started.generation = 3;
    let d = step(&mut started, T0 + 1);
    assert_eq!(
        (d.cancel, d.action),
        (vec![], Action::None),
        "it runs to its real end"
    );
    let mut ended = v.clone();
    ended.last_upgrade = Some((old.clone(), "Failed".into(), "download_failed".into()));
    assert_eq!(step(&mut ended, T0 + 1).sync.unwrap().reason, reason::RETRYING);
    // A later report of another upgrade hides the end; the record still says it ended.
    ended.last_upgrade = Some(("manual".into(), "Committed".into(), String::new()));
    ended.generation = 3;
    let d = step(&mut ended, T0 + 2);
    assert!(d.cancel.is_empty());
    assert_eq!(
        d.action,
        Action::Publish {
            upgrade_id: upgrade_id("uid-1", 3, 1)
        }
    );
}

#[test]
fn a_pending_cancel_is_kept_and_sent_again_until_the_drone_acknowledges_it() {
    let mut v = view();
    let Action::Publish { upgrade_id: old } = step(&mut v, T0).action else {
        panic!("no publish");
    };
    // The drone went dark before it took the command up; the spec moves on.
    v.online = false;
    v.generation = 3;
    v.target = Some(target("2.1.0"));
    let d = step(&mut v, T0 + 1);
    assert_eq!(d.cancel, vec![old.clone()]);
    assert_eq!(d.sync.as_ref().unwrap().reason, reason::WAITING);
    // (seconds after the first send, the cancel due?) on the doubling back-off of 30 s.
    for (at, due) in [
        (10, false),
        (31, true),
        (60, false),
        (91, true),
        (200, false),
        (211, true),
    ] {
        let d = step(&mut v, T0 + at);
        assert_eq!(!d.cancel.is_empty(), due, "{at} s");
        let rec = d.sync.unwrap();
        assert_eq!(rec.pending_cancels.len(), 1, "{at} s");
        assert!(
            rec.message.matches(old.as_str()).count() >= 1 && rec.message.matches("; cancel of").count() <= 1,
            "{}",
            rec.message
        );
    }
    assert_eq!(v.sync.as_ref().unwrap().pending_cancels[0].sends, 4);
    // Back online and idle, the old upgrade still unreported: not acknowledged; the new one is
    // published, and the cancel stays.
    v.online = true;
    let d = step(&mut v, T0 + 212);
    let Action::Publish { upgrade_id: new } = d.action else {
        panic!("no publish");
    };
    assert_eq!(d.sync.unwrap().pending_cancels.len(), 1);
    // It turns out the drone had the old one after all (queued while it was dark): in flight,
    // the cancel is still due on its schedule.
    v.current_upgrade = Some(old.clone());
    v.phase = "Downloading".into();
    let d = step(&mut v, T0 + 500);
    assert_eq!(d.cancel, vec![old.clone()]);
    // It stops: canceled. The record forgets the cancel and goes on with the new command.
    v.current_upgrade = None;
    v.phase = "Idle".into();
    v.last_upgrade = Some((old.clone(), "Canceled".into(), "canceled".into()));
    let d = step(&mut v, T0 + 501);
    assert!(d.cancel.is_empty());
    let rec = d.sync.unwrap();
    assert!(rec.pending_cancels.is_empty());
    assert!(!rec.message.contains("cancel of"), "{}", rec.message);
    assert_eq!(rec.upgrade_id.as_deref(), Some(new.as_str()));
}
