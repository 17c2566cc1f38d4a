//! Liveness by the hub's own clock: a drone silent for the grace period goes
//! `Online=False`/`Ready=Unknown` (`HeartbeatTimeout`); its next heartbeat restores it.

use crate::heartbeat::scheduler::Scheduler;
use crate::heartbeat::session::Sessions;
use std::sync::Arc;
use tokio::time::Instant;

/// Runs forever: sleeps until the earliest deadline (or a wake-up), expires silent drones and
/// queues their status writes.
pub async fn run(sessions: Arc<Sessions>, scheduler: Arc<Scheduler>) {
    loop {
        for e in sessions.expire(Instant::now()) {
            scheduler.enqueue(&e);
        }
        match sessions.next_deadline() {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = sessions.liveness_wake.notified() => {}
                }
            }
            None => sessions.liveness_wake.notified().await,
        }
    }
}
