//! Layer 3, the stores: where objects live, on a cluster (the Kubernetes API) or on a laptop
//! (an embedded sled store). The heartbeat side and the controllers write through two traits,
//! so they run the same on either (only the local store's HTTP API reads the sled store
//! directly):
//!
//! - [`sink`]: [`sink::StatusSink`], where heartbeat status goes, and its write types.
//! - [`fleet`]: [`fleet::FleetStore`], what the controllers read and write, with its Kubernetes
//!   ([`fleet::KubeFleet`]) and local ([`fleet::LocalFleet`]) implementations.
//! - [`kube`]: the Kubernetes status sink (server-side apply), client setup, the `FlightNode`
//!   watch.
//! - [`local`]: the sled store: objects, event logs, rollouts.

pub mod fleet;
pub mod kube;
pub mod local;
pub mod sink;
