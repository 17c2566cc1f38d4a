//! Kubernetes status sink: server-side apply of `status` with field manager `flightnode-hub`.
//!
//! Requests go through the real kube `Client` (auth, TLS, base URI), but the response is read
//! raw so that `Retry-After` is honoured; kube's own retry layer is switched off because the
//! scheduler owns retries and rate limits.

use super::sink::{StatusSink, WriteError, WriteRequest};
use crate::FIELD_MANAGER;
use crate::api::flightnode::{API_VERSION, FlightNode, KIND, new_flightnode};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::client::Body;
use kube::core::Request;
use kube::{Client, Resource};
use std::time::Duration;

/// Writes `FlightNode` status to one namespace.
#[derive(Clone)]
pub struct KubeSink {
    client: Client,
    namespace: String,
    timeout: Duration,
}

/// Builds a kube client from the environment (in cluster, or KUBECONFIG), without kube's retries.
pub async fn client_from_env() -> crate::Result<Client> {
    let mut config = kube::Config::infer().await.map_err(|e| crate::Error::KubeSetup {
        what: "client configuration (in cluster, or KUBECONFIG)",
        source: e.into(),
    })?;
    config.default_retry = false;
    Client::try_from(config).map_err(crate::Error::Kube)
}

/// Builds a kube client for an API server URL with no auth (the local store, test fakes).
pub fn client_for_url(url: &str) -> crate::Result<Client> {
    let uri = url
        .parse::<http::Uri>()
        .map_err(|e| crate::Error::Invalid(format!("server URL {url:?}: {e}")))?;
    let mut config = kube::Config::new(uri);
    config.default_retry = false;
    Client::try_from(config).map_err(crate::Error::Kube)
}

impl KubeSink {
    /// A sink writing to `namespace`; each request is abandoned after `timeout`.
    pub fn new(client: Client, namespace: &str, timeout: Duration) -> Self {
        KubeSink {
            client,
            namespace: namespace.to_owned(),
            timeout,
        }
    }

    fn request(&self) -> Request {
        Request::new(FlightNode::url_path(&(), Some(&self.namespace)))
    }

    async fn send(&self, req: http::Request<Vec<u8>>) -> Result<(), WriteError> {
        let sent = tokio::time::timeout(self.timeout, self.client.send(req.map(Body::from))).await;
        let response = match sent {
            Err(_) => {
                return Err(WriteError::Retryable {
                    code: 0,
                    retry_after: None,
                    message: format!("no response within {:?}", self.timeout),
                });
            }
            Ok(Err(e)) => {
                return Err(WriteError::Retryable {
                    code: 0,
                    retry_after: None,
                    message: e.to_string(),
                });
            }
            Ok(Ok(r)) => r,
        };
        let code = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let header_delay = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        let status: Option<kube::core::Status> = serde_json::from_slice(&body).ok();
        let body_delay = status
            .as_ref()
            .and_then(|s| s.details.as_ref())
            .map(|d| d.retry_after_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s)));
        let message = status
            .map(|s| s.message)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
        match code {
            404 => Err(WriteError::NotFound),
            409 | 429 | 500..=599 => Err(WriteError::Retryable {
                code,
                retry_after: header_delay.or(body_delay),
                message,
            }),
            _ => Err(WriteError::Permanent { code, message }),
        }
    }
}

/// The server-side apply body of a status write: only apiVersion, kind and status.
pub fn apply_body(status: &crate::api::flightnode::FlightNodeStatus) -> serde_json::Value {
    serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status })
}

impl StatusSink for KubeSink {
    fn write_status<'a>(&'a self, req: &'a WriteRequest) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let http_req = self
                .request()
                .patch_subresource(
                    "status",
                    &req.name,
                    &params,
                    &Patch::Apply(apply_body(&req.status)),
                )
                .map_err(|e| WriteError::Permanent {
                    code: 0,
                    message: e.to_string(),
                })?;
            self.send(http_req).await
        })
    }

    fn create<'a>(&'a self, name: &'a str, hardware_id: &'a str) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            let node = new_flightnode(name, &self.namespace, hardware_id);
            let data = serde_json::to_vec(&node).map_err(|e| WriteError::Permanent {
                code: 0,
                message: e.to_string(),
            })?;
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            let http_req = self
                .request()
                .create(&params, data)
                .map_err(|e| WriteError::Permanent {
                    code: 0,
                    message: e.to_string(),
                })?;
            match self.send(http_req).await {
                Err(WriteError::Retryable { code: 409, .. }) => Ok(()),
                other => other,
            }
        })
    }

    fn kind(&self) -> &'static str {
        "kube"
    }
}

/// Watches the `FlightNode`s in `namespace` and hands every applied object to `on_node` (which
/// keeps the hub's spec cache in step and re-evaluates a drone whose spec changed). Runs
/// forever.
pub async fn watch_specs(client: Client, namespace: String, on_node: impl Fn(&FlightNode) + Send + 'static) {
    use futures_util::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<FlightNode> = kube::Api::namespaced(client, &namespace);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures_util::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(node) => on_node(&node),
            Err(e) => {
                tracing::warn!(error = %flightnode_proto::error::Chain(&e), "FlightNode watch failed; retrying");
            }
        }
    }
}
