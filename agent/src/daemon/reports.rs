//! Status reports for `firmware/<id>/status`: built from the device state, numbered with a
//! sequence that keeps growing across restarts.

use crate::state::DeviceState;
use crate::store::Durable;
use flightnode_proto::Phase;
use flightnode_proto::error::chain;
use flightnode_proto::mqtt::{Running, StatusError, StatusMessage};
use flightnode_proto::status::{LastUpgrade, Progress};

const SEQ_KEY: &[u8] = b"report_seq";
/// Sequence numbers reserved per sled write: a restart skips at most this many.
const SEQ_BLOCK: u64 = 1000;

/// Hands out report sequence numbers: a block is reserved durably, then used from memory.
pub struct Sequencer {
    tree: sled::Tree,
    store: Durable,
    next: u64,
    reserved: u64,
}

impl Sequencer {
    /// Opens the counter in `store`.
    pub fn open(store: &Durable) -> Result<Self, sled::Error> {
        let tree = store.db().open_tree("meta")?;
        let start = tree
            .get(SEQ_KEY)?
            .and_then(|v| v.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Self {
            tree,
            store: store.clone(),
            next: start,
            reserved: start,
        })
    }

    /// The next sequence number. A new block is synced before its first number is used: a
    /// power cut must not make the numbers start over below what consumers already kept.
    pub fn take(&mut self) -> u64 {
        if self.next >= self.reserved {
            self.reserved = self.next + SEQ_BLOCK;
            let saved = self
                .tree
                .insert(SEQ_KEY, &self.reserved.to_be_bytes())
                .map_err(|e| e.to_string())
                .and_then(|_| self.store.sync().map_err(|e| chain(&e)));
            if let Err(e) = saved {
                tracing::warn!("cannot persist the report sequence: {e}");
            }
        }
        self.next += 1;
        self.next
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn running(state: &DeviceState) -> Running {
    Running {
        version: state.committed_version.to_string(),
        slot: state.active,
    }
}

/// A report of the upgrade in flight, or of the last one when idle.
pub fn current(device_id: &str, seq: u64, state: &DeviceState, progress: Option<Progress>) -> StatusMessage {
    match (&state.upgrade, &state.last) {
        (Some(u), _) => StatusMessage {
            device_id: device_id.into(),
            seq,
            timestamp: now_ms(),
            upgrade_id: Some(u.id.clone()),
            phase: u.phase,
            wait_reason: u.wait_reason(),
            progress: progress.or_else(|| {
                u.manifest.as_ref().map(|m| Progress {
                    bytes: u.written,
                    total: m.image.size,
                })
            }),
            result: None,
            error: u.error.as_ref().map(StatusError::from),
            running: running(state),
        },
        (None, Some(last)) => finished(device_id, seq, state, last),
        (None, None) => StatusMessage {
            device_id: device_id.into(),
            seq,
            timestamp: now_ms(),
            upgrade_id: None,
            phase: Phase::Idle,
            wait_reason: None,
            progress: None,
            result: None,
            error: None,
            running: running(state),
        },
    }
}

/// The final report of an upgrade that ended.
pub fn finished(device_id: &str, seq: u64, state: &DeviceState, last: &LastUpgrade) -> StatusMessage {
    StatusMessage {
        device_id: device_id.into(),
        seq,
        timestamp: now_ms(),
        upgrade_id: Some(last.upgrade_id.clone()),
        phase: Phase::Idle,
        wait_reason: None,
        progress: None,
        result: Some(last.result),
        error: last.error.as_ref().map(StatusError::from),
        running: running(state),
    }
}

/// A refusal of a command that never became an upgrade (`busy`, `malformed`, refused by the
/// engine): `result` is `rejected` when the command named an upgrade. The phase and wait reason
/// are those of whatever is in flight: the report is retained, and says what the drone does now.
pub fn refused(
    device_id: &str,
    seq: u64,
    state: &DeviceState,
    upgrade_id: Option<String>,
    error: StatusError,
) -> StatusMessage {
    StatusMessage {
        device_id: device_id.into(),
        seq,
        timestamp: now_ms(),
        phase: state.phase(),
        wait_reason: state
            .upgrade
            .as_ref()
            .and_then(crate::state::Upgrade::wait_reason),
        progress: None,
        result: upgrade_id
            .is_some()
            .then_some(flightnode_proto::UpgradeResult::Rejected),
        upgrade_id,
        error: Some(error),
        running: running(state),
    }
}
