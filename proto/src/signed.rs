//! What only the hub can tell a drone: upgrade and cancel commands signed for one drone, and the
//! hub's clock (Uptane's director role).
//!
//! Anyone with a broker credential can publish on `firmware/<id>/upgrade`; a bundle signature
//! proves the image, not that this drone should install it now. So the hub signs each command
//! with its command key (ed25519, kept in a Kubernetes Secret or a file), for one device and a
//! validity window, and the agent accepts a command only when it verifies with a configured hub
//! key, names this device and is inside its window.
//!
//! The command side ([`crate::mqtt::Envelope`], [`crate::mqtt::sign_command`]) lives with the
//! commands; this module only knows signatures, so it imports nothing of them.
//!
//! # Signed command (JSON on the upgrade topic)
//! `{"type":"signed","command":"<body>","key_id":"<id>","signature":"<base64>"}`, where `body`
//! is the JSON text of an upgrade or cancel command ([`crate::mqtt`]) that also carries
//! `device_id`, `issued_at` and `not_after` (unix seconds). The ed25519 signature covers
//! [`COMMAND_CONTEXT`] followed by the exact bytes of `body`, so what is verified is what is
//! parsed: no canonical JSON is needed.
//!
//! # Signed time ([`crate::v1::SignedTime`], in every heartbeat response)
//! Over [`TIME_CONTEXT`], the device id, the heartbeat's `seq` and the hub's unix milliseconds:
//! it cannot be replayed to another drone, nor as the answer to a later heartbeat.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::Digest as _;

/// Prefix of every signed command body: a command signature can never pass for anything else
/// signed with the same key (a time, a bundle manifest).
pub const COMMAND_CONTEXT: &[u8] = b"flightnode-command-v1\n";
/// Prefix of every signed time.
pub const TIME_CONTEXT: &[u8] = b"flightnode-time-v1\n";
/// Longest validity the hub gives a command by default: long enough for a drone that was
/// offline for a flight to pick it up, short enough that a captured command goes stale.
pub const DEFAULT_VALIDITY_SECS: u64 = 24 * 3600;

/// Id of a public key: lower-case hex of the first 8 bytes of sha256 over its raw 32 bytes.
/// It only selects which key to verify with; trust comes from the signature.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// The hub's signature on a command, as parsed from the wire (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSignature {
    /// The device the hub signed the command for.
    pub device_id: String,
    /// Unix seconds when the hub signed it.
    pub issued_at: u64,
    /// Unix seconds after which the command is void.
    pub not_after: u64,
    /// Which hub key signed it.
    pub key_id: String,
    pub(crate) signature: Signature,
    pub(crate) body: String,
}

impl CommandSignature {
    /// True when `key` made this signature over the command body.
    pub fn verifies_with(&self, key: &VerifyingKey) -> bool {
        key.verify(&command_message(&self.body), &self.signature).is_ok()
    }
}

fn command_message(body: &str) -> Vec<u8> {
    [COMMAND_CONTEXT, body.as_bytes()].concat()
}

pub(crate) fn decode_signature(b64: &str) -> Option<Signature> {
    let bytes = BASE64.decode(b64.trim()).ok()?;
    Signature::from_slice(&bytes).ok()
}

/// The signed-command payload for `body` (the JSON text of a command with its device and
/// validity window), signed by `key`.
pub(crate) fn sign_body(body: &str, key: &SigningKey) -> String {
    let signature = key.sign(&command_message(body));
    serde_json::json!({
        "type": "signed",
        "command": body,
        "key_id": key_id(&key.verifying_key()),
        "signature": BASE64.encode(signature.to_bytes()),
    })
    .to_string()
}

fn time_message(device_id: &str, seq: u64, unix_ms: i64) -> Vec<u8> {
    let mut m = TIME_CONTEXT.to_vec();
    m.extend_from_slice(format!("{device_id}\n{seq}\n{unix_ms}").as_bytes());
    m
}

/// The hub's clock for `device_id`, answering the heartbeat numbered `seq`.
pub fn sign_time(device_id: &str, seq: u64, unix_ms: i64, key: &SigningKey) -> crate::v1::SignedTime {
    crate::v1::SignedTime {
        unix_ms,
        seq,
        key_id: key_id(&key.verifying_key()),
        signature: key
            .sign(&time_message(device_id, seq, unix_ms))
            .to_bytes()
            .to_vec(),
    }
}

/// True when `key` signed `time` for `device_id` as the answer to heartbeat `seq`.
pub fn time_verifies(time: &crate::v1::SignedTime, device_id: &str, seq: u64, key: &VerifyingKey) -> bool {
    let Ok(signature) = Signature::from_slice(&time.signature) else {
        return false;
    };
    time.seq == seq
        && key
            .verify(&time_message(device_id, seq, time.unix_ms), &signature)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{Command, UpgradeCommand, parse_envelope, sign_command};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn upgrade() -> Command {
        Command::Upgrade(UpgradeCommand {
            upgrade_id: "r-1".into(),
            url: "https://fw.example/fw-1.4.0.fnb".into(),
            version: None,
            allow_downgrade: false,
        })
    }

    #[test]
    fn a_signed_command_parses_back_and_verifies_only_with_its_key() {
        let payload = sign_command(&upgrade(), "drone-1", 100, 200, &key(1));
        let env = parse_envelope(payload.as_bytes(), "drone-1").unwrap();
        assert_eq!(env.command, upgrade());
        let sig = env.signature.unwrap();
        assert_eq!(
            (sig.device_id.as_str(), sig.issued_at, sig.not_after),
            ("drone-1", 100, 200)
        );
        assert_eq!(sig.key_id, key_id(&key(1).verifying_key()));
        assert!(sig.verifies_with(&key(1).verifying_key()));
        assert!(!sig.verifies_with(&key(2).verifying_key()));
    }

    #[test]
    fn an_altered_body_no_longer_verifies() {
        let payload = sign_command(&upgrade(), "drone-1", 100, 200, &key(1));
        let forged = payload.replace("fw-1.4.0", "fw-0.9.0");
        let env = parse_envelope(forged.as_bytes(), "drone-1").unwrap();
        assert!(!env.signature.unwrap().verifies_with(&key(1).verifying_key()));
    }

    #[test]
    fn signed_time_is_bound_to_device_and_heartbeat() {
        let t = sign_time("drone-1", 7, 1_700_000_000_000, &key(3));
        let k = key(3).verifying_key();
        assert!(time_verifies(&t, "drone-1", 7, &k));
        assert!(!time_verifies(&t, "drone-2", 7, &k));
        assert!(!time_verifies(&t, "drone-1", 8, &k));
        assert!(!time_verifies(&t, "drone-1", 7, &key(4).verifying_key()));
    }
}
