//! flightnode hub: gRPC heartbeats in, `FlightNode` status out.
//!
//! Drones send heartbeats over gRPC ([`heartbeat::grpc`]); the hub keeps a session per drone in
//! memory ([`heartbeat::session`]), turns each heartbeat into a `FlightNode` status
//! ([`decide::status`]) and writes it only when it changed or grew stale, through a rate-limited
//! latest-wins queue ([`heartbeat::scheduler`]) into a status sink ([`store::sink`]): the
//! Kubernetes API, or an embedded sled store for a laptop. Liveness is judged by the hub's own
//! clock ([`heartbeat::liveness`]), like the node lifecycle controller does for kubelets.
//!
//! # Layout
//! One-way layers, bottom first. Each is a folder whose `mod.rs` says what it owns. A module
//! imports only from its own layer and the ones below, and no two modules import each other
//! (a low module that needs something from above takes a value or a callback instead).
//!
//! 1. [`api`]: the custom resources: `FlightNode`, `FirmwareRollout`, conditions, the CRD YAML.
//!    Imports nothing of the hub.
//! 2. [`decide`]: pure decisions over those types: status from a heartbeat, the node
//!    reconciler's decision, a rollout's plan.
//! 3. [`store`]: where objects live, the Kubernetes API or the embedded sled store, behind the
//!    [`store::sink::StatusSink`] and [`store::fleet::FleetStore`] traits.
//! 4. [`controller`]: the reconcile loop, the rollout controller, the Lease election and the
//!    MQTT commands they send.
//! 5. [`heartbeat`]: the gRPC service, sessions, liveness and the write scheduler.
//! 6. [`cmd`]: the binary's commands: `serve` (with its HTTP port and embedded broker), `get`,
//!    `rollout`, `apply`, `upgrade`, `cancel`.
//!
//! Beside the layers: [`metrics`], the prometheus registry every layer may record into (it
//! imports nothing of the hub), [`signing`], the command key that signs commands and time, and here the crate's [`Error`] and [`FIELD_MANAGER`].

pub mod api;
pub mod cmd;
pub mod controller;
pub mod decide;
pub mod heartbeat;
pub mod metrics;
pub mod signing;
pub mod store;

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
    /// The object named does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// A controller write or publish refused because this replica no longer leads.
    #[error("{what} not done: this replica is not the leader (any more)")]
    NotLeader {
        /// What was not written or sent.
        what: String,
    },
}

/// A cause of one of several types (kube, serde, rumqttc, io), kept typed behind the box.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Result with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
