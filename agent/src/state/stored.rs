//! Tolerant decoding of the persisted [`DeviceState`]: the rule is in [`crate::state`]'s docs.
//!
//! These mirror types never reject a field they do not know, and read every enum value as
//! [`Lenient`], so a record written by a newer agent (another slot's image, shared state dir)
//! still opens. What cannot be carried on (an upgrade in an unknown phase, on an unknown slot,
//! with a manifest this agent cannot read) becomes [`Dropped`]; the engine ends it.

use super::{DeviceState, Dropped, STATE_FORMAT, SlotRecord, Upgrade, Wait};
use flightnode_proto::manifest::Manifest;
use flightnode_proto::status::{ErrorReport, LastUpgrade};
use flightnode_proto::{ErrorCode, Phase, Slot, SlotState, UpgradeResult, WaitReason};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Records written before the state carried a `format` (every release before format 2).
const FIRST_FORMAT: u32 = 1;

fn first_format() -> u32 {
    FIRST_FORMAT
}

/// An enum value as persisted: one this agent knows, or the raw value of a newer agent.
enum Lenient<T> {
    Known(T),
    Unknown(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(d)?;
        Ok(match T::deserialize(&raw) {
            Ok(known) => Lenient::Known(known),
            Err(_) => Lenient::Unknown(match raw {
                Value::String(s) => s,
                other => other.to_string(),
            }),
        })
    }
}

#[derive(Deserialize)]
struct StoredState {
    #[serde(default = "first_format")]
    format: u32,
    active: Slot,
    a: StoredSlot,
    b: StoredSlot,
    committed_version: semver::Version,
    security_floor: u64,
    #[serde(default)]
    upgrade: Option<Value>,
    #[serde(default)]
    last: Option<Value>,
    seq: u64,
    #[serde(default)]
    resumable: Option<Value>,
}

#[derive(Deserialize)]
struct StoredSlot {
    version: Option<semver::Version>,
    state: Lenient<SlotState>,
    #[serde(default)]
    floor: Option<u64>,
    #[serde(default)]
    autopilot: Option<semver::VersionReq>,
}

#[derive(Deserialize)]
struct StoredUpgrade {
    id: String,
    source: String,
    allow_downgrade: bool,
    phase: Lenient<Phase>,
    target: Lenient<Slot>,
    manifest: Option<Value>,
    image_offset: u64,
    written: u64,
    #[serde(default)]
    boot_id: Option<String>,
    #[serde(default)]
    trial_boot: Option<String>,
    #[serde(default)]
    trial_boots: u32,
    #[serde(default)]
    error: Option<StoredError>,
    #[serde(default)]
    wait: Option<StoredWait>,
}

#[derive(Deserialize)]
struct StoredWait {
    resume: Lenient<Phase>,
    reason: Lenient<WaitReason>,
    since: u64,
}

#[derive(Deserialize)]
struct StoredError {
    code: Lenient<ErrorCode>,
    message: String,
}

#[derive(Deserialize)]
struct StoredLast {
    upgrade_id: String,
    #[serde(default)]
    version: Option<String>,
    result: Lenient<UpgradeResult>,
    #[serde(default)]
    error: Option<StoredError>,
    #[serde(default)]
    finished: u64,
}

impl StoredSlot {
    fn known(self, name: char) -> SlotRecord {
        let state = match self.state {
            Lenient::Known(s) => s,
            Lenient::Unknown(raw) => {
                // Not bootable and free to overwrite: the one meaning that never boots or
                // confirms an image this agent knows nothing about.
                tracing::warn!(slot = %name, state = %raw, "slot state written by a newer agent; taken as bad");
                SlotState::Bad
            }
        };
        SlotRecord {
            version: self.version,
            state,
            floor: self.floor,
            autopilot: self.autopilot,
        }
    }
}

impl StoredError {
    /// An unknown code becomes `internal`; its name stays in the message for the operator.
    fn known(self) -> ErrorReport {
        match self.code {
            Lenient::Known(code) => ErrorReport {
                code,
                message: self.message,
            },
            Lenient::Unknown(raw) => ErrorReport {
                code: ErrorCode::Internal,
                message: format!("{} (error code `{raw}` of a newer agent)", self.message),
            },
        }
    }
}

impl StoredLast {
    fn known(self) -> LastUpgrade {
        let error = self.error.map(StoredError::known);
        let result = match self.result {
            Lenient::Known(r) => r,
            // Never a success this agent cannot vouch for.
            Lenient::Unknown(_) => error.as_ref().map_or(UpgradeResult::Failed, |e| e.code.result()),
        };
        LastUpgrade {
            upgrade_id: self.upgrade_id,
            version: self.version,
            result,
            error,
            finished: self.finished,
        }
    }
}

/// Why an upgrade record cannot be carried on.
type Unusable = String;

/// The upgrade in `raw`, or why this agent cannot carry it on.
fn known_upgrade(raw: &Value) -> Result<Upgrade, Unusable> {
    let u = StoredUpgrade::deserialize(raw).map_err(|e| format!("its record does not decode: {e}"))?;
    let phase = match u.phase {
        Lenient::Known(p) => p,
        Lenient::Unknown(p) => return Err(format!("phase `{p}` is unknown to this agent")),
    };
    let target = match u.target {
        Lenient::Known(t) => t,
        Lenient::Unknown(t) => return Err(format!("target slot `{t}` is unknown to this agent")),
    };
    let manifest = u
        .manifest
        .map(|m| Manifest::deserialize(&m))
        .transpose()
        .map_err(|e| format!("its manifest is not one this agent can read: {e}"))?;
    let wait = match u.wait {
        None => None,
        Some(w) => Some(Wait {
            resume: match w.resume {
                Lenient::Known(p) => p,
                Lenient::Unknown(p) => {
                    return Err(format!(
                        "the phase `{p}` it waits to run is unknown to this agent"
                    ));
                }
            },
            reason: match w.reason {
                Lenient::Known(r) => r,
                // Still held; the gate asks the vehicle again before anything runs.
                Lenient::Unknown(_) => WaitReason::FlightStateUnknown,
            },
            since: w.since,
        }),
    };
    Ok(Upgrade {
        id: u.id,
        source: u.source,
        allow_downgrade: u.allow_downgrade,
        phase,
        target,
        manifest,
        image_offset: u.image_offset,
        written: u.written,
        boot_id: u.boot_id,
        trial_boot: u.trial_boot,
        trial_boots: u.trial_boots,
        error: u.error.map(StoredError::known),
        wait,
    })
}

/// Decodes a persisted state tolerantly (see the module docs). Fails only when the record is
/// not JSON or lacks what no safe meaning can replace: the active slot, the slot records, the
/// committed version, the floor, the sequence.
pub(super) fn decode(bytes: &[u8], format: u32) -> Result<DeviceState, serde_json::Error> {
    let mut s: StoredState = serde_json::from_slice(bytes)?;
    // A later format may carry its number in the record too, once no format 1 agent is a fallback.
    s.format = s.format.max(format);
    if s.format > STATE_FORMAT {
        tracing::info!(
            format = s.format,
            ours = STATE_FORMAT,
            "the device state was written by a newer agent; reading what this agent knows of it"
        );
    }
    let mut dropped = None;
    let upgrade = match s.upgrade {
        None => None,
        Some(raw) => match known_upgrade(&raw) {
            Ok(u) => Some(u),
            Err(why) => {
                let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
                dropped = Some(Dropped {
                    id: text("id").unwrap_or_default(),
                    version: raw
                        .get("manifest")
                        .and_then(|m| m.get("version"))
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    target: text("target").as_deref().and_then(Slot::parse),
                    format: s.format,
                    why,
                });
                None
            }
        },
    };
    // Only a shortcut for a download sent again: never worth refusing to open over.
    let resumable = s.resumable.and_then(|raw| {
        known_upgrade(&raw)
            .map_err(|why| tracing::warn!("dropping the resumable download of a newer agent: {why}"))
            .ok()
    });
    let last = s.last.and_then(|raw| {
        StoredLast::deserialize(&raw)
            .map(StoredLast::known)
            .map_err(|e| tracing::warn!("the last upgrade's record does not decode; forgetting it: {e}"))
            .ok()
    });
    Ok(DeviceState {
        active: s.active,
        a: s.a.known('a'),
        b: s.b.known('b'),
        committed_version: s.committed_version,
        security_floor: s.security_floor,
        upgrade,
        last,
        seq: s.seq,
        resumable,
        dropped,
    })
}

/// Decodes one [`LastUpgrade`] as persisted (the state's `last`, the daemon's history), with the
/// same tolerance.
pub(super) fn decode_last(bytes: &[u8]) -> Result<LastUpgrade, serde_json::Error> {
    serde_json::from_slice::<StoredLast>(bytes).map(StoredLast::known)
}
