//! flightnode hub: gRPC heartbeats in, `FlightNode` status out.
//!
//! Drones send heartbeats over gRPC ([`grpc`]); the hub keeps a session per drone in memory
//! ([`session`]), turns each heartbeat into a `FlightNode` status ([`status`]) and writes it only
//! when it changed or grew stale, through a rate-limited latest-wins queue ([`scheduler`]) into a
//! status sink ([`sink`]): the Kubernetes API, or an embedded sled store for a laptop. Liveness is
//! judged by the hub's own clock ([`liveness`]), like the node lifecycle controller does for
//! kubelets.
//!
//! # Layout
//! - [`crd`]: the `FlightNode` custom resource (`edge.drone.io/v1`) and its CRD.
//! - [`status`]: heartbeat → `FlightNodeStatus`, conditions, phase names.
//! - [`session`]: one in-memory session per drone; decides when a write is due; event acks.
//! - [`scheduler`]: token bucket, per-drone latest-wins queue, priorities, retries.
//! - [`liveness`]: marks drones offline when heartbeats stop.
//! - [`sink`]: the `StatusSink` trait; [`sink::kube`] (server-side apply) and [`sink::local`] (sled).
//! - [`grpc`]: the tonic `HubService`, mTLS identity check, input validation.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the local store's Kubernetes-shaped API.
//! - [`metrics`]: prometheus-client registry.
//! - [`fuzzing`]: fuzz target bodies (cargo-fuzz `heartbeat` and its smoke test).
//! - [`get`]: `flightnode-hub get`, a kubectl-like table.
//! - [`upgrade`]: `flightnode-hub upgrade`, publishes MQTT upgrade/cancel commands.
//! - [`broker`]: the embedded MQTT broker for laptops and the demo (feature `embedded-broker`).
//! - [`node_sync`]: the node reconciler's decision (`spec.firmware` → upgrade command), pure.
//! - [`rollout`]: the `FirmwareRollout` CRD, its wave/breaker plan (pure) and controller.
//! - [`store`]: what the controllers read and write, on Kubernetes or the local store.
//! - [`controllers`]: the reconcile loop (leader only); [`lease`]: the Lease election.
//! - [`hub`]: the shared core (sessions, scheduler, metrics, local store).
//! - [`serve`]: `flightnode-hub serve`: TLS, sink choice, gRPC and HTTP servers.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod controllers;
pub mod crd;
pub mod fuzzing;
pub mod get;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod node_sync;
pub mod rollout;
pub mod scheduler;
pub mod serve;
pub mod session;
pub mod sink;
pub mod status;
pub mod store;
pub mod upgrade;

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "flightnode-hub";

/// Errors of the hub library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes client call failed.
    #[error("kubernetes API call failed")]
    Kube(#[source] kube::Error),
    /// The Kubernetes client could not be set up (configuration, or a cache that never filled).
    #[error("kubernetes: {what}")]
    KubeSetup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: Cause,
    },
    /// The local store failed.
    #[error("local store {path}")]
    Sled {
        /// The store directory.
        path: String,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// A file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error("tls setup of the gRPC server")]
    Tls(#[source] tonic::transport::Error),
    /// A listener could not be bound or its address read.
    #[error("serve {addr}")]
    Serve {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serve gRPC on {addr}")]
    Grpc {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// JSON or YAML encoding, or writing it out, failed.
    #[error("encode")]
    Encode(#[source] Cause),
    /// MQTT publishing failed.
    #[error("mqtt {url}")]
    Mqtt {
        /// The broker.
        url: String,
        /// The cause.
        #[source]
        source: Cause,
    },
    /// The broker did not acknowledge a command in time.
    #[error("mqtt {url}: no PUBACK within {timeout:?}")]
    MqttTimeout {
        /// The broker.
        url: String,
        /// How long it waited.
        timeout: std::time::Duration,
    },
    /// Invalid input (flags, arguments).
    #[error("{0}")]
    Invalid(String),
}

/// A cause of one of several types (kube, serde, rumqttc, io), kept typed behind the box.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Result with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
