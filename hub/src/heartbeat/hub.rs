//! The hub core shared by the gRPC service, the HTTP server and the background tasks
//! (like controller-rs's `State`): sessions, scheduler, metrics and the optional local store.

use crate::heartbeat::scheduler::{Scheduler, SchedulerConfig, StatusSource};
use crate::heartbeat::session::{SessionConfig, Sessions, SpecCache};
use crate::metrics::Metrics;
use crate::store::local::LocalStore;
use crate::store::sink::StatusSink;
use flightnode_proto::v1::{HeartbeatRequest, HeartbeatResponse};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Hub settings that are not about transport.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Sessions (refresh, grace).
    pub session: SessionConfig,
    /// Writes (rate, retries, auto-registration).
    pub scheduler: SchedulerConfig,
    /// How long a heartbeat carrying new events waits for them to become durable before it is
    /// answered with the previous ack (the agent re-sends them).
    pub ack_wait: Duration,
    /// Interval advertised to agents (`heartbeat_interval_seconds`); 0 = let them keep theirs.
    pub advertise_interval_secs: u32,
    /// Signs the hub's time into every response (the drones' trusted clock), when the hub has
    /// a command key.
    pub signer: Option<crate::signing::CommandSigner>,
}

/// Shared hub state.
pub struct Hub {
    /// Per-drone sessions.
    pub sessions: Arc<Sessions>,
    /// The write scheduler.
    pub scheduler: Arc<Scheduler>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The local store, when it is the sink (served over HTTP).
    pub local: Option<LocalStore>,
    config: HubConfig,
}

impl Hub {
    /// Builds the hub around a sink; nothing runs until [`Hub::start`].
    pub fn new(
        config: HubConfig,
        sink: Arc<dyn StatusSink>,
        local: Option<LocalStore>,
        specs: Arc<SpecCache>,
    ) -> Arc<Hub> {
        let metrics = Arc::new(Metrics::new());
        let sessions = Arc::new(Sessions::new(config.session, specs));
        let scheduler = Scheduler::new(
            config.scheduler,
            sink,
            Arc::clone(&sessions) as Arc<dyn StatusSource>,
            Arc::clone(&metrics),
        );
        Arc::new(Hub {
            sessions,
            scheduler,
            metrics,
            local,
            config,
        })
    }

    /// Starts the writers (ended by [`Scheduler::drain`]) and the liveness loop (returned).
    pub fn start(&self) -> Vec<JoinHandle<()>> {
        self.scheduler.spawn_workers();
        vec![tokio::spawn(crate::heartbeat::liveness::run(
            Arc::clone(&self.sessions),
            Arc::clone(&self.scheduler),
        ))]
    }

    /// Handles one validated heartbeat: updates the session, queues a write if due, and answers
    /// with the highest event seq that is durably recorded.
    pub async fn heartbeat(&self, hb: &HeartbeatRequest) -> HeartbeatResponse {
        self.metrics.heartbeat("ok").inc();
        let observed = self.sessions.observe(hb, Instant::now());
        if let Some(e) = observed.enqueue {
            self.scheduler.enqueue(&e);
        }
        let mut acked_seq = observed.durable_seq;
        if observed.wants_seq > acked_seq {
            let wait = self.sessions.wait_durable(&observed.name, observed.wants_seq);
            // NB: a timeout is not an error: the agent keeps the events and sends them again.
            acked_seq = match tokio::time::timeout(self.config.ack_wait, wait).await {
                Ok(seq) => seq,
                Err(_) => self.sessions.durable_seq(&observed.name),
            };
        }
        tracing::trace!(device_id = %hb.device_id, seq = hb.seq, acked_seq, "heartbeat");
        HeartbeatResponse {
            acked_seq,
            heartbeat_interval_seconds: self.config.advertise_interval_secs,
            time: self.config.signer.as_ref().map(|s| s.time(&hb.device_id, hb.seq)),
        }
    }

    /// A `FlightNode` as the store reports it (at start, and on every change): keeps its spec,
    /// re-evaluates its status when the spec changed, and watches it when another replica
    /// serves it or served it ([`Sessions::watch`]).
    pub fn node_seen(&self, node: &crate::api::flightnode::FlightNode) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if self
            .sessions
            .specs()
            .set(&name, crate::decide::status::SpecView::of(node))
        {
            self.spec_changed(&name);
        }
        if let Some(status) = &node.status {
            self.sessions.watch(&name, status, Instant::now());
        }
    }

    /// Re-evaluates a drone whose spec changed (desired firmware version).
    pub fn spec_changed(&self, name: &str) {
        if let Some(e) = self.sessions.spec_changed(name, Instant::now()) {
            self.scheduler.enqueue(&e);
        }
    }
}
