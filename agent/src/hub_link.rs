//! The hub link (to be implemented): heartbeats over gRPC with the outbox's unacknowledged events.
#![allow(unused_variables, missing_docs)]

use crate::config::HubConfig;
use crate::outbox::Outbox;
use crate::state::DeviceState;
use flightnode_proto::status::Progress;
use std::path::PathBuf;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Who is heartbeating.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_id: String,
    pub hardware: String,
    pub agent_version: String,
    pub boot_id: String,
    pub state_dir: PathBuf,
}

/// TLS material: CA, client certificate, client key (PEM files).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubLinkError {
    #[error("{0}")]
    Setup(String),
}

/// Runs the link until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: HubConfig,
    tls: Tls,
    info: DeviceInfo,
    state: watch::Receiver<DeviceState>,
    progress: watch::Receiver<Option<Progress>>,
    outbox: Outbox,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), HubLinkError> {
    todo!()
}
