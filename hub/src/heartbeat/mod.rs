//! Layer 5, the heartbeat side: drones report over gRPC, the hub keeps one session per drone in
//! memory, judges liveness by its own clock, and writes status through a rate-limited scheduler
//! into a store's status sink.
//!
//! - [`grpc`]: the tonic `HubService`, mTLS identity check, input validation.
//! - [`hub`]: the shared core (sessions, scheduler, metrics, local store).
//! - [`session`]: one in-memory session per drone; decides when a write is due; event acks.
//! - [`scheduler`]: token bucket, per-drone latest-wins queue, priorities, retries.
//! - [`liveness`]: marks drones offline when heartbeats stop.
//! - [`fuzzing`]: the body of the cargo-fuzz `heartbeat` target (and its smoke test).

pub mod fuzzing;
pub mod grpc;
pub mod hub;
pub mod liveness;
pub mod scheduler;
pub mod session;
