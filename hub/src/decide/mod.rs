//! Layer 2, the decisions: pure functions over the API types. No clock, no I/O, no store: the
//! caller passes the time in and carries out what comes back, so each decision is tested with
//! plain values.
//!
//! - [`status`]: heartbeat → `FlightNodeStatus`: phase names, coarse resources, conditions.
//! - [`cancel`]: when the drone acknowledged a cancel, when to send it again.
//! - [`node_sync`]: the node reconciler's decision (`spec.firmware` → upgrade command, retries).
//! - [`rollout_waves`]: a rollout's waves, drone outcomes and circuit breaker.
//! - [`rollout_plan`]: a rollout's next step (dispatch, call back, status, events, the
//!   operators' requests).
//! - [`rollout_spec`]: whether a rollout's spec can be carried out (what the CRD's schema checks).
//! - [`window`]: a rollout's maintenance windows (cron schedule, duration, time zone).

pub mod cancel;
pub mod node_sync;
pub mod rollout_plan;
pub mod rollout_spec;
pub mod rollout_waves;
pub mod status;
pub mod window;
