//! Tests of the sessions: liveness, watching, which replica writes.
use super::*;

fn sessions() -> Sessions {
    let config = SessionConfig {
        refresh: Duration::from_mins(1),
        grace: Duration::from_secs(30),
        sink_stores_events: false,
    };
    Sessions::new(config, Arc::default())
}

/// A status as a replica stored it: Online as given, heartbeat `ago` seconds ago.
fn stored(online: bool, ago: i64) -> FlightNodeStatus {
    let t = time::OffsetDateTime::now_utc().unix_timestamp() - ago;
    FlightNodeStatus {
        device_id: Some("drone-1".into()),
        phase: Some("Idle".into()),
        last_heartbeat_time: status::unix_rfc3339(t),
        conditions: vec![Condition {
            type_: condition::ONLINE.into(),
            status: if online { "True" } else { "False" }.into(),
            last_transition_time: status::unix_rfc3339(t - 600).unwrap_or_default(),
            ..Condition::default()
        }],
        ..FlightNodeStatus::default()
    }
}

fn online(s: &FlightNodeStatus) -> (&str, &str) {
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == condition::ONLINE)
        .unwrap();
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn a_drone_stored_online_that_nobody_hears_goes_offline_after_grace_and_refresh() {
    let s = sessions();
    let now = Instant::now();
    s.watch("drone-1", &stored(true, 60), now);
    assert!(s.expire(now).is_empty(), "60 s is within grace + refresh (90 s)");
    assert_eq!(s.len(), 0, "a watched drone is not served here");
    let writes = s.expire(now + Duration::from_secs(31));
    assert_eq!(writes.len(), 1);
    let status = s.current("drone-1").unwrap();
    assert_eq!(online(&status), ("False", "HeartbeatTimeout"));
    assert_eq!(status.last_heartbeat_time, stored(true, 60).last_heartbeat_time);
    assert_eq!(status.phase.as_deref(), Some("Idle"));
}

#[test]
fn a_watched_drone_whose_stored_heartbeat_moves_on_stays_online() {
    let s = sessions();
    let now = Instant::now();
    s.watch("drone-1", &stored(true, 60), now);
    // Its replica rewrote the heartbeat time: someone hears it.
    s.watch("drone-1", &stored(true, 0), now);
    assert!(s.expire(now + Duration::from_secs(31)).is_empty());
    assert!(
        s.spec_changed("drone-1", now).is_none(),
        "its status is not this replica's to write"
    );
}

fn heard(s: &Sessions, seq: u64, now: Instant) {
    let mut hb = flightnode_proto::sample::idle_heartbeat("drone-1", "1.0.0");
    hb.seq = seq;
    s.observe(&hb, now);
}

/// What another replica stored: its agent seq and heartbeat time (`ago` seconds ago by
/// this replica's clock).
fn stored_elsewhere(s: &Sessions, seq: u64, ago: i64) {
    let t = time::OffsetDateTime::now_utc().unix_timestamp() - ago;
    s.specs().set(
        "drone-1",
        SpecView {
            stored_seq: seq,
            stored_heartbeat_unix: t,
            ..SpecView::default()
        },
    );
}

/// Issue 22 n: a write queued here after the drone moved to another replica does not land
/// over that replica's newer status (by the agent's seq), unless nobody refreshed it.
#[test]
fn a_write_over_a_newer_heartbeat_stored_by_another_replica_is_dropped() {
    let s = sessions();
    let now = Instant::now();
    heard(&s, 10, now);
    assert_eq!(s.build("drone-1").unwrap().req.status.heartbeat_seq, Some(10));
    stored_elsewhere(&s, 12, 1);
    assert!(s.build("drone-1").is_none(), "written over a newer status");
    // The agent's numbers started again (its state dir was wiped), and the old status is
    // no longer refreshed by anyone: this replica writes again.
    stored_elsewhere(&s, 12, 200);
    assert!(s.build("drone-1").is_some());
}

/// Issue 22 n: whether another replica took the drone over is decided by the agent's seq,
/// not by comparing two pods' clocks: a replica whose clock runs ahead does not keep a
/// silent drone online.
#[test]
fn a_silent_drone_goes_offline_even_when_another_pods_clock_runs_ahead() {
    let s = sessions();
    let now = Instant::now();
    heard(&s, 20, now);
    // The other replica served it before (seq 15), with a clock 60 s ahead.
    stored_elsewhere(&s, 15, -60);
    let writes = s.expire(now + Duration::from_secs(31));
    assert_eq!(writes.len(), 1, "the drone stayed online");
    assert_eq!(
        online(&s.current("drone-1").unwrap()),
        ("False", "HeartbeatTimeout")
    );
}

#[test]
fn a_drone_stored_offline_is_not_watched() {
    let s = sessions();
    let now = Instant::now();
    s.watch("drone-1", &stored(false, 600), now);
    assert!(s.expire(now).is_empty());
    assert!(s.current("drone-1").is_none());
}
