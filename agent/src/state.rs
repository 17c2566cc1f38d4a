//! What the device knows: slots, committed version, security floor, the upgrade in flight.
//!
//! Every method here changes memory only and **does not write to sled**; the engine calls
//! [`crate::store::Store::save`] after each transition and before the side effect that follows it.

use flightnode_proto::manifest::Manifest;
use flightnode_proto::status::{
    CurrentUpgrade, DeviceStatus, ErrorReport, LastUpgrade, Progress, SlotStatus, Slots,
};
use flightnode_proto::{ErrorCode, Phase, Slot, SlotState, UpgradeResult, WaitReason};
use serde::{Deserialize, Serialize};

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRecord {
    /// Version of the complete image in the slot.
    pub version: Option<semver::Version>,
    /// Slot state.
    pub state: SlotState,
}

/// The upgrade in flight, as far as it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// Upgrade id (from the operator, or derived from the source).
    pub id: String,
    /// Bundle path or URL.
    pub source: String,
    /// Whether a lower version may be installed by this upgrade.
    pub allow_downgrade: bool,
    /// Where it is.
    pub phase: Phase,
    /// Slot being written: always the one that is not active when the upgrade began.
    pub target: Slot,
    /// The verified manifest; `None` until signature and policy checks passed.
    pub manifest: Option<Manifest>,
    /// Offset of the first image byte in the bundle.
    pub image_offset: u64,
    /// Image bytes durably in the target slot (fsynced before this was recorded).
    pub written: u64,
    /// Reboot mode: boot id when the reboot was requested; a different one means we rebooted.
    pub boot_id: Option<String>,
    /// Why a rollback is under way.
    pub error: Option<ErrorReport>,
    /// In [`Phase::Waiting`]: the step the flight gate holds back, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// An upgrade held by the flight gate (see [`crate::flight`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    /// The phase whose step runs once the gate opens.
    pub resume: Phase,
    /// Why it waits now.
    pub reason: WaitReason,
    /// Unix seconds when the wait began; `flight.max_wait` counts from here, across restarts.
    pub since: u64,
}

impl Upgrade {
    /// The phase whose step is due: the persisted phase, or the held one while waiting.
    pub fn step_phase(&self) -> Phase {
        match (&self.wait, self.phase) {
            (Some(w), Phase::Waiting) => w.resume,
            _ => self.phase,
        }
    }

    /// Why it waits, in [`Phase::Waiting`].
    pub fn wait_reason(&self) -> Option<WaitReason> {
        self.wait
            .as_ref()
            .filter(|_| self.phase == Phase::Waiting)
            .map(|w| w.reason)
    }

    /// Version from the verified manifest.
    pub fn version(&self) -> Option<&semver::Version> {
        self.manifest.as_ref().map(|m| &m.version)
    }
}

/// Everything persisted about the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Slot that runs (command mode) or boots first (reboot mode).
    pub active: Slot,
    /// Slot `a`.
    pub a: SlotRecord,
    /// Slot `b`.
    pub b: SlotRecord,
    /// Version of the committed image.
    pub committed_version: semver::Version,
    /// Lowest acceptable security version; raised only on commit.
    pub security_floor: u64,
    /// The upgrade in flight.
    pub upgrade: Option<Upgrade>,
    /// How the last upgrade ended.
    pub last: Option<LastUpgrade>,
    /// Monotonic event sequence: bumped on every transition.
    pub seq: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DeviceState {
    /// A fresh device: slot `a` active and good with the factory version, slot `b` empty.
    pub fn factory(version: semver::Version) -> Self {
        Self {
            active: Slot::A,
            a: SlotRecord {
                version: Some(version.clone()),
                state: SlotState::Good,
            },
            b: SlotRecord {
                version: None,
                state: SlotState::Empty,
            },
            committed_version: version,
            security_floor: 0,
            upgrade: None,
            last: None,
            seq: 0,
        }
    }

    /// The record of `slot`.
    pub fn slot(&self, slot: Slot) -> &SlotRecord {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    /// The record of `slot`, mutable.
    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotRecord {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    /// Current phase, `Idle` when no upgrade is in flight.
    pub fn phase(&self) -> Phase {
        self.upgrade.as_ref().map_or(Phase::Idle, |u| u.phase)
    }

    fn bump(&mut self) {
        self.seq += 1;
    }

    /// Starts an upgrade into the inactive slot. Does not write to sled.
    pub fn begin(&mut self, id: String, source: String, allow_downgrade: bool) {
        let target = !self.active;
        self.upgrade = Some(Upgrade {
            id,
            source,
            allow_downgrade,
            phase: Phase::Downloading,
            target,
            manifest: None,
            image_offset: 0,
            written: 0,
            boot_id: None,
            error: None,
            wait: None,
        });
        self.bump();
    }

    /// Records the verified manifest and marks the target slot bad: it is about to be
    /// overwritten, so nothing may point at it. Does not write to sled.
    pub fn accept_manifest(&mut self, manifest: Manifest, image_offset: u64) {
        if let Some(u) = self.upgrade.as_mut() {
            u.manifest = Some(manifest);
            u.image_offset = image_offset;
            u.written = 0;
            let target = u.target;
            *self.slot_mut(target) = SlotRecord {
                version: None,
                state: SlotState::Bad,
            };
        }
    }

    /// Records image bytes durably written. Does not write to sled.
    pub fn written(&mut self, bytes: u64) {
        if let Some(u) = self.upgrade.as_mut() {
            u.written = bytes;
        }
    }

    /// Holds the upgrade in [`Phase::Waiting`] for `reason`, remembering the step it holds back
    /// (a wait that goes on keeps its start). Does not write to sled.
    pub fn hold(&mut self, reason: WaitReason) {
        if let Some(u) = self.upgrade.as_mut() {
            let resume = u.step_phase();
            let since = u
                .wait
                .as_ref()
                .filter(|_| u.phase == Phase::Waiting)
                .map_or_else(now_unix, |w| w.since);
            u.wait = Some(Wait {
                resume,
                reason,
                since,
            });
            u.phase = Phase::Waiting;
        }
        self.bump();
    }

    /// Ends a wait: back to the held phase. Does not write to sled.
    pub fn release(&mut self) {
        if let Some(u) = self.upgrade.as_mut() {
            u.phase = u.step_phase();
            u.wait = None;
        }
        self.bump();
    }

    /// Moves the upgrade to `phase`. Does not write to sled.
    pub fn enter(&mut self, phase: Phase) {
        if let Some(u) = self.upgrade.as_mut() {
            u.phase = phase;
            u.wait = None;
            let (target, version) = (u.target, u.version().cloned());
            match phase {
                // Complete and hash-verified, but not bootable until the switch.
                Phase::Staged => {
                    *self.slot_mut(target) = SlotRecord {
                        version,
                        state: SlotState::Bad,
                    }
                }
                Phase::Testing => {
                    self.active = target;
                    self.slot_mut(target).state = SlotState::Trial;
                }
                _ => {}
            }
        }
        self.bump();
    }

    /// Commits the target slot: good, committed version and security floor raised.
    /// Returns the finished record. Does not write to sled.
    pub fn commit(&mut self) -> Option<LastUpgrade> {
        let u = self.upgrade.take()?;
        let manifest = u.manifest.as_ref()?;
        self.active = u.target;
        *self.slot_mut(u.target) = SlotRecord {
            version: Some(manifest.version.clone()),
            state: SlotState::Good,
        };
        self.committed_version = manifest.version.clone();
        self.security_floor = self.security_floor.max(manifest.security_version);
        self.finish(&u, UpgradeResult::Committed, None)
    }

    /// Ends the upgrade on the old slot with `error`: the target slot is bad (or stays empty when
    /// nothing was written to it). Returns the finished record. Does not write to sled.
    pub fn fail(&mut self, code: ErrorCode, message: String) -> Option<LastUpgrade> {
        let u = self.upgrade.take()?;
        self.active = !u.target;
        let touched = u.manifest.is_some();
        let target = self.slot_mut(u.target);
        if touched || target.state == SlotState::Trial {
            *target = SlotRecord {
                version: target.version.clone(),
                state: SlotState::Bad,
            };
            if code != ErrorCode::HealthCheckFailed && code != ErrorCode::TrialBootFailed {
                target.version = None;
            }
        }
        let result = code.result();
        self.finish(&u, result, Some(ErrorReport { code, message }))
    }

    fn finish(
        &mut self,
        u: &Upgrade,
        result: UpgradeResult,
        error: Option<ErrorReport>,
    ) -> Option<LastUpgrade> {
        let last = LastUpgrade {
            upgrade_id: u.id.clone(),
            version: u.version().map(ToString::to_string),
            result,
            error,
            finished: now_unix(),
        };
        self.last = Some(last.clone());
        self.bump();
        Some(last)
    }

    /// The `status --json` view; `booted` comes from the activation backend.
    pub fn report(&self, device_id: &str, booted: Slot) -> DeviceStatus {
        let slot = |r: &SlotRecord| SlotStatus {
            version: r.version.as_ref().map(ToString::to_string),
            state: r.state,
        };
        let upgrade = self.upgrade.as_ref();
        DeviceStatus {
            device_id: device_id.to_owned(),
            active_slot: self.active,
            booted_slot: booted,
            slots: Slots {
                a: slot(&self.a),
                b: slot(&self.b),
            },
            committed_version: self.committed_version.to_string(),
            security_floor: self.security_floor,
            phase: self.phase(),
            wait_reason: upgrade.and_then(Upgrade::wait_reason),
            progress: upgrade.and_then(|u| {
                u.manifest.as_ref().map(|m| Progress {
                    bytes: u.written,
                    total: m.image.size,
                })
            }),
            upgrade: upgrade.map(|u| CurrentUpgrade {
                upgrade_id: u.id.clone(),
                source: u.source.clone(),
                version: u.version().map(ToString::to_string),
                target_slot: u.target,
            }),
            last_upgrade: self.last.clone(),
        }
    }
}
