//! Status sinks: where `FlightNode` status goes. [`super::kube`] writes to the Kubernetes API
//! with server-side apply; [`super::local`] keeps objects and event logs in an embedded sled
//! store.

use crate::api::flightnode::FlightNodeStatus;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One phase transition reported by an agent, as the hub records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// Agent event sequence (monotonic per agent state dir).
    pub seq: u64,
    /// When the agent recorded it (RFC 3339 with milliseconds; empty when the agent sent none).
    pub time: String,
    /// Upgrade id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upgrade_id: String,
    /// Phase entered, CamelCase (`Downloading`, …, `Idle` when the upgrade ended).
    pub phase: String,
    /// How the upgrade ended, CamelCase, when it ended.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result: String,
    /// Error code (snake_case contract string).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_code: String,
    /// Message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl EventRecord {
    /// From the wire.
    pub fn from_proto(e: &flightnode_proto::v1::Event) -> Self {
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.time_unix_ms) * 1_000_000)
            .ok()
            .filter(|_| e.time_unix_ms > 0)
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        let phase = if e.phase.is_empty() {
            "idle"
        } else {
            e.phase.as_str()
        };
        EventRecord {
            seq: e.seq,
            time,
            upgrade_id: e.upgrade_id.clone(),
            phase: crate::decide::status::camel_case(phase),
            result: crate::decide::status::camel_case(&e.result),
            error_code: e.error_code.clone(),
            message: e.message.clone(),
        }
    }
}

/// One status write.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRequest {
    /// `FlightNode` name.
    pub name: String,
    /// Device id the status is about.
    pub device_id: String,
    /// Hardware id from the heartbeat (for creating a missing object).
    pub hardware_id: String,
    /// The full status (the apply body carries only this).
    pub status: FlightNodeStatus,
    /// Events not yet durably recorded, oldest first.
    pub events: Vec<EventRecord>,
}

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The `FlightNode` does not exist (404).
    #[error("flightnode not found")]
    NotFound,
    /// Worth retrying: 429, 409, 5xx, timeouts, connection failures.
    #[error("retryable ({code}): {message}")]
    Retryable {
        /// HTTP status, 0 for transport errors.
        code: u16,
        /// Server-requested delay (`Retry-After` or `details.retryAfterSeconds`).
        retry_after: Option<Duration>,
        /// What failed.
        message: String,
    },
    /// Not worth retrying (400, 403, 422, …).
    #[error("failed ({code}): {message}")]
    Permanent {
        /// HTTP status.
        code: u16,
        /// What failed.
        message: String,
    },
}

impl WriteError {
    /// Metric label: `not_found`, `retryable`, `permanent`.
    pub fn label(&self) -> &'static str {
        match self {
            WriteError::NotFound => "not_found",
            WriteError::Retryable { code: 429, .. } => "throttled",
            WriteError::Retryable { .. } => "retryable",
            WriteError::Permanent { .. } => "permanent",
        }
    }
}

/// Where statuses are written.
pub trait StatusSink: Send + Sync + 'static {
    /// Writes one status (and, where the sink keeps them, its events); returns once durable.
    fn write_status<'a>(&'a self, req: &'a WriteRequest) -> BoxFuture<'a, Result<(), WriteError>>;

    /// Creates the `FlightNode` for a drone (auto-registration). An existing object is success.
    fn create<'a>(&'a self, name: &'a str, hardware_id: &'a str) -> BoxFuture<'a, Result<(), WriteError>>;

    /// `kube` or `local`.
    fn kind(&self) -> &'static str;
}
