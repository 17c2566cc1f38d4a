//! The `FirmwareRollout` custom resource (`edge.drone.io/v1`, short name `fwr`): one bundle for
//! a selection of drones, in waves, with gates and a circuit breaker.
//!
//! It works by writing the wanted firmware into the `FlightNode` specs of the drones of the
//! current wave (server-side apply, one field manager per rollout: [`field_manager`]); the node
//! reconciler ([`crate::decide::node_sync`]) does the rest, so one path serves a single drone and
//! a fleet.
//!
//! Its waves and breaker are decided in [`crate::decide::rollout_waves`] and
//! [`crate::decide::rollout_plan`], carried out by [`crate::controller::rollout`], and shown by
//! [`crate::cmd::rollout`].

use super::flightnode::FirmwareTarget;
use super::meta::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Field manager of the rollout controller's status writes, and of every rollout's writes into
/// `FlightNode` specs before each rollout got its own ([`field_manager`]): drones dispatched by
/// an older hub still carry fields this manager owns.
pub const FIELD_MANAGER: &str = "flightnode-rollout";
/// Annotation on a `FlightNode`: which rollout wrote its `spec.firmware`, and the generation at
/// which that rollout's target was set (`NAME/GENERATION`, see `status.targetGeneration`).
pub const ANNOTATION_ROLLOUT: &str = "edge.drone.io/rollout";
/// Annotation on a `FlightNode`: [`firmware_hash`] of the `spec.firmware` the rollout wrote. A
/// `spec.firmware` that no longer matches it was edited by someone else after the dispatch, and
/// is theirs.
pub const ANNOTATION_TARGET: &str = "edge.drone.io/rollout-target";
/// Annotation on a `FlightNode`: when the rollout dispatched it (RFC 3339; the per-drone timeout
/// runs from here).
pub const ANNOTATION_DISPATCHED: &str = "edge.drone.io/rollout-dispatched";
/// Annotation on a `FlightNode`: the dispatching rollout's `spec.gates` (JSON), which the node
/// reconciler applies again right before it publishes the command.
pub const ANNOTATION_GATES: &str = "edge.drone.io/rollout-gates";

/// Annotation on a `FirmwareRollout`: an operator's request, JSON [`Request`]
/// (`kubectl flightnode rollout abort|resume|promote|retry NAME` writes it; so can `kubectl
/// annotate`). Metadata, not spec: it bumps no generation. The controller carries out each
/// request id once and records it in `status.history`.
pub const ANNOTATION_REQUEST: &str = "edge.drone.io/request";
/// Annotation on a `FirmwareRollout`: who last edited it, as the flightnode CLI saw its user
/// (the history names this editor; without it, the field manager of the latest spec write).
pub const ANNOTATION_EDITED_BY: &str = "edge.drone.io/edited-by";
/// Entries `status.history` keeps.
pub const HISTORY_LEN: usize = 20;

/// An operator's request in [`ANNOTATION_REQUEST`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `abort`, `resume`, `promote` or `retry`.
    pub action: String,
    /// Unique per request: the same id is carried out once.
    pub id: String,
    /// Who asked (the user as the CLI saw it).
    #[serde(default)]
    pub by: String,
    /// When (RFC 3339).
    #[serde(default)]
    pub at: String,
}

/// What `spec.droneTimeout` and `spec.waves[].soak` look like: Go-style, `30m`, `1h30m`, `90s`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";
/// `spec.progressDeadline` when it is not set, in seconds.
pub const DEFAULT_PROGRESS_DEADLINE_SECS: i64 = 3600;
/// `spec.failurePolicy.rules[].kind`.
pub const RULE_KINDS: [&str; 5] = ["failed", "rejected", "rolledBack", "timedOut", "any"];
/// `spec.gates.flightStates[]`: the contract's observed states.
pub const FLIGHT_STATES: [&str; 4] = ["disarmed", "armed", "in-air", "unknown"];

/// Condition types of a rollout.
pub mod condition {
    /// Waves are being worked through.
    pub const PROGRESSING: &str = "Progressing";
    /// The circuit breaker tripped (or the rollout is paused): no new dispatch.
    pub const HALTED: &str = "Halted";
    /// Every wave finished.
    pub const COMPLETE: &str = "Complete";
    /// Some selected drones belong to a newer rollout that selects them too: this one yields them
    /// (the reason is `NewerRollout`, the message names the newer rollouts).
    pub const SUPERSEDED: &str = "Superseded";
}

/// The field manager of one rollout's writes into `FlightNode` specs: `flightnode-rollout/NAME`.
/// One per rollout, so a rollout's call-back (an apply without the fields) gives up only what
/// that rollout wrote, and a write over another rollout's `spec.firmware` is a conflict unless
/// it is meant ([`crate::store::fleet::Dispatch::take_over`]). The API server allows 128
/// characters; a longer one ends in a hash of the name instead.
pub fn field_manager(rollout: &str) -> String {
    let full = format!("{FIELD_MANAGER}/{rollout}");
    if full.len() <= 128 {
        return full;
    }
    let digest = hex::encode(sha2::Sha256::digest(rollout.as_bytes()));
    let keep: String = full.chars().take(128 - 17).collect();
    format!("{keep}-{}", &digest[..16])
}

/// A short stable hash of a `spec.firmware` (version, url, allowDowngrade), for
/// [`ANNOTATION_TARGET`].
pub fn firmware_hash(target: &FirmwareTarget) -> String {
    let text = format!("{}\n{}\n{}", target.version, target.url, target.allow_downgrade);
    hex::encode(sha2::Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// A short stable hash of a rollout's target: what it writes (version, url, allowDowngrade) and
/// where (selector). Wave progress belongs to one target (`status.targetHash`): only a change of
/// it starts the waves over; `paused`, the gates, the breaker's rules or the waves do not.
pub fn target_hash(spec: &FirmwareRolloutSpec) -> String {
    let selector = spec
        .selector
        .as_ref()
        .and_then(|s| serde_json::to_string(s).ok())
        .unwrap_or_default();
    let text = format!(
        "{}\n{}\n{}\n{selector}",
        spec.version, spec.url, spec.allow_downgrade
    );
    hex::encode(sha2::Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// A fleet upgrade in waves.
#[allow(
    clippy::duplicated_attributes,
    reason = "clippy reads the repeated `type_ = …` of the printer columns as duplicated attributes"
)]
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "edge.drone.io",
    version = "v1",
    kind = "FirmwareRollout",
    plural = "firmwarerollouts",
    singular = "firmwarerollout",
    shortname = "fwr",
    category = "fleet",
    namespaced,
    status = "FirmwareRolloutStatus",
    doc = "A fleet firmware upgrade in waves, with gates and a circuit breaker.",
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Wave", type_ = "string", json_path = ".status.wave"),
    printcolumn(name = "Succeeded", type_ = "integer", json_path = ".status.counts.succeeded"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.counts.failedTotal"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.counts.total"),
    printcolumn(
        name = "Halted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Halted\")].status"
    ),
    printcolumn(
        name = "Complete",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Complete\")].status"
    ),
    printcolumn(
        name = "Next-Window",
        type_ = "string",
        json_path = ".status.maintenanceWindow.nextOpenTime"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareRolloutSpec {
    /// Version the bundle carries.
    #[schemars(length(min = 1))]
    pub version: String,
    /// Bundle URL (`http://` or `https://`).
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub url: String,
    /// Allow drones on a higher version to go down to this one (a rollback rollout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// Which `FlightNode`s (labels); empty: every one in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector_schema")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    /// Cumulative waves, the first one the canary. Drones are ranked by a stable hash of their
    /// name; wave N covers the first `count` (or `percent` %) of them. A last wave of 100 % is
    /// implied.
    #[serde(default)]
    pub waves: Vec<WaveSpec>,
    /// Which drones may start now.
    #[serde(default)]
    pub gates: Gates,
    /// When to stop the rollout.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// A drone that has not finished this long after it was dispatched counts as timed out
    /// (e.g. `30m`, `1h30m`; units `ms`, `s`, `m`, `h`, `d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub drone_timeout: Option<String>,
    /// Drones in flight at once (dispatched, not finished), at least 1; unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    /// No new dispatch while true; in-flight drones finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// How long an open wave may go without progress (a drone dispatched or finished, a wave
    /// advanced) before `Progressing` turns False with `ProgressDeadlineExceeded` and
    /// `rollout status` gives up (default `1h`). Soaks and pauses do not count. Like a
    /// Deployment's, the rollout itself goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub progress_deadline: Option<String>,
    /// How fast drones are dispatched (AWS IoT Jobs' rollout config): at most
    /// `maximumPerMinute` (default 600), optionally ramping up from `exponentialRate`.
    #[serde(default)]
    pub dispatch_rate: DispatchRate,
    /// When new drones may be dispatched: while any of these windows is open (none: always).
    /// Outside them nothing new is dispatched; drones already dispatched finish, soaks go on,
    /// and the progress deadline counts only time inside a window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintenance_windows: Vec<MaintenanceWindow>,
}

/// A maintenance window: it opens at each time of a cron schedule, read in a time zone, and
/// stays open for a duration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// When the window opens: a 5-field cron schedule, `minute hour day-of-month month
    /// day-of-week` (e.g. `0 22 * * 1-5`: 22:00 Monday to Friday), or `@daily`, `@weekly`, ….
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// How long it stays open from each opening (e.g. `6h`, `1h30m`; at least `1m`).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub duration: String,
    /// IANA time zone the schedule is read in (e.g. `Europe/Berlin`; default `UTC`).
    #[serde(default = "utc")]
    #[schemars(length(min = 1))]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// `status.maintenanceWindow`: whether the rollout's maintenance windows let it dispatch now.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindowStatus {
    /// A window is open: new drones may be dispatched.
    pub open: bool,
    /// While open: when the window closes (RFC 3339, in the window's time zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_time: Option<String>,
    /// When the next window opens (RFC 3339, in the window's time zone); while one is open, the
    /// first opening after it closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_open_time: Option<String>,
}

/// `spec.dispatchRate`: dispatches per minute, with an optional exponential ramp-up.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispatchRate {
    /// Drones dispatched in any 60 s, at most (at least 1); spread over the minute, a sixth of
    /// it (rounded up) in any 10 s.
    #[serde(default = "default_maximum_per_minute")]
    #[schemars(range(min = 1))]
    pub maximum_per_minute: u32,
    /// Start slower and speed up as drones succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential_rate: Option<ExponentialRate>,
}

/// The ramp-up: `baseRatePerMinute`, multiplied by `incrementFactor` each time another
/// `rateIncreaseCriteria.numberOfSucceededDrones` drones succeeded, up to `maximumPerMinute`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExponentialRate {
    /// The first minute's rate (at least 1).
    #[schemars(range(min = 1))]
    pub base_rate_per_minute: u32,
    /// Factor per step of the ramp, 1.1 to 5.
    #[schemars(range(min = 1.1, max = 5.0))]
    pub increment_factor: f64,
    /// When the rate steps up.
    pub rate_increase_criteria: RateIncreaseCriteria,
}

/// The ramp's step.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateIncreaseCriteria {
    /// Succeeded drones per step of the ramp (at least 1).
    #[schemars(range(min = 1))]
    pub number_of_succeeded_drones: u32,
}

fn default_maximum_per_minute() -> u32 {
    600
}

impl Default for DispatchRate {
    fn default() -> Self {
        DispatchRate {
            maximum_per_minute: default_maximum_per_minute(),
            exponential_rate: None,
        }
    }
}

impl DispatchRate {
    /// Dispatches allowed per minute once `succeeded` drones succeeded.
    pub fn per_minute(&self, succeeded: usize) -> usize {
        let max = self.maximum_per_minute.max(1) as usize;
        let Some(e) = &self.exponential_rate else {
            return max;
        };
        let steps = succeeded / e.rate_increase_criteria.number_of_succeeded_drones.max(1) as usize;
        let factor = e.increment_factor.clamp(1.0, 5.0);
        let rate = f64::from(e.base_rate_per_minute.max(1))
            * factor.powi(i32::try_from(steps.min(64)).unwrap_or(64));
        if rate >= max as f64 {
            max
        } else {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "rate is at least 1 and under `max` here"
            )]
            let whole = rate.floor() as usize;
            whole.max(1)
        }
    }
}

/// One wave: a cumulative share of the selected drones and how long to watch it before the next.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.count) != has(self.percent)",
    "message": "give exactly one of count or percent",
}]))]
pub struct WaveSpec {
    /// Drones covered up to and including this wave (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
    /// Percent of the selected drones covered up to and including this wave (rounded up), 1–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u32>,
    /// Time to watch the finished wave before the next one starts (e.g. `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub soak: Option<String>,
    /// Soak in flight: the next wave starts only once enough of this wave's succeeded drones
    /// have flown on the new firmware (besides `soak`, which is wall time). A drone that has not
    /// flown is inconclusive, never a success; `spec.progressDeadline` ends the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flight_soak: Option<FlightSoak>,
}

/// How much a wave's drones must fly on the new firmware before the next wave.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlightSoak {
    /// Flights (takeoff to landing) each drone must have made on the new firmware (at least 1).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub flights: u32,
    /// Airborne time each drone must have on the new firmware, besides the flights (e.g. `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub flight_time: Option<String>,
    /// Percent of the wave's succeeded drones that must have flown that much (rounded up, at
    /// least one drone), 1–100.
    #[serde(default = "hundred")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: u32,
}

fn one() -> u32 {
    1
}

fn hundred() -> u32 {
    100
}

/// Gates a drone must pass to be dispatched.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gates {
    /// Only drones whose `Online` condition is True.
    #[serde(default = "yes")]
    pub online: bool,
    /// Flight states a drone may start in (`status.observedState`).
    #[serde(default = "default_flight_states")]
    #[schemars(extend("items" = { "type": "string", "enum": FLIGHT_STATES }))]
    pub flight_states: Vec<String>,
    /// Whether a drone that reports no flight state may start (the agent gates again).
    #[serde(default = "yes")]
    pub allow_unknown_flight_state: bool,
    /// Minimum battery, when the drone reports one (0–100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub min_battery_percent: Option<u32>,
}

fn yes() -> bool {
    true
}

fn default_flight_states() -> Vec<String> {
    vec!["disarmed".to_owned()]
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            online: true,
            flight_states: default_flight_states(),
            allow_unknown_flight_state: true,
            min_battery_percent: None,
        }
    }
}

/// Circuit breaker: one rule per outcome kind (AWS IoT Jobs' abortConfig).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Rules; the rollout halts when any trips.
    #[serde(default)]
    pub rules: Vec<FailureRule>,
}

/// Trips when `kind` reaches `thresholdPercent` of finished drones once at least `minFinished`
/// have finished, or when it reaches `maxCount` drones at any time.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.thresholdPercent) || has(self.maxCount)",
    "message": "give thresholdPercent, maxCount or both",
}]))]
pub struct FailureRule {
    /// `failed`, `rejected`, `rolledBack`, `timedOut` or `any` (all four).
    #[schemars(extend("enum" = RULE_KINDS))]
    pub kind: String,
    /// Percent of finished drones, 1–100 (inclusive: 25 trips at exactly 25 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub threshold_percent: Option<u32>,
    /// Finished drones needed before the percentage is evaluated.
    #[serde(default)]
    pub min_finished: u32,
    /// Absolute cap: trips at this many drones of `kind` (at least 1), whatever the sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_count: Option<u32>,
}

/// What the controller observed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareRolloutStatus {
    /// Generation these numbers are about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Hash of the target (version, url, allowDowngrade, selector) the wave progress belongs to;
    /// the waves start over only when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_hash: Option<String>,
    /// Generation at which that target was first seen (the drones' rollout annotation names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_generation: Option<i64>,
    /// Index of the wave being dispatched (0 = canary).
    #[serde(default)]
    pub current_wave: u32,
    /// `2/3`-style wave progress for the printer column.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wave: String,
    /// When the current wave started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_started_time: Option<String>,
    /// When every drone of the current wave had finished (its soak runs from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_finished_time: Option<String>,
    /// Outcomes before this time do not count for the breaker (set when the target changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_since: Option<String>,
    /// Succeeded drones of the current wave that flew enough for its `flightSoak` (set while it
    /// soaks in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flown_drones: Option<u32>,
    /// The last time the rollout progressed (see `spec.progressDeadline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<String>,
    /// Whether `spec.maintenanceWindows` let the rollout dispatch now, and when that changes
    /// (absent without windows, and once the rollout is complete or halted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindowStatus>,
    /// Drones by outcome.
    #[serde(default)]
    pub counts: Counts,
    /// Set by an `abort` request: nothing new is dispatched and every drone that has not
    /// started is called back (`Halted` with reason `Aborted`), until a `resume` request or a
    /// new target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<Actor>,
    /// The wave whose soak a `promote` request ended (the next wave starts once it finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_wave: Option<u32>,
    /// Id of the last operator request (annotation `edge.drone.io/request`) carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
    /// What operators did to this rollout, oldest first, the last 20: created, edited, paused,
    /// resumed, aborted, promoted, retried, with who and when (also as Events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// Progressing, Halted, Complete, Superseded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Who did something, and when.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Actor {
    /// The user as the flightnode CLI saw it, else the field manager of the write.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// When (RFC 3339).
    pub time: String,
}

/// One operator action in `status.history`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// `Created`, `Edited`, `Paused`, `Resumed`, `Aborted`, `Promoted`, `Retried`; `Refused` for a request
    /// that made no sense (the message says why).
    pub action: String,
    /// The user as the flightnode CLI saw it, else the field manager of the write.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// When the controller saw it (RFC 3339).
    pub time: String,
    /// The rollout's generation then.
    pub generation: i64,
    /// What happened.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Drones of the rollout by outcome.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Selected drones.
    pub total: u32,
    /// In a wave not reached yet, or held back.
    pub not_started: u32,
    /// Dispatched, a gate holds them (offline, busy, flying).
    pub waiting: u32,
    /// Dispatched and working.
    pub in_progress: u32,
    /// On the rollout's version.
    pub succeeded: u32,
    /// Failed (download, space, internal) after the node reconciler's retries.
    pub failed: u32,
    /// Rejected (signature, compatibility, downgrade).
    pub rejected: u32,
    /// Rolled back (health check, trial boot).
    pub rolled_back: u32,
    /// Not finished within the per-drone timeout.
    pub timed_out: u32,
    /// Pinned by another field manager's `spec.firmware` (never overwritten).
    pub pinned: u32,
    /// Selected by a newer rollout too: that one's (the `Superseded` condition names it).
    #[serde(default)]
    pub superseded: u32,
    /// failed + rejected + rolledBack + timedOut.
    pub failed_total: u32,
}

/// The schema of a `metav1.LabelSelector` (k8s-openapi has no schemars 1 impls).
fn label_selector_schema(_: &mut SchemaGenerator) -> Schema {
    let schema = serde_json::json!({
        "type": "object",
        "description": "Label selector over FlightNodes (matchLabels and matchExpressions).",
        "properties": {
            "matchLabels": { "type": "object", "additionalProperties": { "type": "string" } },
            "matchExpressions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": { "type": "string" },
                        "operator": { "type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"] },
                        "values": { "type": "array", "items": { "type": "string" } },
                    },
                },
            },
        },
    });
    Schema::try_from(schema).unwrap_or_default()
}

/// `30m`, `1h30m`, `90s` ([`DURATION_PATTERN`]) → whole seconds; `None` for absent or not in
/// that form.
pub fn duration_secs(text: Option<&str>) -> Option<i64> {
    let mut rest = text?;
    if rest.is_empty() {
        return None;
    }
    let mut millis: i64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: i64 = rest.get(..digits)?.parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = match rest.as_bytes() {
            [b'm', b's', ..] => (1, 2),
            [b's', ..] => (1_000, 1),
            [b'm', ..] => (60_000, 1),
            [b'h', ..] => (3_600_000, 1),
            [b'd', ..] => (86_400_000, 1),
            _ => return None,
        };
        rest = &rest[len..];
        millis = millis.checked_add(n.checked_mul(unit_ms)?)?;
    }
    Some(millis / 1000)
}
