//! Prometheus metrics (prometheus-client), served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// Label of write results: `ok`, `throttled`, `retryable`, `not_found`, `permanent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The result.
    pub result: String,
}

/// Labels of the drones-by-condition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    /// Condition type.
    pub condition: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
}

/// Every hub metric.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Heartbeats received, by result (`ok`, `invalid`, `denied`).
    pub heartbeats: Family<ResultLabel, Counter>,
    /// Status writes, by result.
    pub status_writes: Family<ResultLabel, Counter>,
    /// Status write latency.
    pub write_duration: Histogram,
    /// Drones by condition (set at scrape time).
    pub drones: Family<ConditionLabel, Gauge>,
    /// Drones with a pending write.
    pub queue_depth: Gauge,
    /// Writes that found no `FlightNode`.
    pub missing: Counter,
    /// `FlightNode`s created by auto-registration.
    pub registered: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flightnode_hub");
        let heartbeats = Family::<ResultLabel, Counter>::default();
        let status_writes = Family::<ResultLabel, Counter>::default();
        let write_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let drones = Family::<ConditionLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let missing = Counter::default();
        let registered = Counter::default();
        registry.register(
            "heartbeats_received",
            "Heartbeats received, by result",
            heartbeats.clone(),
        );
        registry.register(
            "status_writes",
            "FlightNode status writes, by result",
            status_writes.clone(),
        );
        registry.register(
            "status_write_duration_seconds",
            "Latency of FlightNode status writes",
            write_duration.clone(),
        );
        registry.register("drones", "Drones by condition and status", drones.clone());
        registry.register(
            "write_queue_depth",
            "Drones with a status write pending",
            queue_depth.clone(),
        );
        registry.register(
            "flightnode_missing",
            "Status writes that found no FlightNode",
            missing.clone(),
        );
        registry.register(
            "flightnodes_registered",
            "FlightNodes created by auto-registration",
            registered.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            heartbeats,
            status_writes,
            write_duration,
            drones,
            queue_depth,
            missing,
            registered,
        }
    }

    /// The status-writes counter for one result.
    pub fn writes(&self, result: &str) -> Counter {
        self.status_writes
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .clone()
    }

    /// The heartbeats counter for one result.
    pub fn heartbeat(&self, result: &str) -> Counter {
        self.heartbeats
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .clone()
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
