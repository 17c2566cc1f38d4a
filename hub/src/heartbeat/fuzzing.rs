//! Fuzz target bodies, shared by the cargo-fuzz target `heartbeat` in `fuzz/` and the smoke test
//! that runs it in `cargo test` (`hub/tests/fuzz_smoke.rs`). A panic is a finding.

use crate::api::flightnode::object_name;
use crate::decide::status::{Liveness, SpecView, from_heartbeat, with_conditions};
use crate::heartbeat::grpc::{MAX_MESSAGE_TEXT_BYTES, validate};
use crate::heartbeat::session::{SessionConfig, Sessions, SpecCache};
use flightnode_proto::v1::HeartbeatRequest;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// Any bytes decoded as a `HeartbeatRequest` (what tonic hands the service) are refused by
/// [`validate`] with a message, or turn into a status with the four conditions, a valid object
/// name and a JSON server-side apply body, and pass through a session; never a panic.
///
/// # Panics
///
/// On a finding: an input that breaks one of those properties.
pub fn heartbeat(data: &[u8]) {
    let Ok(mut hb) = HeartbeatRequest::decode(data) else {
        return;
    };
    if let Err(message) = validate(&mut hb) {
        assert!(!message.is_empty());
        return;
    }
    assert!(
        hb.events
            .iter()
            .map(|e| &e.message)
            .chain(hb.last_upgrade.iter().map(|l| &l.error_message))
            .all(|m| m.len() <= MAX_MESSAGE_TEXT_BYTES),
        "a message longer than {MAX_MESSAGE_TEXT_BYTES} bytes passed validation"
    );
    let name = object_name(&hb.device_id);
    assert!(!name.is_empty() && name.len() <= 253, "object name {name:?}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
        "object name {name:?}"
    );
    let spec = SpecView {
        firmware_version: Some("2.0.0".into()),
        generation: Some(1),
        ..SpecView::default()
    };
    let status = with_conditions(
        from_heartbeat(&hb),
        Liveness::Online,
        &spec,
        &[],
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(status.conditions.len(), 4);
    assert!(status.phase.as_deref().is_some_and(|p| !p.is_empty()));
    let body = crate::store::kube::apply_body(&status);
    assert!(serde_json::to_vec(&body).is_ok());

    let sessions = Sessions::new(
        SessionConfig {
            refresh: Duration::from_mins(1),
            grace: Duration::from_secs(35),
            sink_stores_events: false,
        },
        Arc::new(SpecCache::default()),
    );
    let now = tokio::time::Instant::now();
    let first = sessions.observe(&hb, now);
    let Some(write) = first.enqueue else {
        panic!("a new drone's first status must be written");
    };
    let Some(built) = sessions.build(&write.name) else {
        panic!("no write built for a drone just seen");
    };
    assert_eq!(built.req.status.conditions.len(), 4);
    sessions.write_done(&built, now);
    // Once written, the same heartbeat again needs no write.
    let again = sessions.observe(&hb, now);
    assert!(again.enqueue.is_none(), "unchanged heartbeat queued a write");
    assert_eq!(sessions.len(), 1);
}
