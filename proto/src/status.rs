//! Device status: what `flightnode-agent status --json` prints and what the agent reports upstream.

use crate::codes::{ErrorCode, UpgradeResult};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot `a`: the factory slot on a fresh device.
    A,
    /// Slot `b`.
    B,
}

impl Slot {
    /// The other slot.
    #[must_use]
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// Parses `a`/`b`, case-insensitively (RAUC scripts say `A`/`B`).
    pub fn parse(s: &str) -> Option<Slot> {
        match s.trim() {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::ops::Not for Slot {
    type Output = Slot;
    fn not(self) -> Slot {
        self.other()
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a slot holds, as far as the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// A committed image that is known to boot and pass the health check.
    Good,
    /// Not bootable: being written, written but not yet activated, or failed.
    Bad,
    /// Activated on trial; commits or rolls back after the health check.
    Trial,
    /// Never written.
    Empty,
}

/// Where the current upgrade is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No upgrade in flight.
    Idle,
    /// Manifest verified; image streaming into the inactive slot.
    Downloading,
    /// Image written, hash verified, flushed: ready to switch.
    Staged,
    /// Switching the active slot (pointer rename + apply, or bootloader + reboot).
    Switching,
    /// Running the new slot on trial: health check and, in reboot mode, the boot itself.
    Testing,
    /// Health failed: switching back to the previous slot.
    RollingBack,
    /// Held by the flight gate before a step that touches the vehicle (switch, apply, reboot,
    /// rollback, optionally the download); [`WaitReason`] says why.
    Waiting,
}

impl Phase {
    /// The contract string.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Staged => "staged",
            Phase::Switching => "switching",
            Phase::Testing => "testing",
            Phase::RollingBack => "rolling_back",
            Phase::Waiting => "waiting",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an upgrade is held in [`Phase::Waiting`]: by the flight gate (`armed`, `in_air`,
/// `battery_low`, `flight_state_unknown`), by the download policy (`metered_link`,
/// `download_window`) or by the install policy (`not_charging`).
///
/// Consumers must accept reasons they do not know (a newer agent's): the hub keeps them as
/// strings, and the MQTT status decodes an unknown one as no reason (see `mqtt::StatusMessage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// The vehicle is armed.
    Armed,
    /// The vehicle is flying (taking off, in the air, landing).
    InAir,
    /// The battery is below `flight.min_battery_percent`.
    BatteryLow,
    /// No flight state: no HEARTBEAT within `flight.stale_after`, or the gate command could not tell.
    FlightStateUnknown,
    /// The bundle's route goes over a metered interface and `download.on_metered = "defer"`.
    MeteredLink,
    /// Outside `download.window` (local time).
    DownloadWindow,
    /// `install.require_charging`: the vehicle does not report charging (or the dock command
    /// says no).
    NotCharging,
}

impl WaitReason {
    /// The contract string.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Armed => "armed",
            WaitReason::InAir => "in_air",
            WaitReason::BatteryLow => "battery_low",
            WaitReason::FlightStateUnknown => "flight_state_unknown",
            WaitReason::MeteredLink => "metered_link",
            WaitReason::DownloadWindow => "download_window",
            WaitReason::NotCharging => "not_charging",
        }
    }

    /// Parses the contract string.
    pub fn parse(s: &str) -> Option<WaitReason> {
        [
            WaitReason::Armed,
            WaitReason::InAir,
            WaitReason::BatteryLow,
            WaitReason::FlightStateUnknown,
            WaitReason::MeteredLink,
            WaitReason::DownloadWindow,
            WaitReason::NotCharging,
        ]
        .into_iter()
        .find(|r| r.as_str() == s.trim())
    }
}

impl WaitReason {
    /// Whether the flight gate gives this reason (and `flight.max_wait` counts its wait). The
    /// link, window and charging holds have no limit: a cancel ends them.
    pub fn is_flight(self) -> bool {
        matches!(
            self,
            WaitReason::Armed | WaitReason::InAir | WaitReason::BatteryLow | WaitReason::FlightStateUnknown
        )
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the vehicle is doing, as the FlightNode's `observedState` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ObservedState {
    /// Disarmed and not in the air.
    Disarmed,
    /// Armed, on the ground.
    Armed,
    /// Taking off, flying or landing.
    InAir,
    /// No flight state (no MAVLink link, or its heartbeat went stale).
    #[default]
    Unknown,
}

impl ObservedState {
    /// The contract string.
    pub fn as_str(self) -> &'static str {
        match self {
            ObservedState::Disarmed => "disarmed",
            ObservedState::Armed => "armed",
            ObservedState::InAir => "in-air",
            ObservedState::Unknown => "unknown",
        }
    }

    /// Parses the contract string.
    pub fn parse(s: &str) -> Option<ObservedState> {
        [
            ObservedState::Disarmed,
            ObservedState::Armed,
            ObservedState::InAir,
            ObservedState::Unknown,
        ]
        .into_iter()
        .find(|o| o.as_str() == s.trim())
    }
}

impl fmt::Display for ObservedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slot in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotStatus {
    /// Firmware version in the slot, when it holds a complete image.
    pub version: Option<String>,
    /// Slot state.
    pub state: SlotState,
}

/// Both slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slots {
    /// Slot `a`.
    pub a: SlotStatus,
    /// Slot `b`.
    pub b: SlotStatus,
}

/// Bytes done out of total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// Image bytes written and hashed so far.
    pub bytes: u64,
    /// Image size from the manifest.
    pub total: u64,
}

/// An error with its contract code and a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReport {
    /// Contract code.
    pub code: ErrorCode,
    /// What failed and on which file, device or URL.
    pub message: String,
}

/// How the last upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastUpgrade {
    /// Upgrade id.
    pub upgrade_id: String,
    /// Version the upgrade was for, when the manifest was read.
    pub version: Option<String>,
    /// Result.
    pub result: UpgradeResult,
    /// Why, when the result is not `committed`.
    pub error: Option<ErrorReport>,
    /// Unix seconds when it ended.
    pub finished: u64,
}

/// The upgrade in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentUpgrade {
    /// Upgrade id.
    pub upgrade_id: String,
    /// Where the bundle comes from.
    pub source: String,
    /// Target version, once the manifest was verified.
    pub version: Option<String>,
    /// Slot being written.
    pub target_slot: Slot,
}

/// `flightnode-agent status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    /// Device id from the config.
    pub device_id: String,
    /// Slot that runs as far as the agent knows (command mode: the `current` pointer; reboot mode:
    /// the booted slot; a pending trial becomes active only once it has booted).
    pub active_slot: Slot,
    /// Slot that is running now.
    pub booted_slot: Slot,
    /// Both slots.
    pub slots: Slots,
    /// Version of the committed image.
    pub committed_version: String,
    /// Lowest security version this device accepts.
    pub security_floor: u64,
    /// Phase of the current upgrade, `idle` when none.
    pub phase: Phase,
    /// Why the upgrade waits, in phase `waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<WaitReason>,
    /// Progress of the current download.
    pub progress: Option<Progress>,
    /// The upgrade in flight.
    pub upgrade: Option<CurrentUpgrade>,
    /// The last finished upgrade.
    pub last_upgrade: Option<LastUpgrade>,
    /// Flights of the running image since it was committed, when a MAVLink link counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flights: Option<Flights>,
    /// Why the agent keeps the vehicle from arming; absent while it may arm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_lock: Option<ArmLock>,
    /// The trusted time and where it came from (`gps`, `hub`, `system`, `floor`): what the
    /// validity of hub-signed commands is judged by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockStatus>,
}

/// The trusted clock of `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockStatus {
    /// `gps` (the flight controller's GPS time), `hub` (the hub's signed time), `system` (the
    /// system clock: nothing better heard) or `floor` (the system clock is behind the newest
    /// trusted time seen, which is used instead).
    pub source: String,
    /// The trusted time, unix milliseconds.
    pub unix_ms: i64,
}

/// The arming interlock: why the vehicle must not take off now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmLock {
    /// The kind of lock.
    pub reason: ArmLockReason,
    /// What the pilot is told, e.g. `installing 3.0.0 into slot b`.
    pub message: String,
}

/// Why the agent keeps the vehicle on the ground.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArmLockReason {
    /// A new image is being written to the inactive slot.
    Installing,
    /// The active slot is being switched (pointer, bootloader, apply or reboot).
    Switching,
    /// The new image runs on trial and is not confirmed yet.
    Trial,
    /// The old image is being brought back.
    RollingBack,
    /// The flight controller's firmware is not what the running image's bundle declares.
    AutopilotMismatch,
}

impl ArmLockReason {
    /// Every reason, in the order of their wire codes (1, 2, ...).
    pub const ALL: [ArmLockReason; 5] = [
        ArmLockReason::Installing,
        ArmLockReason::Switching,
        ArmLockReason::Trial,
        ArmLockReason::RollingBack,
        ArmLockReason::AutopilotMismatch,
    ];

    /// The contract string.
    pub fn as_str(self) -> &'static str {
        match self {
            ArmLockReason::Installing => "installing",
            ArmLockReason::Switching => "switching",
            ArmLockReason::Trial => "trial",
            ArmLockReason::RollingBack => "rolling_back",
            ArmLockReason::AutopilotMismatch => "autopilot_mismatch",
        }
    }

    /// The number the agent sends the flight controller's script (0 means unlocked): stable,
    /// because the script on the autopilot is updated separately from the agent.
    pub fn code(self) -> i32 {
        match self {
            ArmLockReason::Installing => 1,
            ArmLockReason::Switching => 2,
            ArmLockReason::Trial => 3,
            ArmLockReason::RollingBack => 4,
            ArmLockReason::AutopilotMismatch => 5,
        }
    }

    /// Parses the contract string.
    pub fn parse(s: &str) -> Option<ArmLockReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s.trim())
    }
}

impl fmt::Display for ArmLockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flights of the running image since it was committed (or became the running one again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flights {
    /// Takeoff → landing cycles.
    pub flights: u32,
    /// Seconds in the air over those flights.
    pub airborne_secs: u64,
}
