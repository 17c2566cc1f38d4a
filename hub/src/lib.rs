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
    #[error("kubernetes: {0}")]
    Kube(#[source] kube::Error),
    /// Building the Kubernetes client configuration failed.
    #[error("kubernetes config: {0}")]
    KubeConfig(String),
    /// The local store failed.
    #[error("local store {path}: {source}")]
    Sled {
        /// The store directory.
        path: String,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// A file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// A listener could not be bound or served.
    #[error("serve {addr}: {message}")]
    Serve {
        /// The address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// JSON or YAML (de)serialisation failed.
    #[error("encode: {0}")]
    Encode(String),
    /// MQTT publishing failed.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// Invalid input (flags, arguments).
    #[error("{0}")]
    Invalid(String),
}

/// Result with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
