//! The MQTT link (to be implemented): commands in on `firmware/<id>/upgrade`, reports out on
//! `firmware/<id>/status`.
#![allow(unused_variables, missing_docs)]

use crate::config::MqttConfig;
use flightnode_proto::mqtt::{Command, StatusMessage};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What arrived on the upgrade topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A valid command.
    Command(Command),
    /// A payload that is not a command, with the reason.
    Malformed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{0}")]
    Setup(String),
}

/// Runs the link until `shutdown`.
pub async fn run(
    cfg: MqttConfig,
    device_id: String,
    inbound: mpsc::Sender<Inbound>,
    outbound: mpsc::Receiver<StatusMessage>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), MqttError> {
    todo!()
}
