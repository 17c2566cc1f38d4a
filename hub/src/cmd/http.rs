//! The HTTP port: `/metrics`, `/healthz`, `/readyz`, the fleet page (`/ui`, [`crate::cmd::ui`]),
//! and with the local store a read-mostly, Kubernetes-shaped API so `kubectl`-like clients (and
//! the kube crate) can read `FlightNode`s:
//!
//! - `GET /apis/edge.drone.io/v1/flightnodes` (all namespaces)
//! - `GET /apis/edge.drone.io/v1/namespaces/{ns}/flightnodes`
//! - `GET /apis/edge.drone.io/v1/namespaces/{ns}/flightnodes/{name}` (and `/status`)
//! - `GET /apis/edge.drone.io/v1/namespaces/{ns}/flightnodes/{name}/events`: the durable event
//!   log of the drone, `{"kind":"FlightNodeEventList","items":[EventRecord…]}`, oldest first
//! - `PATCH /apis/edge.drone.io/v1/namespaces/{ns}/flightnodes/{name}` with a JSON merge patch
//!   that sets `spec.firmware` or `spec.firmwareVersion` (the only writable fields), like
//!   `kubectl patch --type merge`
//! - `GET …/firmwarerollouts` (all, per namespace, one, `/status`, `/events`) and
//!   `PUT …/namespaces/{ns}/firmwarerollouts/{name}` (create or replace the spec:
//!   `flightnode-hub apply -f`)

use crate::api::flightnode::{API_VERSION, FirmwareTarget, FlightNode};
use crate::api::rollout::FirmwareRollout;
use crate::decide::status::SpecView;
use crate::heartbeat::hub::Hub;
use crate::metrics::ConditionLabel;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Set once the hub serves gRPC.
    pub ready: Arc<AtomicBool>,
    /// The controllers' store, for the fleet page on the kube store (empty until they run).
    pub fleet: crate::cmd::ui::ControllerFleet,
    /// Who may act from the fleet page.
    pub authority: crate::cmd::ui::act::Authority,
}

const PREFIX: &str = "/apis/edge.drone.io/v1";

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(&format!("{PREFIX}/flightnodes"), get(list_all))
        .route(&format!("{PREFIX}/namespaces/{{ns}}/flightnodes"), get(list_ns))
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/flightnodes/{{name}}"),
            get(get_one).patch(patch_spec),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/flightnodes/{{name}}/status"),
            get(get_one),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/flightnodes/{{name}}/events"),
            get(events),
        )
        .route(&format!("{PREFIX}/firmwarerollouts"), get(rollouts_all))
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/firmwarerollouts"),
            get(rollouts_ns),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/firmwarerollouts/{{name}}"),
            get(rollout_one).put(rollout_apply),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/firmwarerollouts/{{name}}/status"),
            get(rollout_one),
        )
        .route(
            &format!("{PREFIX}/namespaces/{{ns}}/firmwarerollouts/{{name}}/events"),
            get(rollout_events),
        )
        .with_state(state.clone())
        .merge(crate::cmd::ui::routes(crate::cmd::ui::UiState {
            hub: state.hub,
            fleet: state.fleet,
            authority: state.authority,
        }))
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let m = &state.hub.metrics;
    m.drones.clear();
    for ((condition, status), n) in state.hub.sessions.condition_counts() {
        m.drones
            .get_or_create(&ConditionLabel { condition, status })
            .set(n);
    }
    let (versions, phases) = state.hub.sessions.version_phase_counts();
    m.set_fleet(&versions, &phases);
    m.queue_depth
        .set(i64::try_from(state.hub.scheduler.depth()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// A Kubernetes `Status` error body.
fn status_error(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn no_local_store() -> Response {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        "this hub writes to Kubernetes (--store kube); read FlightNodes there",
    )
}

fn list(state: &HttpState, ns: Option<&str>) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    let items: Vec<FlightNode> = store.list(ns);
    Json(json!({
        "apiVersion": API_VERSION, "kind": "FlightNodeList",
        "metadata": { "resourceVersion": store.resource_version() },
        "items": items,
    }))
    .into_response()
}

async fn list_all(State(state): State<HttpState>) -> Response {
    list(&state, None)
}

async fn list_ns(State(state): State<HttpState>, Path(ns): Path<String>) -> Response {
    list(&state, Some(&ns))
}

/// The API server's 404 for `name` of `resource` (`flightnodes.edge.drone.io`, …).
fn not_found_of(resource: &str, name: &str) -> Response {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

fn not_found(name: &str) -> Response {
    not_found_of("flightnodes.edge.drone.io", name)
}

async fn get_one(State(state): State<HttpState>, Path((ns, name)): Path<(String, String)>) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    match store.get(&ns, &name) {
        Some(node) => Json(node).into_response(),
        None => not_found(&name),
    }
}

async fn events(State(state): State<HttpState>, Path((ns, name)): Path<(String, String)>) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    if store.get(&ns, &name).is_none() {
        return not_found(&name);
    }
    Json(json!({
        "apiVersion": API_VERSION, "kind": "FlightNodeEventList",
        "items": store.events(&ns, &name),
    }))
    .into_response()
}

async fn patch_spec(
    State(state): State<HttpState>,
    Path((ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    if ns != store.namespace() {
        return not_found(&name);
    }
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &format!("patch body: {e}")),
    };
    if let Some(firmware) = patch.pointer("/spec/firmware") {
        let target: Option<FirmwareTarget> = match serde_json::from_value(firmware.clone()) {
            Ok(t) => t,
            Err(e) => {
                return status_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!("spec.firmware must be {{version, url[, allowDowngrade]}} or null: {e}"),
                );
            }
        };
        // A person's edit: the rollout annotations go, so a rollout leaves this drone alone.
        let drop = [
            crate::api::rollout::ANNOTATION_ROLLOUT,
            crate::api::rollout::ANNOTATION_TARGET,
            crate::api::rollout::ANNOTATION_DISPATCHED,
        ];
        return match store
            .set_target(&name, target, &std::collections::BTreeMap::default(), &drop)
            .await
        {
            Ok(Some(node)) => {
                state.hub.sessions.specs().set(&name, SpecView::of(&node));
                state.hub.spec_changed(&name);
                Json(node).into_response()
            }
            Ok(None) => not_found(&name),
            Err(e) => status_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &flightnode_proto::error::chain(&e),
            ),
        };
    }
    let version = match patch.pointer("/spec/firmwareVersion") {
        Some(serde_json::Value::String(v)) => Some(v.clone()),
        Some(serde_json::Value::Null) => None,
        _ => {
            return status_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "only spec.firmware or spec.firmwareVersion can be patched",
            );
        }
    };
    match store.set_firmware_version(&name, version).await {
        Ok(Some(node)) => {
            state.hub.sessions.specs().set(&name, SpecView::of(&node));
            state.hub.spec_changed(&name);
            Json(node).into_response()
        }
        Ok(None) => not_found(&name),
        Err(e) => status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &flightnode_proto::error::chain(&e),
        ),
    }
}

fn rollout_list(state: &HttpState, ns: Option<&str>) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    Json(json!({
        "apiVersion": API_VERSION, "kind": "FirmwareRolloutList",
        "metadata": { "resourceVersion": store.resource_version() },
        "items": store.rollouts(ns),
    }))
    .into_response()
}

async fn rollouts_all(State(state): State<HttpState>) -> Response {
    rollout_list(&state, None)
}

async fn rollouts_ns(State(state): State<HttpState>, Path(ns): Path<String>) -> Response {
    rollout_list(&state, Some(&ns))
}

fn rollout_not_found(name: &str) -> Response {
    not_found_of("firmwarerollouts.edge.drone.io", name)
}

async fn rollout_one(State(state): State<HttpState>, Path((ns, name)): Path<(String, String)>) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    match store.rollout(&ns, &name) {
        Some(r) => Json(r).into_response(),
        None => rollout_not_found(&name),
    }
}

async fn rollout_events(
    State(state): State<HttpState>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    if store.rollout(&ns, &name).is_none() {
        return rollout_not_found(&name);
    }
    Json(json!({
        "apiVersion": "v1", "kind": "EventList",
        "items": store.rollout_events(&ns, &name),
    }))
    .into_response()
}

/// `flightnode-hub apply -f`: creates or replaces a rollout's spec (the status is the hub's).
async fn rollout_apply(
    State(state): State<HttpState>,
    Path((ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Some(store) = &state.hub.local else {
        return no_local_store();
    };
    if ns != store.namespace() {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("this hub's local store holds namespace {:?}", store.namespace()),
        );
    }
    let mut rollout: FirmwareRollout = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("FirmwareRollout: {e}"),
            );
        }
    };
    if let Err(why) = crate::decide::rollout_spec::validate(&rollout.spec) {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &why);
    }
    rollout.metadata.name = Some(name);
    match store.apply_rollout(rollout).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &flightnode_proto::error::chain(&e),
        ),
    }
}
