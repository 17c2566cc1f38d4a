//! The local control socket (`state_dir/agent.sock`, owner-only): `status`, `install` and
//! `mark-good`/`mark-bad` keep working while the daemon holds the state store.
//!
//! Protocol: one JSON request line, then JSON response lines until the server closes:
//! `{"op":"status"}` → `{"status":{…}}`;
//! `{"op":"install","source":"…","allow_downgrade":false,"upgrade_id":null}` →
//! `{"progress":{"bytes":…,"total":…}}`… then `{"done":{…last upgrade…}}`, `{"outcome":"…"}` or `{"error":{…}}`;
//! `{"op":"mark","slot":"a","good":true}` → `{"message":"…"}` or `{"error":{…}}`.

use flightnode_proto::Slot;
use flightnode_proto::status::{DeviceStatus, LastUpgrade, Progress};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Largest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Socket path for a state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `status`.
    Status,
    /// `install SOURCE`.
    Install {
        /// Path or URL.
        source: String,
        /// Allow a lower version.
        #[serde(default)]
        allow_downgrade: bool,
        /// Upgrade id (derived from the source when absent).
        #[serde(default)]
        upgrade_id: Option<String>,
    },
    /// `mark-good` / `mark-bad`.
    Mark {
        /// Slot.
        slot: Slot,
        /// Good or bad.
        good: bool,
    },
}

/// A response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The device status.
    Status(Box<DeviceStatus>),
    /// Install progress.
    Progress(Progress),
    /// The install ended.
    Done(LastUpgrade),
    /// The install stopped without ending (awaiting reboot, paused).
    Outcome(String),
    /// A message (mark).
    Message(String),
    /// Refused or failed.
    Error {
        /// Contract code.
        code: String,
        /// Sentence.
        message: String,
    },
}

/// Client side, used by the CLI: `None` when no daemon listens (then the CLI works on the store itself).
pub fn connect(state_dir: &Path) -> Option<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(socket_path(state_dir)).ok()
}

/// Sends `req` and calls `each` for every response line until the daemon closes the stream.
pub fn call(
    stream: std::os::unix::net::UnixStream,
    req: &Request,
    mut each: impl FnMut(Response),
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    writer.write_all(line.as_bytes())?;
    writer.write_all(b"\n")?;
    writer.flush()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let resp: Response = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("bad response from the daemon: {e}")))?;
        each(resp);
    }
    Ok(())
}
