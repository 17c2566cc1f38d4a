//! MQTT: commands on `firmware/<device_id>/upgrade`, reports on `firmware/<device_id>/status`.
//!
//! # Commands (QoS 1, at most [`MAX_COMMAND_BYTES`])
//! - a bare bundle URL, `https://…/fw-1.4.0.fnb` — the form existing operators publish; its
//!   upgrade id is [`derive_upgrade_id`] of the payload, so a redelivery is the same upgrade;
//! - `{"type":"upgrade","upgrade_id":"…","url":"…","version":"1.4.0","allow_downgrade":false}`
//!   (`version` and `allow_downgrade` optional);
//! - `{"type":"cancel","upgrade_id":"…"}`.
//!
//! Either JSON form may carry `"device_id"`, which must then be the receiving device. Unknown
//! fields are rejected.
//!
//! # Reports (QoS 1, retained): [`StatusMessage`] as JSON.
//!
//! One on every phase change, and one of the current state each time the device has connected
//! and subscribed (also after a reconnect): an idle drone's retained status is there for whoever
//! subscribes, even after a broker lost its retained messages. A consumer keeps the highest `seq`.

use crate::codes::{ErrorCode, UpgradeResult};
use crate::signed::{CommandSignature, decode_signature, sign_body};
use crate::status::{ErrorReport, Phase, Progress, Slot, WaitReason};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Largest accepted command payload.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Longest accepted bundle URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest accepted upgrade id.
pub const MAX_UPGRADE_ID_BYTES: usize = 128;

/// Topic the device subscribes to.
pub fn upgrade_topic(device_id: &str) -> String {
    format!("firmware/{device_id}/upgrade")
}

/// Topic the device publishes its reports on.
pub fn status_topic(device_id: &str) -> String {
    format!("firmware/{device_id}/status")
}

/// A deterministic upgrade id for a command that carries none (a bare URL, a local install):
/// the same payload always names the same upgrade.
pub fn derive_upgrade_id(payload: &str) -> String {
    let digest = sha2::Sha256::digest(payload.trim().as_bytes());
    format!("u-{}", &hex::encode(digest)[..16])
}

/// Install a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeCommand {
    /// Upgrade id: redelivery of the same id never restarts anything.
    pub upgrade_id: String,
    /// Bundle URL.
    pub url: String,
    /// Version the operator expects (informational; the signed manifest decides).
    pub version: Option<semver::Version>,
    /// Allow a lower version for this install.
    pub allow_downgrade: bool,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Install a bundle.
    Upgrade(UpgradeCommand),
    /// Cancel an upgrade, if it has not been activated yet.
    Cancel {
        /// The upgrade to cancel.
        upgrade_id: String,
    },
}

impl Command {
    /// The upgrade id the command is about.
    pub fn upgrade_id(&self) -> &str {
        match self {
            Command::Upgrade(u) => &u.upgrade_id,
            Command::Cancel { upgrade_id } => upgrade_id,
        }
    }

    /// JSON payload for this command (what `flightnode-hub upgrade` publishes).
    pub fn to_json(&self, device_id: Option<&str>) -> String {
        serde_json::to_string(&self.wire(device_id, None)).unwrap_or_default()
    }

    /// The wire form, naming `device_id` and carrying a validity `window` (issued_at, not_after)
    /// when given.
    fn wire(&self, device_id: Option<&str>, window: Option<(u64, u64)>) -> Wire {
        let device_id = device_id.map(str::to_owned);
        let (issued_at, not_after) = (window.map(|w| w.0), window.map(|w| w.1));
        match self {
            Command::Upgrade(u) => Wire::Upgrade {
                upgrade_id: u.upgrade_id.clone(),
                url: u.url.clone(),
                version: u.version.as_ref().map(ToString::to_string),
                allow_downgrade: u.allow_downgrade,
                device_id,
                issued_at,
                not_after,
            },
            Command::Cancel { upgrade_id } => Wire::Cancel {
                upgrade_id: upgrade_id.clone(),
                device_id,
                issued_at,
                not_after,
            },
        }
    }

    /// What an upgrade id is bound to: the bundle URL of an upgrade. A signed upgrade id is
    /// never accepted for a second target. `None` for a cancel.
    pub fn target(&self) -> Option<&str> {
        match self {
            Command::Upgrade(u) => Some(&u.url),
            Command::Cancel { .. } => None,
        }
    }
}

/// A command as it arrived: what it says, and the hub's signature when it carried one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The command.
    pub command: Command,
    /// `None` for the unsigned forms (a bare URL, plain JSON).
    pub signature: Option<CommandSignature>,
}

/// The payload to publish for `command`, signed by `key` for `device_id`, valid from
/// `issued_at` until `not_after` (unix seconds) ([`crate::signed`]).
pub fn sign_command(
    command: &Command,
    device_id: &str,
    issued_at: u64,
    not_after: u64,
    key: &ed25519_dalek::SigningKey,
) -> String {
    let body = command.wire(Some(device_id), Some((issued_at, not_after)));
    sign_body(&serde_json::to_string(&body).unwrap_or_default(), key)
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    Upgrade {
        upgrade_id: String,
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        #[serde(default)]
        allow_downgrade: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_at: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_after: Option<u64>,
    },
    Cancel {
        upgrade_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_at: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_after: Option<u64>,
    },
    /// A hub-signed command ([`crate::signed`]): `command` is the JSON text of the body.
    Signed {
        command: String,
        key_id: String,
        signature: String,
    },
}

/// Why a payload is not a command; reported with code `malformed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn check_url(url: &str) -> Result<(), Malformed> {
    if url.len() > MAX_URL_BYTES {
        return Err(Malformed(format!(
            "url is {} bytes, over the {MAX_URL_BYTES}-byte cap",
            url.len()
        )));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "https://".len() {
        return Err(Malformed(format!(
            "url {url:?} is not an http:// or https:// URL"
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Malformed("url contains whitespace or control characters".into()));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), Malformed> {
    if id.is_empty() || id.len() > MAX_UPGRADE_ID_BYTES {
        return Err(Malformed(format!(
            "upgrade_id must be 1 to {MAX_UPGRADE_ID_BYTES} bytes"
        )));
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Malformed(format!(
            "upgrade_id {id:?} must be printable ASCII without spaces"
        )));
    }
    Ok(())
}

/// Parses a payload from `firmware/<device_id>/upgrade`, strictly, dropping a hub signature
/// unchecked: for payloads whose authority is settled (a command this drone already accepted
/// and kept). What arrives from the broker goes through [`parse_envelope`].
pub fn parse_command(payload: &[u8], device_id: &str) -> Result<Command, Malformed> {
    parse_envelope(payload, device_id).map(|e| e.command)
}

/// Parses a payload from `firmware/<device_id>/upgrade`, strictly: the command and, for the
/// signed form, the hub's signature (not verified here: the receiver holds the keys and the
/// trusted clock). An unsigned command naming another device is malformed; a signed one is
/// returned with the device it was signed for, so the refusal can say so.
pub fn parse_envelope(payload: &[u8], device_id: &str) -> Result<Envelope, Malformed> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(Malformed(format!(
            "payload is {} bytes, over the {MAX_COMMAND_BYTES}-byte cap",
            payload.len()
        )));
    }
    let text = std::str::from_utf8(payload).map_err(|e| Malformed(format!("payload is not UTF-8: {e}")))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(Malformed("payload is empty".into()));
    }
    if !trimmed.starts_with('{') {
        check_url(trimmed)?;
        return Ok(Envelope {
            command: Command::Upgrade(UpgradeCommand {
                upgrade_id: derive_upgrade_id(trimmed),
                url: trimmed.to_owned(),
                version: None,
                allow_downgrade: false,
            }),
            signature: None,
        });
    }
    let wire: Wire =
        serde_json::from_str(trimmed).map_err(|e| Malformed(format!("invalid command JSON: {e}")))?;
    let Wire::Signed {
        command: body,
        key_id,
        signature,
    } = wire
    else {
        let (command, target, window) = from_wire(wire)?;
        if window.is_some() {
            return Err(Malformed(
                "issued_at and not_after belong inside a signed command only".into(),
            ));
        }
        if let Some(id) = target.filter(|id| id != device_id) {
            return Err(Malformed(format!(
                "command is for device {id:?}, this is {device_id:?}"
            )));
        }
        return Ok(Envelope {
            command,
            signature: None,
        });
    };
    let signature = decode_signature(&signature)
        .ok_or_else(|| Malformed("signature is not a base64 ed25519 signature (64 bytes)".into()))?;
    let inner: Wire =
        serde_json::from_str(&body).map_err(|e| Malformed(format!("invalid signed command JSON: {e}")))?;
    if matches!(inner, Wire::Signed { .. }) {
        return Err(Malformed(
            "a signed command cannot wrap another signed command".into(),
        ));
    }
    let (command, target, window) = from_wire(inner)?;
    let (Some(signed_for), Some((issued_at, not_after))) = (target, window) else {
        return Err(Malformed(
            "a signed command must name device_id, issued_at and not_after".into(),
        ));
    };
    Ok(Envelope {
        command,
        signature: Some(CommandSignature {
            device_id: signed_for,
            issued_at,
            not_after,
            key_id,
            signature,
            body,
        }),
    })
}

/// An upgrade or cancel from the wire: the command, the device it names and its validity
/// window (both of `issued_at` and `not_after`, or neither).
type FromWire = (Command, Option<String>, Option<(u64, u64)>);

fn from_wire(wire: Wire) -> Result<FromWire, Malformed> {
    let window = |issued_at: Option<u64>, not_after: Option<u64>| match (issued_at, not_after) {
        (None, None) => Ok(None),
        (Some(i), Some(n)) if i <= n => Ok(Some((i, n))),
        (Some(_), Some(_)) => Err(Malformed("not_after is before issued_at".into())),
        _ => Err(Malformed("issued_at and not_after go together".into())),
    };
    match wire {
        Wire::Upgrade {
            upgrade_id,
            url,
            version,
            allow_downgrade,
            device_id,
            issued_at,
            not_after,
        } => {
            check_id(&upgrade_id)?;
            check_url(&url)?;
            let version = version
                .map(|v| {
                    v.parse::<semver::Version>()
                        .map_err(|e| Malformed(format!("version {v:?}: {e}")))
                })
                .transpose()?;
            let command = Command::Upgrade(UpgradeCommand {
                upgrade_id,
                url,
                version,
                allow_downgrade,
            });
            Ok((command, device_id, window(issued_at, not_after)?))
        }
        Wire::Cancel {
            upgrade_id,
            device_id,
            issued_at,
            not_after,
        } => {
            check_id(&upgrade_id)?;
            Ok((
                Command::Cancel { upgrade_id },
                device_id,
                window(issued_at, not_after)?,
            ))
        }
        Wire::Signed { .. } => Err(Malformed("a signed command cannot be nested".into())),
    }
}

/// The upgrade id a payload that [`parse_command`] refused still names: a JSON object with a
/// valid `upgrade_id` string (whatever else is wrong with it), so the refusal can be reported
/// against that upgrade. `None` for anything else (a bare URL names no id of its own).
pub fn named_upgrade_id(payload: &[u8]) -> Option<String> {
    if payload.len() > MAX_COMMAND_BYTES {
        return None;
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    if let Some(body) = object.get("command").and_then(serde_json::Value::as_str) {
        object = serde_json::from_str(body).ok()?;
    }
    let id = object.get("upgrade_id")?.as_str()?;
    check_id(id).ok()?;
    Some(id.to_owned())
}

/// What is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Running {
    /// Committed version.
    pub version: String,
    /// Active slot.
    pub slot: Slot,
}

/// A report on `firmware/<device_id>/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusMessage {
    /// The reporting device.
    pub device_id: String,
    /// Monotonic per device (survives restarts); a consumer keeps the highest.
    pub seq: u64,
    /// Unix milliseconds when the report was made.
    pub timestamp: u64,
    /// The upgrade the report is about; `None` for a payload that named none (malformed; see
    /// [`named_upgrade_id`]).
    pub upgrade_id: Option<String>,
    /// Phase of that upgrade; `idle` once it ended.
    pub phase: Phase,
    /// Why the upgrade waits, in phase `waiting` (absent otherwise). A reason this build does not
    /// know (a newer agent's) decodes as `None` instead of failing the whole report.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_wait_reason"
    )]
    pub wait_reason: Option<WaitReason>,
    /// Download progress.
    pub progress: Option<Progress>,
    /// How it ended, once it ended; `rejected` for a refused command that named an upgrade.
    pub result: Option<UpgradeResult>,
    /// Why, when it did not commit (or the command was refused: `busy`, `malformed`).
    pub error: Option<StatusError>,
    /// What runs now.
    pub running: Running,
}

/// An error in a report: an [`ErrorCode`] or `malformed` for a refused command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusError {
    /// `malformed` or an [`ErrorCode`] string.
    pub code: String,
    /// The sentence.
    pub message: String,
}

impl From<&ErrorReport> for StatusError {
    fn from(e: &ErrorReport) -> Self {
        StatusError {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
        }
    }
}

impl StatusError {
    /// A refused command payload.
    pub fn malformed(message: String) -> Self {
        StatusError {
            code: "malformed".into(),
            message,
        }
    }

    /// A command that was understood but not obeyed.
    pub fn refused(code: crate::codes::CommandRefusal, message: String) -> Self {
        StatusError {
            code: code.as_str().into(),
            message,
        }
    }

    /// From a contract code.
    pub fn code(code: ErrorCode, message: String) -> Self {
        StatusError {
            code: code.as_str().into(),
            message,
        }
    }
}

/// `wait_reason` as a string: a known reason, else `None`.
fn lenient_wait_reason<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<WaitReason>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.as_deref().and_then(WaitReason::parse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_wait_reason_does_not_break_the_report() {
        let mut v = serde_json::json!({
            "device_id": "d1", "seq": 1, "timestamp": 2, "upgrade_id": "u1",
            "phase": "waiting", "wait_reason": "metered_link", "progress": null,
            "result": null, "error": null,
            "running": {"slot": "a", "version": "1.0.0"}
        });
        let known: StatusMessage = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(known.wait_reason, Some(WaitReason::MeteredLink));
        v["wait_reason"] = "solar_eclipse".into();
        let unknown: StatusMessage = serde_json::from_value(v).unwrap();
        assert_eq!(unknown.wait_reason, None);
    }

    #[test]
    fn bare_url_gets_a_stable_id() {
        let a = parse_command(b"https://fw.example/1.fnb\n", "d1").unwrap();
        let b = parse_command(b"https://fw.example/1.fnb", "d1").unwrap();
        assert_eq!(a, b);
        assert!(a.upgrade_id().starts_with("u-"));
    }

    #[test]
    fn json_round_trip_and_strictness() {
        let cmd = Command::Upgrade(UpgradeCommand {
            upgrade_id: "up-1".into(),
            url: "http://h/b.fnb".into(),
            version: Some(semver::Version::new(1, 2, 3)),
            allow_downgrade: true,
        });
        assert_eq!(
            parse_command(cmd.to_json(Some("d1")).as_bytes(), "d1").unwrap(),
            cmd
        );
        let cancel = Command::Cancel {
            upgrade_id: "up-1".into(),
        };
        assert_eq!(
            parse_command(cancel.to_json(None).as_bytes(), "d1").unwrap(),
            cancel
        );

        let bad: &[&[u8]] = &[
            br#"{"type":"upgrade","upgrade_id":"x","url":"http://h/b","extra":1}"#,
            br#"{"type":"upgrade","upgrade_id":"x","url":"http://h/b","device_id":"d2"}"#,
            br#"{"type":"upgrade","upgrade_id":7,"url":"http://h/b"}"#,
            br#"{"type":"reboot"}"#,
            b"\xff\xfe",
            b"ftp://h/b",
            b"",
        ];
        for p in bad {
            assert!(
                parse_command(p, "d1").is_err(),
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        let named: &[(&[u8], Option<&str>)] = &[
            (
                br#"{"type":"upgrade","upgrade_id":"x","url":"ftp://h/b"}"#,
                Some("x"),
            ),
            (
                br#"{"type":"upgrade","upgrade_id":"x","url":"http://h/b","extra":1}"#,
                Some("x"),
            ),
            (
                br#"{"type":"upgrade","upgrade_id":"a b","url":"http://h/b"}"#,
                None,
            ),
            (br#"{"type":"upgrade","upgrade_id":7,"url":"http://h/b"}"#, None),
            (b"ftp://h/b", None),
            (b"\xff\xfe", None),
        ];
        for (p, id) in named {
            assert_eq!(
                named_upgrade_id(p).as_deref(),
                *id,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_command(deep.as_bytes(), "d1").is_err());
        let deep = format!("{{\"type\":{}{}}}", "[".repeat(5_000), "]".repeat(5_000));
        assert!(parse_command(deep.as_bytes(), "d1").is_err());
        assert!(
            parse_command(&vec![b'a'; MAX_COMMAND_BYTES + 1], "d1")
                .unwrap_err()
                .0
                .contains("cap")
        );
    }
}
