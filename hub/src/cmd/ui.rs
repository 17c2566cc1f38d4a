//! The live fleet page on serve's HTTP port: `GET /ui` (one HTML page; its script and style
//! are compiled into the binary, so it works offline and loads nothing from elsewhere) and
//! `GET /ui/api/fleet`, the JSON the page polls every second.
//!
//! Read-only unless the request is authorised to act: `POST /ui/api/rollouts/{namespace}/{name}/{verb}`
//! with a bearer token the API server (or, on the local store, `--ui-tokens`) vouches for runs a
//! rollout verb as that user ([`act`]); everything else only reads. The JSON comes from what the controllers
//! read: the local store's lists, or with `--store kube --controllers` the controllers' watch
//! caches (no request to the API server per page view). Rollout events are only in the local
//! store; on a cluster they are Kubernetes Events (`kubectl get events`).

use crate::api::flightnode::FlightNode;
use crate::api::meta::Condition;
use crate::api::rollout::FirmwareRollout;
use crate::store::fleet::FleetStore;
use crate::store::local::RolloutEvent;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::sync::{Arc, OnceLock};

pub mod act;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// Rollout events per rollout in the JSON (newest last): the page shows the tail, the full list
/// is `…/firmwarerollouts/{name}/events`.
const EVENTS_PER_ROLLOUT: usize = 8;

/// Everything the page may load comes from this hub; scripts only from files (no inline script,
/// no `eval`), nothing may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The controllers' store, once they started (the kube store's caches fill asynchronously,
/// after the HTTP port already serves).
pub type ControllerFleet = Arc<OnceLock<Arc<dyn FleetStore>>>;

/// What the page reads: the hub (its local store) and the controllers' store.
#[derive(Clone)]
pub struct UiState {
    /// The hub.
    pub hub: Arc<crate::heartbeat::hub::Hub>,
    /// The controllers' store, for the kube store (empty until they run).
    pub fleet: ControllerFleet,
    /// Who may act from the page.
    pub authority: act::Authority,
}

/// The page's routes, merged into serve's HTTP router.
pub fn routes(state: UiState) -> Router {
    Router::new()
        .route(
            "/ui",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/ui/api/fleet", get(fleet))
        .route("/ui/api/rollouts/{namespace}/{name}/{verb}", post(act::post))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The JSON of `GET /ui/api/fleet`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetView {
    /// `local` or `kube`.
    pub store: &'static str,
    /// The hub's clock when this was read (RFC 3339); ages are counted from it, so the
    /// browser's clock does not matter.
    pub generated_time: String,
    /// True when this hub cannot tell who a token is (local store without `--ui-tokens`):
    /// the page offers no sign-in and nothing acts. Otherwise a signed-in user may act when
    /// authorised.
    pub read_only: bool,
    /// Every drone, by name.
    pub drones: Vec<DroneRow>,
    /// Every rollout, by name.
    pub rollouts: Vec<RolloutRow>,
}

/// One drone as the page shows it.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DroneRow {
    /// Object name.
    pub name: String,
    /// The drone's own id (differs from the name when the id is no valid object name).
    pub device_id: Option<String>,
    /// `status.firmware.committedVersion`.
    pub version: Option<String>,
    /// The version the spec asks for.
    pub desired_version: Option<String>,
    /// `status.firmware.activeSlot`.
    pub active_slot: Option<String>,
    /// `status.firmware.bootedSlot`.
    pub booted_slot: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `status.waitReason`.
    pub wait_reason: Option<String>,
    /// `status.observedState`.
    pub flight_state: Option<String>,
    /// `status.flight.batteryPercent`.
    pub battery_percent: Option<i32>,
    /// `status.armLock.reason`.
    pub arm_lock: Option<String>,
    /// `status.lastHeartbeatTime`.
    pub last_heartbeat_time: Option<String>,
    /// Seconds from the last heartbeat to `generatedTime`.
    pub heartbeat_age_seconds: Option<i64>,
    /// Status of the `Online` condition.
    pub online: Option<String>,
    /// Status of the `Ready` condition.
    pub ready: Option<String>,
    /// `status.lastUpgrade.result`.
    pub last_result: Option<String>,
    /// `status.lastUpgrade.version`.
    pub last_version: Option<String>,
    /// `status.lastUpgrade.errorCode` (why the last upgrade did not commit: the rollback cause).
    pub last_error_code: Option<String>,
    /// `status.lastUpgrade.errorMessage`.
    pub last_error_message: Option<String>,
    /// `status.firmwareSync.reason` and its message (what the node reconciler waits for).
    pub sync_reason: Option<String>,
    /// `status.firmwareSync.message`.
    pub sync_message: Option<String>,
}

/// A condition as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human sentence.
    pub message: String,
}

/// One rollout as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRow {
    /// Object name.
    pub name: String,
    /// Its namespace (the page's actions name it in their URL).
    pub namespace: String,
    /// `spec.version`.
    pub version: String,
    /// `spec.paused`.
    pub paused: bool,
    /// `status.wave` (`2/3`).
    pub wave: String,
    /// `status.counts`.
    pub counts: crate::api::rollout::Counts,
    /// The breaker: the `Halted` condition.
    pub halted: Option<ConditionView>,
    /// `Complete`.
    pub complete: Option<ConditionView>,
    /// `Progressing`.
    pub progressing: Option<ConditionView>,
    /// `Superseded`.
    pub superseded: Option<ConditionView>,
    /// The last events, oldest first (empty on a cluster: see the module docs).
    pub events: Vec<RolloutEvent>,
}

fn condition(conditions: &[Condition], type_: &str) -> Option<ConditionView> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| ConditionView {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
}

/// Seconds from `time` (RFC 3339) to `now`; `None` when it does not parse.
fn age_seconds(time: Option<&str>, now: jiff::Timestamp) -> Option<i64> {
    let t: jiff::Timestamp = time?.parse().ok()?;
    Some(now.as_second() - t.as_second())
}

/// The row of one drone.
pub fn drone_row(node: &FlightNode, now: jiff::Timestamp) -> DroneRow {
    let status = node.status.clone().unwrap_or_default();
    let firmware = status.firmware.unwrap_or_default();
    let last = status.last_upgrade.unwrap_or_default();
    let cond = |t| condition(&status.conditions, t).map(|c| c.status);
    DroneRow {
        name: node.metadata.name.clone().unwrap_or_default(),
        device_id: status.device_id,
        version: firmware.committed_version,
        desired_version: node.spec.desired_version().map(str::to_owned),
        active_slot: firmware.active_slot,
        booted_slot: firmware.booted_slot,
        phase: status.phase,
        wait_reason: status.wait_reason,
        flight_state: status.observed_state,
        battery_percent: status.flight.and_then(|f| f.battery_percent),
        arm_lock: status.arm_lock.map(|a| a.reason),
        heartbeat_age_seconds: age_seconds(status.last_heartbeat_time.as_deref(), now),
        last_heartbeat_time: status.last_heartbeat_time,
        online: cond(crate::api::flightnode::condition::ONLINE),
        ready: cond(crate::api::flightnode::condition::READY),
        last_result: last.result,
        last_version: last.version,
        last_error_code: last.error_code,
        last_error_message: last.error_message,
        sync_reason: status.firmware_sync.as_ref().map(|s| s.reason.clone()),
        sync_message: status.firmware_sync.map(|s| s.message).filter(|m| !m.is_empty()),
    }
}

/// The row of one rollout, with its last events.
pub fn rollout_row(r: &FirmwareRollout, mut events: Vec<RolloutEvent>) -> RolloutRow {
    use crate::api::rollout::condition as c;
    let status = r.status.clone().unwrap_or_default();
    let keep_from = events.len().saturating_sub(EVENTS_PER_ROLLOUT);
    events.drain(..keep_from);
    RolloutRow {
        name: r.metadata.name.clone().unwrap_or_default(),
        namespace: r.metadata.namespace.clone().unwrap_or_default(),
        version: r.spec.version.clone(),
        paused: r.spec.paused,
        wave: status.wave.clone(),
        counts: status.counts,
        halted: condition(&status.conditions, c::HALTED),
        complete: condition(&status.conditions, c::COMPLETE),
        progressing: condition(&status.conditions, c::PROGRESSING),
        superseded: condition(&status.conditions, c::SUPERSEDED),
        events,
    }
}

/// Builds the view from the objects read; `events` gives a rollout's events.
pub fn view(
    store: &'static str,
    read_only: bool,
    now: jiff::Timestamp,
    nodes: &[Arc<FlightNode>],
    rollouts: &[FirmwareRollout],
    events: impl Fn(&str) -> Vec<RolloutEvent>,
) -> FleetView {
    let mut drones: Vec<DroneRow> = nodes.iter().map(|n| drone_row(n, now)).collect();
    drones.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rollouts: Vec<RolloutRow> = rollouts
        .iter()
        .map(|r| rollout_row(r, events(r.metadata.name.as_deref().unwrap_or_default())))
        .collect();
    rollouts.sort_by(|a, b| a.name.cmp(&b.name));
    FleetView {
        store,
        generated_time: jiff::Timestamp::from_second(now.as_second())
            .unwrap_or(now)
            .to_string(),
        read_only,
        drones,
        rollouts,
    }
}

async fn fleet(State(state): State<UiState>) -> Response {
    let now = jiff::Timestamp::now();
    let result = if let Some(local) = &state.hub.local {
        let ns = local.namespace().to_owned();
        let nodes: Vec<Arc<FlightNode>> = local.list(Some(&ns)).into_iter().map(Arc::new).collect();
        let mut rollouts = local.rollouts(Some(&ns));
        for r in &mut rollouts {
            r.metadata.namespace.get_or_insert_with(|| ns.clone());
        }
        Ok(view(
            "local",
            !state.authority.can_act(),
            now,
            &nodes,
            &rollouts,
            |name| local.rollout_events(&ns, name),
        ))
    } else if let Some(store) = state.fleet.get() {
        match (store.nodes().await, store.rollouts().await) {
            (Ok(nodes), Ok(rollouts)) => Ok(view(
                "kube",
                !state.authority.can_act(),
                now,
                &nodes,
                &rollouts,
                |_| Vec::new(),
            )),
            (Err(e), _) | (_, Err(e)) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "reading the controllers' caches: {}",
                    flightnode_proto::error::chain(&e)
                ),
            )),
        }
    } else {
        Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "no fleet to show yet: with --store kube the page reads the controllers' caches, \
             which need --controllers (and fill once they listed both kinds)"
                .to_owned(),
        ))
    };
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    match result {
        Ok(v) => (no_store, Json(v)).into_response(),
        Err((code, message)) => {
            (code, no_store, Json(serde_json::json!({ "error": message }))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::flightnode::{Firmware, FlightNodeStatus, LastUpgrade, new_flightnode};

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_drone_row_carries_what_the_page_shows() {
        let mut node = new_flightnode("drone-1", "default", "hw");
        node.status = Some(FlightNodeStatus {
            phase: Some("Waiting".into()),
            wait_reason: Some("battery_low".into()),
            observed_state: Some("disarmed".into()),
            flight: Some(crate::api::flightnode::Flight {
                battery_percent: Some(17),
                ..Default::default()
            }),
            firmware: Some(Firmware {
                active_slot: Some("b".into()),
                committed_version: Some("1.2.0".into()),
                ..Default::default()
            }),
            last_upgrade: Some(LastUpgrade {
                result: Some("RolledBack".into()),
                error_code: Some("health_check_failed".into()),
                ..Default::default()
            }),
            last_heartbeat_time: Some("2026-01-01T00:00:00Z".into()),
            conditions: vec![Condition {
                type_: "Online".into(),
                status: "True".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let row = drone_row(&node, at("2026-01-01T00:00:07Z"));
        assert_eq!(row.name, "drone-1");
        assert_eq!(row.version.as_deref(), Some("1.2.0"));
        assert_eq!(row.active_slot.as_deref(), Some("b"));
        assert_eq!(row.phase.as_deref(), Some("Waiting"));
        assert_eq!(row.wait_reason.as_deref(), Some("battery_low"));
        assert_eq!(row.flight_state.as_deref(), Some("disarmed"));
        assert_eq!(row.battery_percent, Some(17));
        assert_eq!(row.heartbeat_age_seconds, Some(7));
        assert_eq!(row.online.as_deref(), Some("True"));
        assert_eq!(row.ready, None);
        assert_eq!(row.last_error_code.as_deref(), Some("health_check_failed"));
    }

    #[test]
    fn a_drone_without_status_is_a_row_of_blanks_and_a_bad_time_has_no_age() {
        let mut node = new_flightnode("drone-2", "default", "hw");
        assert_eq!(
            drone_row(&node, at("2026-01-01T00:00:00Z")),
            DroneRow {
                name: "drone-2".into(),
                ..Default::default()
            }
        );
        node.status = Some(FlightNodeStatus {
            last_heartbeat_time: Some("yesterday".into()),
            ..Default::default()
        });
        assert_eq!(
            drone_row(&node, at("2026-01-01T00:00:00Z")).heartbeat_age_seconds,
            None
        );
    }

    #[test]
    fn a_rollout_row_keeps_the_breaker_and_only_the_last_events() {
        let mut r = FirmwareRollout::new(
            "fleet",
            crate::api::rollout::FirmwareRolloutSpec {
                version: "2.0.0".into(),
                url: "http://x/b.fnb".into(),
                ..Default::default()
            },
        );
        r.status = Some(crate::api::rollout::FirmwareRolloutStatus {
            wave: "1/2".into(),
            conditions: vec![Condition {
                type_: "Halted".into(),
                status: "True".into(),
                reason: "FailureThreshold".into(),
                message: "rolledBack 1 of 1".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let events: Vec<RolloutEvent> = (0..20)
            .map(|i| RolloutEvent {
                time: format!("2026-01-01T00:00:{i:02}Z"),
                type_: "Normal".into(),
                reason: format!("E{i}"),
                note: String::new(),
            })
            .collect();
        let row = rollout_row(&r, events);
        assert_eq!(row.wave, "1/2");
        let halted = row.halted.unwrap();
        assert_eq!(
            (halted.status.as_str(), halted.reason.as_str()),
            ("True", "FailureThreshold")
        );
        assert!(row.complete.is_none());
        assert_eq!(row.events.len(), EVENTS_PER_ROLLOUT);
        assert_eq!(row.events.last().unwrap().reason, "E19");
        assert_eq!(row.events[0].reason, format!("E{}", 20 - EVENTS_PER_ROLLOUT));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for needle in [
                "http://",
                "https://",
                "//cdn",
                "innerHTML",
                "eval(",
                "document.write",
            ] {
                assert!(!text.contains(needle), "{name} contains {needle:?}");
            }
        }
    }
}
