//! The event outbox (to be implemented): phase transitions kept in sled until the hub acknowledges them.
#![allow(unused_variables, missing_docs)]

use serde::{Deserialize, Serialize};

/// One phase transition, as sent in `HeartbeatRequest.events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time_unix_ms: i64,
    pub upgrade_id: String,
    pub phase: String,
    pub result: String,
    pub error_code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: {0}")]
    Sled(#[from] sled::Error),
}

#[derive(Clone)]
pub struct Outbox;

impl Outbox {
    pub fn open(db: &sled::Db, cap: usize) -> Result<Self, OutboxError> {
        todo!()
    }
    pub fn push(&self, event: &Event) -> Result<(), OutboxError> {
        todo!()
    }
}
