//! What the device knows: slots, committed version, security floor, the upgrade in flight.
//!
//! Every method here changes memory only and **does not write to sled**; the engine calls
//! [`crate::store::Store::save`] after each transition and before the side effect that follows it.
//!
//! # The persisted format, and how it may change
//!
//! Both slots' images share the state dir: after image N+1's agent wrote the state, a failed
//! trial boots image N again and N's agent must still open it, or it never confirms its slot nor
//! takes another upgrade. So the record ([`DeviceState::encode`], JSON) has a format,
//! [`STATE_FORMAT`], which the store keeps beside it (absent before format 2: every earlier
//! release), and [`DeviceState::decode`] reads it tolerantly, never strictly as a bundle manifest or an MQTT
//! command is read (those come from outside; this comes from ourselves). The rules, for every
//! type written here (including the proto types embedded: manifest, error, last upgrade):
//!
//! - A new field is optional, with `#[serde(default)]`, and its absence means what the agents
//!   before it did: an older agent ignores it and must still act safely without it. A field
//!   without such a meaning needs a new phase instead (see below).
//! - Never rename or remove a field, never change its type or meaning, never reuse an enum value
//!   for something else. Bump [`STATE_FORMAT`] with every change of what is written, and keep a
//!   fixture of the old format under `agent/tests/fixtures/state/`.
//! - Agents of format 1 (every release before this rule) decode strictly: while one of their
//!   images may still be a device's fallback, the record gains no field at all, which is why the
//!   format number lives beside it in the store and not in it (a test holds format 1's richest
//!   record byte for byte).
//! - What an older agent does with a value it does not know: an unknown phase (also the phase a
//!   wait holds), target slot or unreadable manifest drops the upgrade: the slot that runs is
//!   confirmed and kept, the target is marked bad, and the upgrade ends `failed` with
//!   `state_too_new` ([`DeviceState::end_dropped`]). An unknown error code reads as `internal`
//!   (its name kept in the message), an unknown wait reason as `flight_state_unknown` (still
//!   held), an unknown result as `failed` (or what the error code says), an unknown slot state as
//!   `bad`. An unreadable resumable download or last-upgrade record is forgotten. Unknown fields
//!   are ignored (and not written back).

mod stored;

use flightnode_proto::manifest::Manifest;
use flightnode_proto::status::{
    CurrentUpgrade, DeviceStatus, ErrorReport, LastUpgrade, Progress, SlotStatus, Slots,
};
use flightnode_proto::{ErrorCode, Phase, Slot, SlotState, UpgradeResult, WaitReason};
use serde::Serialize;

/// Format of the state this agent writes (the record's `format`); see the module docs.
/// 1: every release before it was kept, decoded strictly; 2: kept, decoded tolerantly, the record
/// itself unchanged.
pub const STATE_FORMAT: u32 = 2;

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotRecord {
    /// Version of the complete image in the slot.
    pub version: Option<semver::Version>,
    /// Slot state.
    pub state: SlotState,
    /// The security floor once this slot's image was committed (the factory image: 0); what the
    /// floor returns to when the bootloader falls back to this slot. `None` in records written
    /// before it existed, and for images never committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<u64>,
    /// The flight-controller firmware the image flies with, from its bundle's manifest (see
    /// [`Manifest::autopilot`]); kept once committed, so the arming interlock knows it on every
    /// later start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot: Option<semver::VersionReq>,
}

impl SlotRecord {
    fn empty() -> Self {
        Self {
            version: None,
            state: SlotState::Empty,
            floor: None,
            autopilot: None,
        }
    }

    /// Not bootable, holding `version` (or nothing complete).
    fn bad(version: Option<semver::Version>) -> Self {
        Self {
            version,
            state: SlotState::Bad,
            floor: None,
            autopilot: None,
        }
    }
}

/// The upgrade in flight, as far as it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// Reboot mode: boot id of the boot in which the trial slot came up. Set once the trial
    /// boot is seen, so a power cut during its health check is not taken for a failed boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_boot: Option<String>,
    /// Reboot mode: how many times the trial slot came up without finishing its check.
    #[serde(default)]
    pub trial_boots: u32,
    /// Why a rollback is under way.
    pub error: Option<ErrorReport>,
    /// In [`Phase::Waiting`]: the step the flight gate holds back, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// An upgrade held by the flight gate (see [`crate::flight`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceState {
    /// Slot that runs: command mode, where `current` points; reboot mode, the slot booted (a
    /// pending trial becomes active only once it has booted).
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
    /// An upgrade that ended in `download_failed` after its manifest was verified: the same
    /// upgrade sent again resumes from its written prefix. Any other upgrade drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumable: Option<Upgrade>,
    /// An upgrade the store held that this agent cannot carry on (written by a newer agent):
    /// set by [`DeviceState::decode`], ended by [`DeviceState::end_dropped`]. Never written.
    #[serde(skip)]
    pub dropped: Option<Dropped>,
}

/// An upgrade of a newer agent that this one cannot carry on (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Its upgrade id.
    pub id: String,
    /// Its version, when its manifest names one.
    pub version: Option<String>,
    /// The slot it was writing, when this agent knows that slot name.
    pub target: Option<Slot>,
    /// The format of the record it came from.
    pub format: u32,
    /// What this agent does not know about it.
    pub why: String,
}

/// Reads a persisted [`LastUpgrade`] (the state's `last`, the daemon's upgrade history) with the
/// tolerance of [`DeviceState::decode`]: an unknown error code or result maps as the module docs
/// say.
pub fn decode_last_upgrade(bytes: &[u8]) -> Result<LastUpgrade, serde_json::Error> {
    stored::decode_last(bytes)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl DeviceState {
    /// A fresh device: slot `a` active and good with the factory version, slot `b` empty.
    pub fn factory(version: semver::Version) -> Self {
        Self::adopt(version, Slot::A)
    }

    /// A fresh device running `running`: that slot is active and good with the factory version,
    /// the other one empty (RAUC likewise takes the booted slot as good on a fresh system).
    pub fn adopt(version: semver::Version, running: Slot) -> Self {
        let mut state = Self {
            active: running,
            a: SlotRecord::empty(),
            b: SlotRecord::empty(),
            committed_version: version.clone(),
            security_floor: 0,
            upgrade: None,
            last: None,
            seq: 0,
            resumable: None,
            dropped: None,
        };
        *state.slot_mut(running) = SlotRecord {
            version: Some(version),
            state: SlotState::Good,
            floor: Some(0),
            autopilot: None,
        };
        state
    }

    /// The persisted record: JSON, in the shape format 1 agents read (see the module docs).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Reads a persisted record of any format, earlier or later (see the module docs): an upgrade
    /// this agent cannot carry on is left in [`DeviceState::dropped`]. Fails only on a record that
    /// is not JSON or lacks the slots, versions, floor or sequence.
    /// `format` is what the store kept beside the record.
    pub fn decode(bytes: &[u8], format: u32) -> Result<Self, serde_json::Error> {
        stored::decode(bytes, format)
    }

    /// Ends the upgrade a newer agent left (see [`DeviceState::dropped`]): the slot it wrote is
    /// bad, the other one active, and it ends `failed` with `state_too_new`. The caller confirms
    /// the slot that runs. Returns the finished record. Does not write to sled.
    pub fn end_dropped(&mut self) -> Option<LastUpgrade> {
        let d = self.dropped.take()?;
        let slots = if let Some(target) = d.target {
            self.active = !target;
            // What the newer agent left there is unknown: no version is claimed for it.
            *self.slot_mut(target) = SlotRecord::bad(None);
            format!("slot {} stays active, slot {target} is marked bad", self.active)
        } else {
            format!("slot {} stays active", self.active)
        };
        // Its written prefix may no longer be what the newer agent left in that slot.
        self.resumable = None;
        let code = ErrorCode::StateTooNew;
        let message = format!(
            "upgrade {} was dropped: a newer agent recorded it (state format {}, this agent \
             writes {STATE_FORMAT}) and {}; the board runs this older image, {slots}. Send the \
             upgrade again",
            d.id, d.format, d.why
        );
        let last = LastUpgrade {
            upgrade_id: d.id,
            version: d.version,
            result: code.result(),
            error: Some(ErrorReport { code, message }),
            finished: now_unix(),
        };
        self.last = Some(last.clone());
        self.bump();
        Some(last)
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

    /// Starts an upgrade into the inactive slot; any resumable upgrade is dropped (its slot is
    /// about to be overwritten). Does not write to sled.
    pub fn begin(&mut self, id: String, source: String, allow_downgrade: bool) {
        let target = !self.active;
        self.resumable = None;
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
            trial_boot: None,
            trial_boots: 0,
            error: None,
            wait: None,
        });
        self.bump();
    }

    /// Takes back the upgrade that ended in `download_failed` when `id` or `source` names it:
    /// it continues downloading from its written prefix. Does not write to sled.
    pub fn resume_failed(&mut self, id: &str, source: &str) -> bool {
        if self.upgrade.is_some() {
            return false;
        }
        match self.resumable.take() {
            Some(mut u) if u.id == id || u.source == source => {
                u.phase = Phase::Downloading;
                u.error = None;
                self.upgrade = Some(u);
                self.bump();
                true
            }
            other => {
                self.resumable = other;
                false
            }
        }
    }

    /// The trial slot runs: command mode once `current` names it, reboot mode once it booted.
    /// Does not write to sled.
    pub fn trial_runs(&mut self) {
        if let Some(u) = &self.upgrade {
            self.active = u.target;
        }
    }

    /// Reboot mode, nothing in flight: the bootloader started `booted`, a good slot, instead of the
    /// active one (the active one stopped booting, or was marked bad). `booted` is active, the
    /// other slot is bad, and the committed version and the security floor are those of the slot
    /// that runs. When the last upgrade committed the slot left behind, it ends `rolled_back`
    /// instead: `trial_boot_failed`, or `health_check_failed` when that slot had been marked bad.
    /// Returns that record. Does not write to sled.
    pub fn fell_back(&mut self, booted: Slot) -> Option<LastUpgrade> {
        let failed = !booted;
        self.active = booted;
        let before = self.slot(failed).clone();
        if before.state != SlotState::Empty {
            *self.slot_mut(failed) = SlotRecord::bad(before.version.clone());
        }
        let running = self.slot(booted).clone();
        if let Some(v) = &running.version {
            self.committed_version = v.clone();
        }
        if let Some(floor) = running.floor {
            self.security_floor = floor;
        }
        self.bump();
        // Left as it was, the record would claim the upgrade committed while the board runs the
        // old image. Not rare with GRUB: its script gives every boot one try, so one boot of the
        // committed slot that loses power before the agent confirms it is a fallback.
        let undone = self.last.as_mut().filter(|l| {
            l.result == UpgradeResult::Committed
                && l.version.is_some()
                && l.version == before.version.as_ref().map(ToString::to_string)
        })?;
        let runs = running
            .version
            .as_ref()
            .map_or_else(|| "its image".to_owned(), |v| format!("version {v}"));
        let (code, message) = if before.state == SlotState::Bad {
            (
                ErrorCode::HealthCheckFailed,
                format!(
                    "slot {failed} was committed, then marked bad; slot {booted} booted and runs \
                     {runs} again"
                ),
            )
        } else {
            (
                ErrorCode::TrialBootFailed,
                format!(
                    "slot {failed} was committed, but a later boot of it was never confirmed (it \
                     failed, hung or lost power first) and the bootloader fell back to slot \
                     {booted}, which runs {runs} again"
                ),
            )
        };
        undone.result = code.result();
        undone.error = Some(ErrorReport { code, message });
        undone.finished = now_unix();
        Some(undone.clone())
    }

    /// Records the verified manifest and marks the target slot bad: it is about to be
    /// overwritten, so nothing may point at it. Does not write to sled.
    pub fn accept_manifest(&mut self, manifest: Manifest, image_offset: u64) {
        if let Some(u) = self.upgrade.as_mut() {
            u.manifest = Some(manifest);
            u.image_offset = image_offset;
            u.written = 0;
            let target = u.target;
            *self.slot_mut(target) = SlotRecord::bad(None);
        }
    }

    /// Records image bytes durably written. Does not write to sled.
    pub fn written(&mut self, bytes: u64) {
        if let Some(u) = self.upgrade.as_mut() {
            u.written = bytes;
        }
    }

    /// Holds the upgrade in [`Phase::Waiting`] for `reason`, remembering the step it holds back
    /// (a wait that goes on keeps its start, unless it turns from a flight reason to another
    /// kind or back). Does not write to sled.
    pub fn hold(&mut self, reason: WaitReason) {
        if let Some(u) = self.upgrade.as_mut() {
            let resume = u.step_phase();
            // `flight.max_wait` counts the flight gate's wait only: a wait for a link, the
            // window or a charger before it starts the clock afresh.
            let since = u
                .wait
                .as_ref()
                .filter(|w| u.phase == Phase::Waiting && w.reason.is_flight() == reason.is_flight())
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
                Phase::Staged => *self.slot_mut(target) = SlotRecord::bad(version),
                // On trial, but not running yet: see `trial_runs`.
                Phase::Testing => self.slot_mut(target).state = SlotState::Trial,
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
        self.committed_version = manifest.version.clone();
        self.security_floor = self.security_floor.max(manifest.security_version);
        *self.slot_mut(u.target) = SlotRecord {
            version: Some(manifest.version.clone()),
            state: SlotState::Good,
            floor: Some(self.security_floor),
            autopilot: manifest.autopilot.clone(),
        };
        Some(self.finish(&u, UpgradeResult::Committed, None))
    }

    /// Ends the upgrade on the old slot with `error`: the target slot is bad (or stays empty when
    /// nothing was written to it). A verified download that failed stays resumable. Returns the
    /// finished record. Does not write to sled.
    pub fn fail(&mut self, code: ErrorCode, message: String) -> Option<LastUpgrade> {
        let u = self.upgrade.take()?;
        self.active = !u.target;
        let touched = u.manifest.is_some();
        let target = self.slot_mut(u.target);
        if touched || target.state == SlotState::Trial {
            let ran = code == ErrorCode::HealthCheckFailed || code == ErrorCode::TrialBootFailed;
            *target = SlotRecord::bad(target.version.clone().filter(|_| ran));
        }
        if code == ErrorCode::DownloadFailed && touched {
            self.resumable = Some(Upgrade {
                phase: Phase::Downloading,
                error: None,
                ..u.clone()
            });
        }
        let result = code.result();
        Some(self.finish(&u, result, Some(ErrorReport { code, message })))
    }

    fn finish(&mut self, u: &Upgrade, result: UpgradeResult, error: Option<ErrorReport>) -> LastUpgrade {
        let last = LastUpgrade {
            upgrade_id: u.id.clone(),
            version: u.version().map(ToString::to_string),
            result,
            error,
            finished: now_unix(),
        };
        self.last = Some(last.clone());
        self.bump();
        last
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
            flights: None,
            arm_lock: None,
            clock: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::manifest::ImageInfo;

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    fn manifest(version: &str, security_version: u64) -> Manifest {
        Manifest {
            format: flightnode_proto::manifest::FORMAT_VERSION,
            version: v(version),
            security_version,
            compatible: vec!["hw".into()],
            created: time::OffsetDateTime::UNIX_EPOCH,
            expires: None,
            image: ImageInfo {
                size: 100,
                sha256: "00".repeat(32),
            },
            chunks: None,
            autopilot: None,
        }
    }

    /// One step of a device's life, applied in memory.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        Begin(&'static str),
        Accept(&'static str, u64),
        Written(u64),
        Enter(Phase),
        TrialRuns,
        Commit,
        Fail(ErrorCode),
        ResumeFailed(&'static str),
        FellBack(Slot),
        Hold(WaitReason),
        Release,
    }

    fn apply(s: &mut DeviceState, op: Op) {
        match op {
            Op::Begin(id) => s.begin(id.into(), format!("file:///{id}"), false),
            Op::Accept(version, sv) => s.accept_manifest(manifest(version, sv), 1024),
            Op::Written(n) => s.written(n),
            Op::Enter(p) => s.enter(p),
            Op::TrialRuns => s.trial_runs(),
            Op::Commit => {
                s.commit();
            }
            Op::Fail(code) => {
                s.fail(code, "test".into());
            }
            Op::ResumeFailed(id) => {
                s.resume_failed(id, "no such source");
            }
            Op::FellBack(slot) => {
                s.fell_back(slot);
            }
            Op::Hold(reason) => s.hold(reason),
            Op::Release => s.release(),
        }
    }

    /// What a user sees after the ops: active, slot states, committed version, floor, phase.
    type View = (Slot, SlotState, SlotState, &'static str, u64, Phase);

    fn view(s: &DeviceState) -> (Slot, SlotState, SlotState, String, u64, Phase) {
        (
            s.active,
            s.a.state,
            s.b.state,
            s.committed_version.to_string(),
            s.security_floor,
            s.phase(),
        )
    }

    #[test]
    fn transitions_table() {
        use Op::*;
        use SlotState::{Bad, Empty, Good, Trial};
        let upgrade_to_b = [
            Begin("u1"),
            Accept("2.0.0", 3),
            Enter(Phase::Staged),
            Enter(Phase::Switching),
            Enter(Phase::Testing),
        ];
        let cases: Vec<(&str, Vec<Op>, View)> = vec![
            ("fresh", vec![], (Slot::A, Good, Empty, "1.0.0", 0, Phase::Idle)),
            (
                "target marked bad before the first byte",
                vec![Begin("u1"), Accept("2.0.0", 3)],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Downloading),
            ),
            (
                "a pending trial is not active before it runs",
                upgrade_to_b.to_vec(),
                (Slot::A, Good, Trial, "1.0.0", 0, Phase::Testing),
            ),
            (
                "the trial runs",
                [&upgrade_to_b[..], &[TrialRuns]].concat(),
                (Slot::B, Good, Trial, "1.0.0", 0, Phase::Testing),
            ),
            (
                "commit raises the floor",
                [&upgrade_to_b[..], &[TrialRuns, Commit]].concat(),
                (Slot::B, Good, Good, "2.0.0", 3, Phase::Idle),
            ),
            (
                "failed trial boot",
                [&upgrade_to_b[..], &[Fail(ErrorCode::TrialBootFailed)]].concat(),
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Idle),
            ),
            (
                "fallback from a committed slot returns version and floor",
                [&upgrade_to_b[..], &[TrialRuns, Commit, FellBack(Slot::A)]].concat(),
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Idle),
            ),
            (
                "download_failed then the same upgrade again resumes",
                vec![
                    Begin("u1"),
                    Accept("2.0.0", 0),
                    Written(40),
                    Fail(ErrorCode::DownloadFailed),
                    ResumeFailed("u1"),
                ],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Downloading),
            ),
            (
                "a wait holds the staged image and changes no slot",
                vec![
                    Begin("u1"),
                    Accept("2.0.0", 3),
                    Enter(Phase::Staged),
                    Hold(WaitReason::InAir),
                    Hold(WaitReason::Armed),
                ],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Waiting),
            ),
            (
                "release returns to the held step",
                vec![
                    Begin("u1"),
                    Accept("2.0.0", 3),
                    Enter(Phase::Staged),
                    Hold(WaitReason::InAir),
                    Release,
                ],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Staged),
            ),
            (
                "a failure while waiting ends on the old slot",
                vec![
                    Begin("u1"),
                    Accept("2.0.0", 3),
                    Enter(Phase::Staged),
                    Hold(WaitReason::InAir),
                    Fail(ErrorCode::Canceled),
                ],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Idle),
            ),
            (
                "another upgrade does not resume it",
                vec![
                    Begin("u1"),
                    Accept("2.0.0", 0),
                    Fail(ErrorCode::DownloadFailed),
                    ResumeFailed("u2"),
                ],
                (Slot::A, Good, Bad, "1.0.0", 0, Phase::Idle),
            ),
        ];
        for (name, ops, want) in cases {
            let mut s = DeviceState::factory(v("1.0.0"));
            for op in &ops {
                apply(&mut s, *op);
            }
            let (active, a, b, committed, floor, phase) = want;
            assert_eq!(
                view(&s),
                (active, a, b, committed.to_owned(), floor, phase),
                "{name}: {ops:?}"
            );
        }
    }

    /// `flight.max_wait` counts the flight gate's wait only: a long wait for an unmetered link
    /// before it must not time the flight gate out the moment it starts.
    #[test]
    fn a_wait_keeps_its_start_only_while_its_kind_stays() {
        let mut s = DeviceState::factory(v("1.0.0"));
        s.begin("u1".into(), "http://x/fw".into(), false);
        let since = |s: &DeviceState| s.upgrade.as_ref().and_then(|u| u.wait.as_ref()).map(|w| w.since);
        s.hold(WaitReason::MeteredLink);
        if let Some(w) = s.upgrade.as_mut().and_then(|u| u.wait.as_mut()) {
            w.since = 1000;
        }
        s.hold(WaitReason::DownloadWindow);
        assert_eq!(since(&s), Some(1000), "still a link hold");
        s.hold(WaitReason::InAir);
        assert!(
            since(&s).is_some_and(|t| t > 1000),
            "the flight gate's clock starts afresh"
        );
        if let Some(w) = s.upgrade.as_mut().and_then(|u| u.wait.as_mut()) {
            w.since = 2000;
        }
        s.hold(WaitReason::Armed);
        assert_eq!(since(&s), Some(2000), "still the flight gate's wait");
        assert_eq!(
            s.upgrade.as_ref().map(Upgrade::step_phase),
            Some(Phase::Downloading)
        );
    }

    #[test]
    fn resumed_download_keeps_its_offset_and_a_new_upgrade_drops_it() {
        let mut s = DeviceState::factory(v("1.0.0"));
        s.begin("u1".into(), "http://x/fw".into(), false);
        s.accept_manifest(manifest("2.0.0", 0), 1024);
        s.written(4096);
        s.fail(ErrorCode::DownloadFailed, "cut".into());
        assert!(s.resumable.is_some());
        assert!(s.resume_failed("other-id", "http://x/fw"), "same source");
        let u = s.upgrade.as_ref().unwrap();
        assert_eq!(
            (u.written, u.image_offset, u.phase),
            (4096, 1024, Phase::Downloading)
        );

        s.fail(ErrorCode::DownloadFailed, "cut".into());
        s.begin("u2".into(), "http://x/other".into(), false);
        assert!(s.resumable.is_none(), "a new upgrade overwrites the slot");
        // A failure before the manifest was verified has nothing to resume.
        s.fail(ErrorCode::DownloadFailed, "404".into());
        assert!(s.resumable.is_none());
    }

    /// A fallback from the slot the last upgrade committed undoes that upgrade in the record: it
    /// must not say `committed` while the board runs the old image. A fallback that has nothing
    /// to do with the last upgrade leaves its record alone.
    #[test]
    fn a_fallback_from_the_committed_slot_ends_the_upgrade_rolled_back() {
        use Op::*;
        let committed = || {
            let mut s = DeviceState::factory(v("1.0.0"));
            for op in [
                Begin("u1"),
                Accept("2.0.0", 3),
                Enter(Phase::Staged),
                Enter(Phase::Switching),
                Enter(Phase::Testing),
                TrialRuns,
                Commit,
            ] {
                apply(&mut s, op);
            }
            assert_eq!(s.last.as_ref().unwrap().result, UpgradeResult::Committed);
            s
        };
        let mut s = committed();
        let last = s.fell_back(Slot::A).expect("the committed upgrade is undone");
        assert_eq!(s.last.as_ref(), Some(&last));
        assert_eq!(
            (last.upgrade_id.as_str(), last.version.as_deref(), last.result),
            ("u1", Some("2.0.0"), UpgradeResult::RolledBack)
        );
        let error = last.error.unwrap();
        assert_eq!(error.code, ErrorCode::TrialBootFailed);
        assert!(
            error.message.contains("slot b was committed") && error.message.contains("1.0.0"),
            "{}",
            error.message
        );
        assert_eq!(
            (s.active, s.committed_version.to_string()),
            (Slot::A, "1.0.0".into())
        );

        // Back on B by hand, then a fallback to A again: the record is already rolled back.
        let before = s.last.clone();
        s.active = Slot::B;
        assert!(s.fell_back(Slot::A).is_none());
        assert_eq!(s.last, before);

        // The committed slot was marked bad (`mark-bad b`), then A booted.
        let mut s = committed();
        s.b.state = SlotState::Bad;
        let error = s.fell_back(Slot::A).unwrap().error.unwrap();
        assert_eq!(error.code, ErrorCode::HealthCheckFailed, "{}", error.message);

        // A failed upgrade's record stays as it ended.
        let mut s = DeviceState::factory(v("1.0.0"));
        for op in [Begin("u1"), Accept("2.0.0", 3), Fail(ErrorCode::DownloadFailed)] {
            apply(&mut s, op);
        }
        let before = s.last.clone();
        assert!(s.fell_back(Slot::A).is_none());
        assert_eq!(s.last, before);
    }

    #[test]
    fn adopting_the_booted_slot_and_reading_old_records() {
        let s = DeviceState::adopt(v("1.0.0"), Slot::B);
        assert_eq!(s.active, Slot::B);
        assert_eq!(s.b.state, SlotState::Good);
        assert_eq!(s.b.version, Some(v("1.0.0")));
        assert_eq!(s.a.state, SlotState::Empty);
        // A record written before `floor`, `resumable` and the trial fields existed still loads.
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        json["b"].as_object_mut().unwrap().remove("floor");
        let old = DeviceState::decode(json.to_string().as_bytes(), 1).unwrap();
        assert_eq!(old.b.floor, None);
    }

    /// A change to a stored record, and what must hold of the state it decodes to.
    type Case = (&'static str, fn(&mut serde_json::Value), fn(&DeviceState) -> bool);

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/state")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn decode(name: &str) -> DeviceState {
        DeviceState::decode(&fixture(name), 1).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_earlier_format_decodes_and_is_written_back_in_this_one() {
        let s = decode("format1-first-release.json");
        let u = s.upgrade.as_ref().unwrap();
        assert_eq!(
            (u.phase, u.target, u.image_offset, u.written),
            (Phase::Downloading, Slot::A, 1536, 4096)
        );
        assert_eq!(u.version(), Some(&v("1.2.0")));
        assert_eq!((s.a.floor, s.b.floor, s.security_floor), (None, None, 2));
        assert_eq!(s.last.as_ref().unwrap().result, UpgradeResult::Committed);

        let s = decode("format1-flight-gate.json");
        let u = s.upgrade.as_ref().unwrap();
        assert_eq!(
            (u.wait_reason(), u.step_phase()),
            (Some(WaitReason::InAir), Phase::Switching)
        );
        assert!(u.manifest.as_ref().unwrap().expires.is_some());
        assert_eq!(s.last.unwrap().error.unwrap().code, ErrorCode::FlightGateTimeout);

        let s = decode("format1-trial-floor.json");
        let u = s.upgrade.as_ref().unwrap();
        assert_eq!(
            (u.phase, u.trial_boots, u.trial_boot.is_some()),
            (Phase::Testing, 1, true)
        );
        assert_eq!((s.a.floor, s.b.state), (Some(0), SlotState::Trial));

        let s = decode("format1-chunked.json");
        let r = s.resumable.as_ref().unwrap();
        let chunks = r.manifest.as_ref().unwrap().chunks.as_ref().unwrap();
        assert_eq!((chunks.count, chunks.context), (4, None));
        assert_eq!(s.last.unwrap().error.unwrap().code, ErrorCode::DownloadFailed);

        let s = decode("format1-chunk-context.json");
        let chunks = s
            .upgrade
            .as_ref()
            .unwrap()
            .manifest
            .as_ref()
            .unwrap()
            .chunks
            .clone()
            .unwrap();
        assert_eq!(chunks.context.unwrap().window, 4 * 1024 * 1024);
        assert_eq!(s.last.unwrap().error.unwrap().code, ErrorCode::ChunkInvalid);

        // This format: written back byte for byte, in the shape format 1 agents read strictly
        // (no `format` in the record: the store keeps it beside).
        let current = fixture("format2.json");
        let s = DeviceState::decode(&current, STATE_FORMAT).unwrap();
        assert_eq!(s.encode().unwrap(), current.trim_ascii_end());
        assert!(!current.starts_with(b"{\"format\""));

        for name in [
            "format1-first-release.json",
            "format1-flight-gate.json",
            "format1-trial-floor.json",
            "format1-chunked.json",
            "format1-chunk-context.json",
        ] {
            let s = decode(name);
            assert_eq!(s.dropped, None, "{name}");
            let written = s.encode().unwrap();
            let json: serde_json::Value = serde_json::from_slice(&written).unwrap();
            assert_eq!(
                json.get("format"),
                None,
                "{name}: format 1 agents refuse the field"
            );
            assert_eq!(DeviceState::decode(&written, STATE_FORMAT).unwrap(), s, "{name}");
        }
    }

    #[test]
    fn a_newer_agents_upgrade_in_an_unknown_phase_is_dropped() {
        let mut s = decode("newer-unknown-phase.json");
        assert_eq!(s.upgrade, None);
        let d = s.dropped.clone().unwrap();
        assert_eq!(
            (d.id.as_str(), d.target, d.version.as_deref(), d.format),
            ("up-newer", Some(Slot::B), Some("2.0.0"), 3)
        );
        assert!(d.why.contains("`attesting`"), "{}", d.why);
        // What it knows is kept; what it does not is mapped.
        assert_eq!(
            (s.a.state, s.b.state, s.seq),
            (SlotState::Good, SlotState::Trial, 31)
        );
        let last = s.last.clone().unwrap();
        assert_eq!(last.result, UpgradeResult::Failed);
        let error = last.error.unwrap();
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(
            error.message.contains("thermal_limit") && error.message.contains("CPU at 95 C"),
            "{}",
            error.message
        );
        assert_eq!(s.resumable, None, "its phase is unknown too");

        let last = s.end_dropped().unwrap();
        assert_eq!(s.dropped, None);
        assert_eq!(
            (s.active, s.a.state, s.b.state, s.phase()),
            (Slot::A, SlotState::Good, SlotState::Bad, Phase::Idle)
        );
        assert_eq!(
            (last.upgrade_id.as_str(), last.result),
            ("up-newer", UpgradeResult::Failed)
        );
        let error = last.error.unwrap();
        assert_eq!(error.code, ErrorCode::StateTooNew);
        assert!(
            error.message.contains("newer agent") && error.message.contains("slot a stays active"),
            "{}",
            error.message
        );
        assert_eq!(s.seq, 32, "a transition");
        assert_eq!(s.end_dropped(), None, "once");
    }

    #[test]
    fn a_newer_agents_upgrade_in_a_known_phase_carries_on() {
        let s = decode("newer-known-phase.json");
        assert_eq!(s.dropped, None);
        let u = s.upgrade.as_ref().unwrap();
        assert_eq!(u.id, "up-held");
        assert_eq!(
            (u.wait_reason(), u.step_phase()),
            (Some(WaitReason::FlightStateUnknown), Phase::Switching),
            "an unknown reason still holds it"
        );
        let error = s.last.unwrap().error.unwrap();
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(error.message.contains("`thermal_limit`"), "{}", error.message);
    }

    #[test]
    fn unknown_values_take_their_safe_meaning() {
        let base: serde_json::Value = serde_json::from_slice(&fixture("format2.json")).unwrap();
        let cases: Vec<Case> = vec![
            (
                "unknown slot state",
                |j| j["b"]["state"] = "quarantined".into(),
                |s| s.b.state == SlotState::Bad && s.upgrade.is_some(),
            ),
            (
                "unknown held phase",
                |j| j["upgrade"]["wait"]["resume"] = "attesting".into(),
                |s| s.upgrade.is_none() && s.dropped.as_ref().is_some_and(|d| d.why.contains("attesting")),
            ),
            (
                "unknown target slot",
                |j| j["upgrade"]["target"] = "c".into(),
                |s| s.dropped.as_ref().is_some_and(|d| d.target.is_none()),
            ),
            (
                "manifest of a newer format",
                |j| j["upgrade"]["manifest"]["signer_chain"] = "x".into(),
                |s| s.dropped.as_ref().is_some_and(|d| d.why.contains("manifest")),
            ),
            (
                "upgrade record without its id",
                |j| {
                    j["upgrade"].as_object_mut().unwrap().remove("id");
                },
                |s| s.dropped.as_ref().is_some_and(|d| d.target == Some(Slot::B)),
            ),
            (
                "unknown result, known code",
                |j| j["last"] = serde_json::json!({"upgrade_id": "u", "version": null, "result": "superseded", "error": {"code": "canceled", "message": "m"}, "finished": 1}),
                |s| {
                    s.last
                        .as_ref()
                        .is_some_and(|l| l.result == UpgradeResult::Canceled)
                },
            ),
            (
                "unreadable last record",
                |j| j["last"] = serde_json::json!({"result": 7}),
                |s| s.last.is_none() && s.upgrade.is_some(),
            ),
        ];
        for (name, change, check) in cases {
            let mut j = base.clone();
            change(&mut j);
            let s =
                DeviceState::decode(j.to_string().as_bytes(), 1).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(check(&s), "{name}: {s:?}");
        }
        for broken in [&b"not json"[..], br#"{"format": 9, "active": "a"}"#] {
            assert!(
                DeviceState::decode(broken, 1).is_err(),
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
        let last = decode_last_upgrade(br#"{"upgrade_id":"u","version":"2.0.0","result":"committed","error":null,"finished":5,"signed_by":"hub"}"#).unwrap();
        assert_eq!((last.result, last.finished), (UpgradeResult::Committed, 5));
    }
}
