//! The hub's command key: what makes a command on `firmware/<id>/upgrade` one that only the
//! hub could have sent ([`flightnode_proto::signed`]).
//!
//! The key is an ed25519 private key in PKCS#8 PEM (`openssl genpkey -algorithm ed25519`, or a
//! release key pair's format), mounted from a Kubernetes Secret in a cluster or a file on a
//! laptop. With it, every upgrade and cancel the hub publishes is signed for its one drone and
//! valid for `validity`, and every heartbeat response carries the hub's signed time. The
//! drones list the matching public key in `[commands] hub_keys`.

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use flightnode_proto::mqtt::Command;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Error;

/// Signs commands and time with the hub's command key.
#[derive(Clone)]
pub struct CommandSigner {
    key: SigningKey,
    validity: Duration,
}

impl std::fmt::Debug for CommandSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSigner")
            .field("key_id", &self.key_id())
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl CommandSigner {
    /// Loads the PKCS#8 PEM key at `path`; commands it signs are valid for `validity`.
    pub fn load(path: &Path, validity: Duration) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|e| {
            Error::Invalid(format!(
                "command key {}: not a PKCS#8 PEM ed25519 private key ({e}); make one with \
                 `openssl genpkey -algorithm ed25519 -out command.key`",
                path.display()
            ))
        })?;
        Ok(Self::new(key, validity))
    }

    /// Signs with `key`.
    pub fn new(key: SigningKey, validity: Duration) -> Self {
        Self { key, validity }
    }

    /// The id the drones know the key by (`hub_keys`).
    pub fn key_id(&self) -> String {
        flightnode_proto::signed::key_id(&self.key.verifying_key())
    }

    /// The payload to publish for `cmd` to `device_id`: signed for it, valid from now.
    pub fn command_payload(&self, device_id: &str, cmd: &Command) -> String {
        let now = unix_now().as_secs();
        flightnode_proto::mqtt::sign_command(
            cmd,
            device_id,
            now,
            now.saturating_add(self.validity.as_secs()),
            &self.key,
        )
    }

    /// The hub's time for `device_id`, answering its heartbeat `seq`.
    pub fn time(&self, device_id: &str, seq: u64) -> flightnode_proto::v1::SignedTime {
        let ms = i64::try_from(unix_now().as_millis()).unwrap_or(i64::MAX);
        flightnode_proto::signed::sign_time(device_id, seq, ms, &self.key)
    }
}

/// The payload for `cmd` to `device_id`: signed when the hub has a command key, the plain JSON
/// form otherwise (which drones obey only with `insecure_accept_unsigned`).
pub fn payload(signer: Option<&CommandSigner>, device_id: &str, cmd: &Command) -> String {
    match signer {
        Some(s) => s.command_payload(device_id, cmd),
        None => cmd.to_json(Some(device_id)),
    }
}
