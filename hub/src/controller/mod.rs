//! Layer 4, the controllers: they read the stores, run the decisions and carry them out (spec
//! and status writes, MQTT commands), on the Lease holder only.
//!
//! - [`reconcile`]: the reconcile loop and the node reconciler.
//! - [`rollout`]: one step of every `FirmwareRollout` (drones read into the plan, plan carried
//!   out).
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease, and [`lease::Leadership`].
//! - [`fence`]: the store and command sink the controllers use, writing only while leading.
//! - [`mqtt`]: where commands go ([`mqtt::CommandSink`]): the broker connection.

pub mod fence;
pub mod lease;
pub mod mqtt;
pub mod reconcile;
pub mod rollout;
