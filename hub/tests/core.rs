//! Sessions + scheduler + liveness with an in-memory sink and paused tokio time.

mod common;

use common::*;
use flightnode_hub::store::sink::WriteError;
use flightnode_proto::v1;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, advance};

#[tokio::test(start_paused = true)]
async fn one_write_per_real_change_and_bounded_refreshes() {
    let sink = Arc::new(ScriptedSink::default());
    let hub = hub_with(sink.clone(), config(20.0, 40));
    // 12 identical heartbeats, 5 s apart: one write, then one refresh after 60 s.
    for _ in 0..12 {
        hub.heartbeat(&heartbeat("d1", "1.0.0")).await;
        settle().await;
        advance(Duration::from_secs(5)).await;
    }
    settle().await;
    let writes = sink.ok_writes();
    assert_eq!(writes.len(), 1, "55 s of identical heartbeats: one write");
    hub.heartbeat(&heartbeat("d1", "1.0.0")).await;
    settle().await;
    assert_eq!(sink.ok_writes().len(), 2, "the 60 s refresh");
    // A real change is written at once.
    hub.heartbeat(&with_phase(heartbeat("d1", "1.0.0"), "downloading", 1))
        .await;
    settle().await;
    let writes = sink.ok_writes();
    assert_eq!(writes.len(), 3);
    assert_eq!(writes[2].req.status.phase.as_deref(), Some("Downloading"));
    assert_eq!(
        cond(&writes[2].req.status, "UpgradeInProgress"),
        "True/Downloading"
    );
    // 10 minutes of unchanged heartbeats every 10 s: at most one refresh per minute.
    let before = sink.ok_writes().len();
    for _ in 0..60 {
        advance(Duration::from_secs(10)).await;
        hub.heartbeat(&with_phase(heartbeat("d1", "1.0.0"), "downloading", 1))
            .await;
        settle().await;
    }
    let refreshes = sink.ok_writes().len() - before;
    assert!(
        (9..=10).contains(&refreshes),
        "{refreshes} refreshes in 10 minutes"
    );
}

#[tokio::test(start_paused = true)]
async fn token_bucket_holds_under_a_thousand_drones() {
    let sink = Arc::new(ScriptedSink::default());
    let mut cfg = config(20.0, 40);
    // Long enough that nobody goes offline while the queue drains (that would add writes).
    cfg.session.grace = Duration::from_mins(5);
    let hub = hub_with(sink.clone(), cfg);
    let start = Instant::now();
    for i in 0..1000 {
        hub.heartbeat(&heartbeat(&format!("drone-{i}"), "1.0.0")).await;
    }
    settle().await;
    assert!(sink.seen().len() <= 40, "burst: {}", sink.seen().len());
    for second in 1..=60u64 {
        advance(Duration::from_secs(1)).await;
        settle().await;
        let n = sink.seen().len() as u64;
        assert!(n <= 40 + 20 * second + 1, "after {second}s: {n} writes");
    }
    let seen = sink.seen();
    assert_eq!(seen.len(), 1000, "every drone written once");
    let last = seen.iter().map(|s| s.at).max().unwrap();
    let took = last - start;
    // First writes leave half the burst (20) to transitions: 20 at once, 980 at 20/s.
    assert!(
        took >= Duration::from_secs(48) && took <= Duration::from_secs(50),
        "{took:?}"
    );
    let mut names: Vec<_> = seen.iter().map(|s| s.req.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1000);
}

/// Moves the paused clock in 100 ms steps (one jump would let the bucket overflow).
async fn step(total: Duration) {
    for _ in 0..(total.as_millis() / 100) {
        advance(Duration::from_millis(100)).await;
        settle().await;
    }
}

#[tokio::test(start_paused = true)]
async fn phase_changes_overtake_a_fleet_waiting_to_be_registered() {
    let sink = Arc::new(ScriptedSink::default());
    let mut cfg = config(20.0, 40);
    cfg.session.grace = Duration::from_hours(1);
    let hub = hub_with(sink.clone(), cfg);
    // A hub start with 10,000 drones: 500 s of first writes at 20/s.
    for i in 0..10_000 {
        hub.heartbeat(&heartbeat(&format!("drone-{i}"), "1.0.0")).await;
    }
    step(Duration::from_secs(10)).await;
    let before = sink.seen().len();
    assert!((200..=260).contains(&before), "registrations are paced: {before}");
    // 50 drones, none of them written yet, start an upgrade at once: 20 go on the reserve
    // at once, 30 on the next 1.5 s of tokens.
    let t0 = Instant::now();
    let movers: Vec<String> = (0..50).map(|i| format!("drone-{}", 9000 + i)).collect();
    let mut waits = Vec::new();
    for name in &movers {
        let hub = Arc::clone(&hub);
        let hb = with_phase(heartbeat(name, "1.0.0"), "downloading", 1);
        waits.push(tokio::spawn(async move { hub.heartbeat(&hb).await }));
    }
    step(Duration::from_secs(2)).await;
    for w in waits {
        assert_eq!(w.await.unwrap().acked_seq, 1, "event acked once written");
    }
    let seen = sink.seen();
    for name in &movers {
        let at = seen
            .iter()
            .find(|s| &s.req.name == name && s.req.status.phase.as_deref() == Some("Downloading"))
            .map(|s| s.at);
        let delay = at.map(|at| at - t0);
        assert!(
            delay.is_some_and(|d| d <= Duration::from_secs(2)),
            "{name}: Downloading written after {delay:?}"
        );
    }
    // Registrations go on, and no 1-s window ever exceeds burst + qps.
    step(Duration::from_secs(5)).await;
    let seen = sink.seen();
    assert!(
        seen.len() > before + 50 + 50,
        "registrations continue: {}",
        seen.len()
    );
    let times: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| **u - *t < Duration::from_secs(1))
            .count();
        assert!(in_window <= 60, "{in_window} writes within 1 s");
    }
}

#[tokio::test(start_paused = true)]
async fn bursts_coalesce_and_transitions_go_first() {
    let sink = Arc::new(ScriptedSink::default());
    let hub = hub_with(sink.clone(), config(1.0, 1));
    for i in 0..5 {
        hub.heartbeat(&heartbeat(&format!("r{i}"), "1.0.0")).await;
    }
    // Let the 5 first writes through.
    for _ in 0..6 {
        advance(Duration::from_secs(1)).await;
        settle().await;
    }
    assert_eq!(sink.seen().len(), 5);
    advance(Duration::from_secs(61)).await;
    // Five refreshes are due, then a transition for a new drone arrives.
    for i in 0..5 {
        hub.heartbeat(&heartbeat(&format!("r{i}"), "1.0.0")).await;
    }
    hub.heartbeat(&heartbeat("t", "1.0.0")).await;
    // Meanwhile r0.. keep changing: latest wins, one write each.
    for v in ["1.0.1", "1.0.2", "1.0.3"] {
        hub.heartbeat(&heartbeat("r4", v)).await;
    }
    for _ in 0..10 {
        advance(Duration::from_secs(1)).await;
        settle().await;
    }
    let order: Vec<String> = sink.seen()[5..].iter().map(|s| s.req.name.clone()).collect();
    let t = order.iter().position(|n| n == "t").unwrap();
    assert!(t <= 2, "transition written early: {order:?}");
    let r4: Vec<_> = sink.seen()[5..]
        .iter()
        .filter(|s| s.req.name == "r4")
        .cloned()
        .collect();
    assert_eq!(r4.len(), 1, "coalesced: {order:?}");
    let fw = r4[0].req.status.firmware.clone().unwrap();
    assert_eq!(fw.committed_version.as_deref(), Some("1.0.3"));
    assert_eq!(order.len(), 6);
}

#[tokio::test(start_paused = true)]
async fn no_write_lost_after_429s_and_events_acked_only_when_durable() {
    let sink = Arc::new(ScriptedSink::default());
    for _ in 0..3 {
        sink.push(Err(WriteError::Retryable {
            code: 429,
            retry_after: Some(Duration::from_secs(2)),
            message: "slow down".into(),
        }));
    }
    let hub = hub_with(sink.clone(), config(20.0, 40));
    let resp = hub
        .heartbeat(&with_phase(heartbeat("d1", "1.0.0"), "downloading", 7))
        .await;
    assert_eq!(resp.acked_seq, 0, "not durable yet: the agent must keep event 7");
    // The agent moves on while the hub is throttled; its next heartbeat carries both events.
    let mut hb = with_phase(heartbeat("d1", "1.0.0"), "downloading", 7);
    hb = with_phase(hb, "staged", 8);
    advance(Duration::from_secs(1)).await;
    let _ = hub.heartbeat(&hb).await;
    for _ in 0..20 {
        advance(Duration::from_secs(1)).await;
        settle().await;
    }
    let seen = sink.seen();
    assert_eq!(seen.iter().filter(|s| !s.answered_ok).count(), 3);
    let ok = sink.ok_writes();
    assert_eq!(ok.len(), 1, "one successful write after the 429s");
    assert_eq!(ok[0].req.status.phase.as_deref(), Some("Staged"));
    let seqs: Vec<u64> = ok[0].req.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![7, 8]);
    // Retry-After was honoured: 2 s between attempts.
    for pair in seen.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_secs(2));
    }
    let resp = hub.heartbeat(&hb).await;
    assert_eq!(resp.acked_seq, 8);
}

#[tokio::test(start_paused = true)]
async fn offline_exactly_after_grace_and_back_on_next_heartbeat() {
    let sink = Arc::new(ScriptedSink::default());
    let hub = hub_with(sink.clone(), config(20.0, 40));
    hub.heartbeat(&heartbeat("d1", "1.0.0")).await;
    settle().await;
    assert_eq!(
        cond(&sink.ok_writes()[0].req.status, "Online"),
        "True/HeartbeatReceived"
    );
    advance(Duration::from_secs(35) - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        sink.seen().len(),
        1,
        "still online 1 ms before the grace period ends"
    );
    advance(Duration::from_millis(1)).await;
    settle().await;
    let writes = sink.ok_writes();
    assert_eq!(writes.len(), 2);
    let offline = &writes[1].req.status;
    assert_eq!(cond(offline, "Online"), "False/HeartbeatTimeout");
    assert_eq!(cond(offline, "Ready"), "Unknown/HeartbeatTimeout");
    assert_eq!(
        offline.last_heartbeat_time,
        writes[0].req.status.last_heartbeat_time
    );
    // Nothing more while it stays silent.
    advance(Duration::from_mins(10)).await;
    settle().await;
    assert_eq!(sink.seen().len(), 2);
    hub.heartbeat(&heartbeat("d1", "1.0.0")).await;
    settle().await;
    let writes = sink.ok_writes();
    assert_eq!(writes.len(), 3);
    assert_eq!(cond(&writes[2].req.status, "Online"), "True/HeartbeatReceived");
    assert_eq!(cond(&writes[2].req.status, "Ready"), "True/Ready");
}

fn flying(hb: v1::HeartbeatRequest, observed: &str, battery: u32) -> v1::HeartbeatRequest {
    let mut hb = hb;
    hb.flight = Some(v1::FlightState {
        observed: observed.into(),
        armed: Some(observed != "disarmed"),
        landed_state: if observed == "in-air" {
            "in_air"
        } else {
            "on_ground"
        }
        .into(),
        battery_percent: Some(battery),
        autopilot: "ardupilotmega".into(),
        ..Default::default()
    });
    hb
}

#[tokio::test(start_paused = true)]
async fn flight_state_is_a_transition_only_when_observed_state_changes() {
    let sink = Arc::new(ScriptedSink::default());
    let hub = hub_with(sink.clone(), config(20.0, 40));
    hub.heartbeat(&flying(heartbeat("d1", "1.0.0"), "in-air", 90))
        .await;
    settle().await;
    assert_eq!(sink.ok_writes().len(), 1);
    // The battery drains and the vehicle keeps flying: nothing worth a write of its own.
    for battery in (70..90).rev() {
        advance(Duration::from_secs(1)).await;
        hub.heartbeat(&flying(heartbeat("d1", "1.0.0"), "in-air", battery))
            .await;
        settle().await;
    }
    assert_eq!(
        sink.ok_writes().len(),
        1,
        "battery changes alone are not written at once"
    );
    // It lands: observedState changes, written at once, with the newest details.
    advance(Duration::from_secs(1)).await;
    hub.heartbeat(&flying(heartbeat("d1", "1.0.0"), "armed", 69))
        .await;
    settle().await;
    let writes = sink.ok_writes();
    assert_eq!(writes.len(), 2);
    let status = &writes[1].req.status;
    assert_eq!(status.observed_state.as_deref(), Some("armed"));
    assert_eq!(status.flight.as_ref().and_then(|f| f.battery_percent), Some(69));
    // An upgrade held by the gate: the condition says why.
    let mut hb = with_phase(flying(heartbeat("d1", "1.0.0"), "armed", 69), "waiting", 1);
    if let Some(u) = hb.upgrade.as_mut() {
        u.wait_reason = "armed".into();
    }
    hub.heartbeat(&hb).await;
    settle().await;
    let writes = sink.ok_writes();
    let status = &writes.last().unwrap().req.status;
    assert_eq!(status.phase.as_deref(), Some("Waiting"));
    assert_eq!(status.wait_reason.as_deref(), Some("armed"));
    assert_eq!(cond(status, "UpgradeInProgress"), "True/WaitingArmed");
    // Held by the drone's link policy: the reason passes through the same way.
    let mut hb = with_phase(flying(heartbeat("d1", "1.0.0"), "armed", 69), "waiting", 1);
    if let Some(u) = hb.upgrade.as_mut() {
        u.wait_reason = "metered_link".into();
    }
    hub.heartbeat(&hb).await;
    settle().await;
    let writes = sink.ok_writes();
    let status = &writes.last().unwrap().req.status;
    assert_eq!(status.wait_reason.as_deref(), Some("metered_link"));
    assert_eq!(cond(status, "UpgradeInProgress"), "True/WaitingMeteredLink");
}
