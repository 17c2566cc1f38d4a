//! Layer 6, the commands of the `flightnode-hub` binary, on top of every other layer.
//!
//! - [`serve`]: `serve`: TLS, store choice, the heartbeat side, the controllers, gRPC and HTTP.
//! - [`http`]: serve's HTTP port: `/metrics`, `/healthz`, `/readyz` and the local store's
//!   Kubernetes-shaped API.
//! - [`broker`]: serve's embedded MQTT broker for laptops and the demo (feature
//!   `embedded-broker`).
//! - [`get`]: `get`, a kubectl-like table of `FlightNode`s.
//! - [`rollout`]: `get rollouts`, `rollout status NAME` and `apply -f FILE`.
//! - [`upgrade`]: `upgrade` and `cancel`, one MQTT command for one drone.
//!
//! `crd` prints [`crate::api::crd_yaml`].

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod get;
pub mod http;
pub mod rollout;
pub mod serve;
pub mod upgrade;
