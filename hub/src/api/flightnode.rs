//! The `FlightNode` custom resource: one per drone, `edge.drone.io/v1`, status written by the hub.
//!
//! Every optional status field is omitted when empty, so a server-side apply body only carries
//! what the hub knows. `conditions` is a list-map keyed by `type`, so apply merges by type.

use super::meta::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// API group.
pub const GROUP: &str = "edge.drone.io";
/// API version.
pub const VERSION: &str = "v1";
/// `apiVersion` of a `FlightNode`.
pub const API_VERSION: &str = "edge.drone.io/v1";
/// Kind.
pub const KIND: &str = "FlightNode";
/// Plural resource name.
pub const PLURAL: &str = "flightnodes";

/// Condition types, in the order they are listed.
pub mod condition {
    /// Summary: online, not upgrading, on the desired firmware.
    pub const READY: &str = "Ready";
    /// Heartbeats are arriving.
    pub const ONLINE: &str = "Online";
    /// An upgrade is in flight.
    pub const UPGRADE_IN_PROGRESS: &str = "UpgradeInProgress";
    /// The committed version equals `spec.firmwareVersion`.
    pub const FIRMWARE_SYNCED: &str = "FirmwareSynced";
}

/// Desired state of one drone.
#[allow(
    clippy::duplicated_attributes,
    reason = "clippy reads the repeated `type_ = …` of the printer columns as duplicated attributes"
)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "edge.drone.io",
    version = "v1",
    kind = "FlightNode",
    plural = "flightnodes",
    singular = "flightnode",
    shortname = "fn",
    category = "fleet",
    namespaced,
    status = "FlightNodeStatus",
    doc = "A drone managed by flightnode: desired firmware in spec, what the drone reports in status.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Firmware",
        type_ = "string",
        json_path = ".status.firmware.committedVersion"
    ),
    printcolumn(name = "Flights", type_ = "integer", json_path = ".status.firmware.flights"),
    printcolumn(name = "Slot", type_ = "string", json_path = ".status.firmware.activeSlot"),
    printcolumn(name = "Flight", type_ = "string", json_path = ".status.observedState"),
    printcolumn(
        name = "Arm-Lock",
        type_ = "string",
        json_path = ".status.armLock.reason",
        priority = 1
    ),
    printcolumn(
        name = "Last-Upgrade",
        type_ = "string",
        json_path = ".status.lastUpgrade.result"
    ),
    printcolumn(name = "Why", type_ = "string", json_path = ".status.lastUpgrade.errorCode"),
    printcolumn(
        name = "Last-Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct FlightNodeSpec {
    /// Hardware id of the board; bundles list the hardware ids they are compatible with.
    pub hardware_id: String,
    /// The firmware version the fleet wants on this drone, compared with the committed one
    /// only (status). Kept for existing objects; `firmware` (with a bundle URL) is what makes
    /// the hub install, and wins when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
    /// The firmware the hub installs on this drone: when it differs from the committed version
    /// and the drone is online, idle and allowed to, the hub publishes an upgrade command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareTarget>,
}

/// Wanted firmware: a version and the bundle that carries it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareTarget {
    /// Version the bundle's signed manifest carries (e.g. `1.4.0`).
    pub version: String,
    /// Bundle URL the drone downloads (`http://` or `https://`).
    pub url: String,
    /// Allow a version lower than the committed one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// A new attempt of the same target: a rollout's `retry` raises it for the drones that
    /// failed, which makes a new generation and so a new upgrade id (0: the first attempt).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry: u32,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl FirmwareTarget {
    /// The same version, bundle and downgrade permission, whatever the attempt.
    pub fn same_target(&self, other: &FirmwareTarget) -> bool {
        self.version == other.version
            && self.url == other.url
            && self.allow_downgrade == other.allow_downgrade
    }
}

impl FlightNodeSpec {
    /// The version this drone should run: `firmware.version`, else `firmwareVersion`.
    pub fn desired_version(&self) -> Option<&str> {
        self.firmware
            .as_ref()
            .map(|f| f.version.as_str())
            .or(self.firmware_version.as_deref())
    }
}

/// What the drone reports, as written by `flightnode-hub`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlightNodeStatus {
    /// Upgrade phase: `Idle`, `Downloading`, `Staged`, `Switching`, `Testing`, `RollingBack`,
    /// `Waiting` (held by the drone's flight gate, link policy or charging rule; `waitReason` says
    /// why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// In phase `Waiting`: `armed`, `in_air`, `battery_low` or `flight_state_unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// What the vehicle is doing, from its flight controller: `disarmed`, `armed`, `in-air` or
    /// `unknown` (no MAVLink heartbeat). Absent when the drone reads no flight state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_state: Option<String>,
    /// The flight controller's details behind `observedState`. Changes here alone do not cause
    /// a write; they ride along with the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flight: Option<Flight>,
    /// Why the drone's agent keeps the vehicle from arming (its arming interlock); absent while
    /// it may arm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_lock: Option<ArmLock>,
    /// Which trusted time the drone judges the expiry of hub-signed commands by: `gps` (the
    /// flight controller's GPS time), `hub` (this hub's signed time), `system` (its own clock:
    /// nothing better heard) or `floor` (its clock is behind the newest trusted time it saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_source: Option<String>,
    /// Slots and versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// How the last upgrade ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade: Option<LastUpgrade>,
    /// When the hub received the last heartbeat (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_heartbeat_time: Option<String>,
    /// The agent's sequence number of that heartbeat (monotonic per drone state dir): which hub
    /// replica wrote the newest status, without comparing two pods' clocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_seq: Option<u64>,
    /// Coarse resource usage (rounded so that normal jitter does not cause writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The agent that reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// The drone's own id, from its heartbeat. The object's name is that id when it is a valid
    /// Kubernetes name, else a lower-cased form with a hash suffix (`Drone_7` → `drone-7-1a2b3c4d`);
    /// the hub sends commands to `firmware/<deviceId>/…`, so such a drone stays reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// `metadata.generation` of the spec this status was computed against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kubernetes-style conditions, keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The upgrade the drone is working on now (from its heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_upgrade: Option<CurrentUpgrade>,
    /// What the hub's node reconciler did about `spec.firmware` (its own field manager,
    /// `flightnode-hub-reconciler`, so heartbeat status writes never touch it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_sync: Option<FirmwareSync>,
}

/// The upgrade a drone reports as in flight.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CurrentUpgrade {
    /// Upgrade id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Target version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The node reconciler's record for one generation of `spec.firmware`: written **before** an
/// upgrade command is published, so a restarted or new leader republishes the same upgrade id
/// (which the agent deduplicates) instead of starting a second install.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareSync {
    /// `metadata.generation` this record is about.
    pub observed_generation: i64,
    /// Version wanted by that generation (empty when it wants none).
    pub version: String,
    /// `Pending`, `Waiting`, `InProgress`, `Retrying`, `Synced` or `Failed`; `Canceling` when
    /// no firmware is wanted any more and only cancels wait for the drone's acknowledgement.
    pub reason: String,
    /// Human sentence.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Upgrade id of the latest attempt (derived from uid, generation and attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_id: Option<String>,
    /// Attempts made for this generation.
    #[serde(default)]
    pub attempts: u32,
    /// When the latest attempt was published (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_attempt_time: Option<String>,
    /// Cancels of earlier upgrades the drone has not acknowledged yet: sent again after a
    /// back-off until the drone reports the upgrade ended (canceled, or run to its end) or
    /// took up a command sent after the cancel. A broker keeps a command it acknowledged only
    /// as long as it keeps the drone's session, so one acknowledgement is no delivery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_cancels: Vec<PendingCancel>,
}

/// A cancel sent and not acknowledged by the drone yet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCancel {
    /// The upgrade to cancel.
    pub upgrade_id: String,
    /// When the broker first acknowledged the cancel (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub first_sent_time: String,
    /// When it was last sent (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_sent_time: String,
    /// How often the broker acknowledged it.
    pub sends: u32,
}

/// Active/booted slot, per-slot version and state, committed version.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Firmware {
    /// Slot the drone would start: `a` or `b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_slot: Option<String>,
    /// Slot running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_slot: Option<String>,
    /// Version of the committed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_version: Option<String>,
    /// Slot `a`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_a: Option<SlotInfo>,
    /// Slot `b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_b: Option<SlotInfo>,
    /// Lowest security version the drone accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_floor: Option<i64>,
    /// Flights (takeoff to landing) of the running image since it was committed, counted by
    /// the drone from its flight controller; absent when the drone has no MAVLink link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flights: Option<i64>,
    /// Airborne time over those flights, like `1h2m5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flight_time: Option<String>,
}

/// The arming interlock of the drone's agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArmLock {
    /// `installing`, `switching`, `trial`, `rolling_back` or `autopilot_mismatch`.
    pub reason: String,
    /// What the pilot's ground station is told, e.g. `installing 3.0.0 into slot b`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The flight controller as the drone's agent reads it over MAVLink.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flight {
    /// Armed (HEARTBEAT base_mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub armed: Option<bool>,
    /// `on_ground`, `in_air`, `takeoff`, `landing` or `undefined` (EXTENDED_SYS_STATE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landed_state: Option<String>,
    /// Remaining battery, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_percent: Option<i32>,
    /// Autopilot, e.g. `ardupilotmega`, `px4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autopilot: Option<String>,
    /// Flight-controller firmware version (AUTOPILOT_VERSION).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<String>,
}

/// One slot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlotInfo {
    /// Firmware version in the slot, when it holds a complete image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `good`, `bad`, `trial` or `empty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// How the last upgrade ended.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastUpgrade {
    /// Upgrade id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Target version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `Committed`, `AlreadyInstalled`, `Rejected`, `Failed`, `RolledBack` or `Canceled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Error code (snake_case contract string), when it did not commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub finished_time: Option<String>,
}

/// Coarse resource usage.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU use, rounded to 10 %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<i32>,
    /// Memory in use, rounded to 10 % of the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_percent: Option<i32>,
    /// Total memory, as a Kubernetes quantity with two significant digits (`1.9Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total: Option<String>,
    /// Free disk on the agent's state filesystem, as a quantity with two significant digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free: Option<String>,
    /// Board temperature, rounded to 5 °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<i32>,
}

/// The reporting agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Boot id: changes on every boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// A `FlightNode` object with only a name, namespace and spec (what auto-registration creates).
pub fn new_flightnode(name: &str, namespace: &str, hardware_id: &str) -> FlightNode {
    let mut node = FlightNode::new(
        name,
        FlightNodeSpec {
            hardware_id: hardware_id.to_owned(),
            firmware_version: None,
            firmware: None,
        },
    );
    node.metadata.namespace = Some(namespace.to_owned());
    node
}

/// The `FlightNode` name for a device id: the id itself when it is a valid DNS subdomain name,
/// else a lower-cased, `_`→`-` form plus `-` and 8 hex digits of its SHA-256 (so `Drone_1` and
/// `drone-1` do not collide).
pub fn object_name(device_id: &str) -> String {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    if valid(device_id) {
        return device_id.to_owned();
    }
    let mut base: String = device_id
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .collect();
    base = base.trim_matches('-').to_owned();
    let hash = hex::encode(sha2::Sha256::digest(device_id.as_bytes()));
    if base.is_empty() {
        format!("d-{}", &hash[..8])
    } else {
        format!("{base}-{}", &hash[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_name_keeps_valid_names_and_maps_the_rest_without_collisions() {
        let hash = |id: &str| hex::encode(sha2::Sha256::digest(id.as_bytes()))[..8].to_owned();
        for (id, want) in [
            ("drone-1", "drone-1".to_owned()),
            ("fleet.eu-1.drone-7", "fleet.eu-1.drone-7".to_owned()),
            ("Drone_1", format!("drone-1-{}", hash("Drone_1"))),
            ("-edge-", format!("edge-{}", hash("-edge-"))),
            ("a..b", format!("a--b-{}", hash("a..b"))),
            ("___", format!("d-{}", hash("___"))),
            ("", format!("d-{}", hash(""))),
        ] {
            assert_eq!(object_name(id), want, "{id:?}");
        }
        assert_ne!(object_name("Drone_1"), object_name("drone-1"));
        assert_ne!(object_name("Drone_1"), object_name("drone_1"));
    }
}
