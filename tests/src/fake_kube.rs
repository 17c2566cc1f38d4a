//! An HTTP fake of the Kubernetes API for `edge.drone.io/v1` `FlightNode`s, on loopback, for the
//! real kube client. It checks every status write (method, path, `fieldManager`, `force`,
//! content type `application/apply-patch+yaml`, a body of only apiVersion/kind/status) and
//! records it; it can answer 404, 409, 429 with `Retry-After`, 500 and slow responses.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let fake = flightnode_tests::fake_kube::FakeKube::start().await?;
//! fake.insert("default", "drone-1", "hw-x1");
//! fake.push_fault(flightnode_tests::fake_kube::Fault::TooManyRequests { retry_after_secs: 1 });
//! // point a kube client at fake.url() …
//! assert!(fake.violations().is_empty());
//! # Ok(()) }
//! ```

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The field manager every status write must use.
pub const FIELD_MANAGER: &str = "flightnode-hub";

/// A scripted answer to the next status write.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 404 NotFound.
    NotFound,
    /// 409 Conflict.
    Conflict,
    /// 429 with `Retry-After` (and `details.retryAfterSeconds`).
    TooManyRequests {
        /// Seconds.
        retry_after_secs: u64,
    },
    /// 500.
    InternalError,
    /// Wait, then answer normally.
    Slow(Duration),
}

/// One status write as received.
#[derive(Debug, Clone)]
pub struct StatusWrite {
    /// When it arrived.
    pub at: Instant,
    /// Namespace.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Raw query string.
    pub query: String,
    /// The parsed body.
    pub body: Value,
    /// The HTTP status answered.
    pub answered: u16,
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<(String, String), Value>,
    faults: VecDeque<Fault>,
    writes: Vec<StatusWrite>,
    creates: Vec<(String, String)>,
    violations: Vec<String>,
    resource_version: u64,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeKube {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, Json(body)).into_response()
}

impl FakeKube {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<FakeKube> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let fake = FakeKube {
            addr,
            inner: Arc::new(Mutex::new(Inner::default())),
        };
        let base = "/apis/edge.drone.io/v1/namespaces/{ns}/flightnodes";
        let router = Router::new()
            .route(base, get(list).post(create))
            .route(&format!("{base}/{{name}}"), get(get_one))
            .route(
                &format!("{base}/{{name}}/status"),
                patch(patch_status).put(reject).post(reject),
            )
            .fallback(fallback)
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(fake)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a `FlightNode` (as an operator would).
    pub fn insert(&self, namespace: &str, name: &str, hardware_id: &str) {
        let mut inner = self.lock();
        inner.resource_version += 1;
        let obj = json!({"apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
            "metadata": {"name": name, "namespace": namespace, "generation": 1,
                "resourceVersion": inner.resource_version.to_string(),
                "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"hardwareId": hardware_id}});
        inner.objects.insert((namespace.to_owned(), name.to_owned()), obj);
    }

    /// Queues an answer for the next status write.
    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Every status write received, in order.
    pub fn status_writes(&self) -> Vec<StatusWrite> {
        self.lock().writes.clone()
    }

    /// Objects created through the API (namespace, name).
    pub fn creates(&self) -> Vec<(String, String)> {
        self.lock().creates.clone()
    }

    /// A stored object.
    pub fn object(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Contract violations seen (wrong method, query, content type, body); empty when all good.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

fn check_write(headers: &HeaderMap, query: &str, body: &Value) -> Vec<String> {
    let mut v = Vec::new();
    let content_type = headers
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if content_type != "application/apply-patch+yaml" {
        v.push(format!(
            "content type {content_type:?}, want application/apply-patch+yaml"
        ));
    }
    let pairs: Vec<(&str, &str)> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    if !pairs.contains(&("fieldManager", FIELD_MANAGER)) {
        v.push(format!("query {query:?} lacks fieldManager={FIELD_MANAGER}"));
    }
    if !pairs.contains(&("force", "true")) {
        v.push(format!("query {query:?} lacks force=true"));
    }
    match body.as_object() {
        None => v.push("body is not a JSON object".into()),
        Some(map) => {
            let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
            keys.sort_unstable();
            if keys != ["apiVersion", "kind", "status"] {
                v.push(format!("body keys {keys:?}, want only apiVersion, kind, status"));
            }
            if map.get("apiVersion") != Some(&json!("edge.drone.io/v1"))
                || map.get("kind") != Some(&json!("FlightNode"))
            {
                v.push("body apiVersion/kind are not edge.drone.io/v1 FlightNode".into());
            }
        }
    }
    v
}

async fn patch_status(
    State(fake): State<FakeKube>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let violations = check_write(&headers, &query, &parsed);
    let fault = fake.lock().faults.pop_front();
    if let Some(Fault::Slow(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    let mut inner = fake.lock();
    let key = (ns.clone(), name.clone());
    let (code, response) = if violations.is_empty() {
        match fault {
            Some(Fault::NotFound) => (404, status(StatusCode::NOT_FOUND, "NotFound", "not found")),
            Some(Fault::Conflict) => (409, status(StatusCode::CONFLICT, "Conflict", "conflict")),
            Some(Fault::InternalError) => (
                500,
                status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "boom"),
            ),
            Some(Fault::TooManyRequests { retry_after_secs }) => {
                let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "too many requests", "reason": "TooManyRequests", "code": 429,
                    "details": {"retryAfterSeconds": retry_after_secs}});
                let r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", retry_after_secs.to_string())],
                    Json(body),
                )
                    .into_response();
                (429, r)
            }
            None | Some(Fault::Slow(_)) => {
                inner.resource_version += 1;
                let rv = inner.resource_version.to_string();
                match inner.objects.get_mut(&key) {
                    None => (
                        404,
                        status(StatusCode::NOT_FOUND, "NotFound", "flightnode not found"),
                    ),
                    Some(obj) => {
                        obj["status"] = parsed["status"].clone();
                        obj["metadata"]["resourceVersion"] = json!(rv);
                        (200, Json(obj.clone()).into_response())
                    }
                }
            }
        }
    } else {
        inner
            .violations
            .extend(violations.iter().map(|m| format!("{ns}/{name}: {m}")));
        (
            400,
            status(StatusCode::BAD_REQUEST, "BadRequest", &violations.join("; ")),
        )
    };
    inner.writes.push(StatusWrite {
        at: Instant::now(),
        namespace: ns,
        name,
        query,
        body: parsed,
        answered: code,
    });
    response
}

async fn create(State(fake): State<FakeKube>, Path(ns): Path<String>, body: Bytes) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(name) = parsed
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "no metadata.name");
    };
    let mut inner = fake.lock();
    inner.creates.push((ns.clone(), name.clone()));
    if inner.objects.contains_key(&(ns.clone(), name.clone())) {
        return status(StatusCode::CONFLICT, "AlreadyExists", "already exists");
    }
    let mut obj = parsed;
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["generation"] = json!(1);
    inner.objects.insert((ns, name), obj.clone());
    (StatusCode::CREATED, Json(obj)).into_response()
}

async fn list(State(fake): State<FakeKube>, Path(ns): Path<String>, RawQuery(query): RawQuery) -> Response {
    let watching = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    if watching {
        // A watch that stays open with no changes, as an API server's does between events
        // (objects changed through the fake are not streamed; tests that need spec changes
        // use the local store).
        let quiet = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        return (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(quiet),
        )
            .into_response();
    }
    let inner = fake.lock();
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .map(|(_, v)| v.clone())
        .collect();
    Json(json!({"apiVersion": "edge.drone.io/v1", "kind": "FlightNodeList",
        "metadata": {"resourceVersion": inner.resource_version.to_string()}, "items": items}))
    .into_response()
}

async fn get_one(State(fake): State<FakeKube>, Path((ns, name)): Path<(String, String)>) -> Response {
    match fake.lock().objects.get(&(ns, name)) {
        Some(obj) => Json(obj.clone()).into_response(),
        None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
    }
}

async fn reject(
    State(fake): State<FakeKube>,
    method: Method,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    fake.lock()
        .violations
        .push(format!("{ns}/{name}: status written with {method}, want PATCH"));
    status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "use PATCH")
}

async fn fallback(State(fake): State<FakeKube>, method: Method, uri: axum::http::Uri) -> Response {
    fake.lock()
        .violations
        .push(format!("unexpected request {method} {uri}"));
    status(StatusCode::NOT_FOUND, "NotFound", "no such path in the fake")
}
