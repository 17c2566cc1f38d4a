//! Heartbeat → `FlightNodeStatus`: phase names, coarse resources, conditions.
//!
//! Pure functions: no clock is read here; callers pass the time as an RFC 3339 string.

use crate::api::flightnode::{
    AgentInfo, CurrentUpgrade, Firmware, Flight, FlightNodeStatus, LastUpgrade, Resources, SlotInfo,
    condition,
};
use crate::api::meta::Condition;
use flightnode_proto::v1::HeartbeatRequest;
use time::OffsetDateTime;

/// The spec fields a status depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecView {
    /// The desired version: `spec.firmware.version`, else `spec.firmwareVersion`.
    pub firmware_version: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The node reconciler's (reason, message) for this generation (`status.firmwareSync`).
    pub sync: Option<(String, String)>,
    /// `status.lastHeartbeatTime` as stored (unix seconds): another replica may have written it.
    pub stored_heartbeat_unix: i64,
    /// `status.heartbeatSeq` as stored (0: none).
    pub stored_seq: u64,
}

impl SpecView {
    /// What a status computation needs from a stored object.
    pub fn of(node: &crate::api::flightnode::FlightNode) -> SpecView {
        let generation = node.metadata.generation;
        let status = node.status.as_ref();
        let sync = status
            .and_then(|s| s.firmware_sync.as_ref())
            .filter(|s| Some(s.observed_generation) == generation)
            .map(|s| (s.reason.clone(), s.message.clone()));
        let stored_heartbeat_unix = status
            .and_then(|s| s.last_heartbeat_time.as_deref())
            .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
            .map_or(0, OffsetDateTime::unix_timestamp);
        SpecView {
            firmware_version: node.spec.desired_version().map(str::to_owned),
            generation,
            sync,
            stored_heartbeat_unix,
            stored_seq: status.and_then(|s| s.heartbeat_seq).unwrap_or(0),
        }
    }
}

/// Whether heartbeats are arriving, by the hub's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The last heartbeat is within the grace period.
    Online,
    /// No heartbeat for longer than the grace period (seconds since the last one).
    Offline {
        /// Seconds since the last heartbeat.
        silent_secs: u64,
    },
}

/// `downloading` → `Downloading`, `rolling_back` → `RollingBack`.
pub fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// RFC 3339 with whole seconds, as Kubernetes writes times.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Unix seconds → RFC 3339; `None` for 0 or out of range.
pub fn unix_rfc3339(secs: i64) -> Option<String> {
    if secs <= 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp(secs).ok().map(rfc3339)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Bytes as a Kubernetes binary quantity with two significant digits: `1.9Gi`, `512Mi`, `0`.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a rounded value below 1024 of its unit"
)]
pub fn coarse_quantity(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return bytes.to_string();
    }
    if value < 10.0 {
        let rounded = (value * 10.0).round() / 10.0;
        if rounded.fract() == 0.0 {
            format!("{}{}", rounded as u64, UNITS[unit])
        } else {
            format!("{rounded:.1}{}", UNITS[unit])
        }
    } else {
        let magnitude = if value < 100.0 { 1.0 } else { 10.0 };
        format!(
            "{}{}",
            ((value / magnitude).round() * magnitude) as u64,
            UNITS[unit]
        )
    }
}

/// `value` rounded to a multiple of `step`, as a whole number.
#[allow(
    clippy::cast_possible_truncation,
    reason = "percentages and temperatures; `as` saturates anything absurd"
)]
fn round_to(value: f64, step: f64) -> i32 {
    ((value / step).round() * step) as i32
}

/// Seconds as a Go-style duration, the way Kubernetes prints them: `0s`, `45s`, `12m30s`,
/// `1h2m5s`.
pub fn duration_text(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The part of the status that comes from one heartbeat: no conditions, no heartbeat time.
pub fn from_heartbeat(hb: &HeartbeatRequest) -> FlightNodeStatus {
    // Normalised first: a phase of only underscores ("_") has no word to name and is idle like
    // an empty one, instead of an empty phase and an empty condition reason.
    let phase = match hb.upgrade.as_ref().map(|u| camel_case(&u.phase)) {
        None => "Idle".to_owned(),
        Some(p) if p.is_empty() => "Idle".to_owned(),
        Some(p) => p,
    };
    let firmware = hb.firmware.as_ref().map(|f| {
        let slot = |s: &Option<flightnode_proto::v1::SlotInfo>| {
            s.as_ref().map(|s| SlotInfo {
                version: non_empty(&s.version),
                state: non_empty(&s.state),
            })
        };
        Firmware {
            active_slot: non_empty(&f.active_slot),
            booted_slot: non_empty(&f.booted_slot),
            committed_version: non_empty(&f.committed_version),
            slot_a: slot(&f.slot_a),
            slot_b: slot(&f.slot_b),
            security_floor: i64::try_from(f.security_floor).ok().filter(|v| *v > 0),
            flights: f.flights.map(i64::from),
            flight_time: f.airborne_seconds.map(duration_text),
        }
    });
    let last_upgrade = hb
        .last_upgrade
        .as_ref()
        .filter(|l| !l.upgrade_id.is_empty())
        .map(|l| LastUpgrade {
            id: non_empty(&l.upgrade_id),
            version: non_empty(&l.version),
            result: non_empty(&l.result).map(|r| camel_case(&r)),
            error_code: non_empty(&l.error_code),
            error_message: non_empty(&l.error_message),
            finished_time: unix_rfc3339(l.finished_unix),
        });
    let resources = hb.resources.as_ref().map(|r| {
        let memory_used_percent = (r.memory_total_bytes > 0).then(|| {
            round_to(
                r.memory_used_bytes as f64 * 100.0 / r.memory_total_bytes as f64,
                10.0,
            )
        });
        Resources {
            cpu_percent: Some(round_to(f64::from(r.cpu_percent.clamp(0.0, 100.0)), 10.0)),
            memory_used_percent,
            memory_total: (r.memory_total_bytes > 0).then(|| coarse_quantity(r.memory_total_bytes)),
            disk_free: Some(coarse_quantity(r.disk_free_bytes)),
            temperature_celsius: r
                .temperature_celsius
                .filter(|t| t.is_finite())
                .map(|t| round_to(f64::from(t), 5.0)),
        }
    });
    let current_upgrade = hb
        .upgrade
        .as_ref()
        .filter(|u| !u.upgrade_id.is_empty())
        .map(|u| CurrentUpgrade {
            id: non_empty(&u.upgrade_id),
            version: non_empty(&u.version),
        });
    let agent = Some(AgentInfo {
        version: non_empty(&hb.agent_version),
        boot_id: non_empty(&hb.boot_id),
    });
    let wait_reason = hb
        .upgrade
        .as_ref()
        .filter(|_| phase == "Waiting")
        .and_then(|u| non_empty(&u.wait_reason));
    // Only the contract's four values; anything else a drone sends is unknown.
    let observed_state = hb.flight.as_ref().map(|f| {
        flightnode_proto::ObservedState::parse(&f.observed)
            .unwrap_or_default()
            .as_str()
            .to_owned()
    });
    let flight = hb.flight.as_ref().map(|f| Flight {
        armed: f.armed,
        landed_state: non_empty(&f.landed_state),
        battery_percent: f.battery_percent.map(|b| b.min(100).cast_signed()),
        autopilot: non_empty(&f.autopilot),
        firmware_version: non_empty(&f.firmware_version),
    });
    // A reason this hub does not know is shown as the drone sent it (it is only displayed).
    let arm_lock = hb
        .arm_lock
        .as_ref()
        .filter(|l| !l.reason.trim().is_empty())
        .map(|l| crate::api::flightnode::ArmLock {
            reason: l.reason.trim().chars().take(64).collect(),
            message: l.message.chars().take(256).collect(),
        });
    // Only the contract's values; an agent without the trusted clock sends none.
    let clock_source = match hb.clock_source.as_str() {
        "" => None,
        s @ ("gps" | "hub" | "system" | "floor") => Some(s.to_owned()),
        _ => Some("unknown".to_owned()),
    };
    FlightNodeStatus {
        phase: Some(phase),
        wait_reason,
        observed_state,
        flight,
        arm_lock,
        clock_source,
        firmware,
        last_upgrade,
        last_heartbeat_time: None,
        heartbeat_seq: None,
        resources,
        agent,
        device_id: non_empty(&hb.device_id),
        observed_generation: None,
        conditions: Vec::new(),
        current_upgrade,
        firmware_sync: None,
    }
}

fn cond(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: String::new(),
        observed_generation: None,
    }
}

/// Adds conditions and `observedGeneration` to a heartbeat-derived status.
///
/// `previous` are the conditions last computed for this drone: a condition whose status did not
/// change keeps its `lastTransitionTime`; otherwise it becomes `now`.
pub fn with_conditions(
    mut status: FlightNodeStatus,
    liveness: Liveness,
    spec: &SpecView,
    previous: &[Condition],
    now: &str,
) -> FlightNodeStatus {
    let committed = status.firmware.as_ref().and_then(|f| f.committed_version.clone());
    let phase = status.phase.clone().unwrap_or_else(|| "Idle".to_owned());
    let upgrading = phase != "Idle";

    let online = match liveness {
        Liveness::Online => cond(
            condition::ONLINE,
            "True",
            "HeartbeatReceived",
            "heartbeats are arriving".into(),
        ),
        Liveness::Offline { silent_secs } => cond(
            condition::ONLINE,
            "False",
            "HeartbeatTimeout",
            format!("no heartbeat for {silent_secs}s"),
        ),
    };
    let in_progress = if let Some(reason) = status.wait_reason.as_deref() {
        // Why it waits, as the reason: `WaitingInAir`, `WaitingArmed`, `WaitingBatteryLow`,
        // `WaitingMeteredLink`, `WaitingDownloadWindow`, `WaitingNotCharging`; a newer agent's
        // reason passes through the same way.
        cond(
            condition::UPGRADE_IN_PROGRESS,
            "True",
            &format!("Waiting{}", camel_case(reason)),
            if matches!(reason, "metered_link" | "download_window" | "not_charging") {
                format!("upgrade waits: {}", wait_sentence(reason))
            } else {
                format!(
                    "upgrade waits for the vehicle: {} (observed state {})",
                    wait_sentence(reason),
                    status.observed_state.as_deref().unwrap_or("not reported")
                )
            },
        )
    } else if upgrading {
        cond(
            condition::UPGRADE_IN_PROGRESS,
            "True",
            &phase,
            format!("upgrade phase {phase}"),
        )
    } else {
        cond(
            condition::UPGRADE_IN_PROGRESS,
            "False",
            "Idle",
            "no upgrade in flight".into(),
        )
    };
    let synced = match (&spec.firmware_version, &committed) {
        // Nothing wanted, but a cancel the drone has not acknowledged yet: say so.
        (None, _) if spec.sync.as_ref().is_some_and(|(r, _)| r == "Canceling") => {
            let (reason, message) = spec.sync.clone().unwrap_or_default();
            cond(condition::FIRMWARE_SYNCED, "True", &reason, message)
        }
        (None, _) => cond(
            condition::FIRMWARE_SYNCED,
            "True",
            "NoDesiredVersion",
            "spec.firmware is not set".into(),
        ),
        (Some(want), Some(have)) if want == have => cond(
            condition::FIRMWARE_SYNCED,
            "True",
            "Synced",
            format!("committed version is {have}"),
        ),
        // The node reconciler says why it is not synced yet (waiting, in progress, failed).
        (Some(_), _) if spec.sync.as_ref().is_some_and(|(r, _)| r != "Synced") => {
            let (reason, message) = spec.sync.clone().unwrap_or_default();
            cond(condition::FIRMWARE_SYNCED, "False", &reason, message)
        }
        (Some(want), have) => cond(
            condition::FIRMWARE_SYNCED,
            "False",
            "Pending",
            format!(
                "committed version is {}, the spec wants {want}",
                have.as_deref().unwrap_or("unknown")
            ),
        ),
    };
    let ready = match liveness {
        Liveness::Offline { silent_secs } => cond(
            condition::READY,
            "Unknown",
            "HeartbeatTimeout",
            format!("no heartbeat for {silent_secs}s"),
        ),
        Liveness::Online if upgrading => cond(
            condition::READY,
            "False",
            "UpgradeInProgress",
            format!("upgrade phase {phase}"),
        ),
        Liveness::Online if synced.status != "True" => cond(
            condition::READY,
            "False",
            "FirmwareNotSynced",
            synced.message.clone(),
        ),
        Liveness::Online => cond(
            condition::READY,
            "True",
            "Ready",
            "online and on the desired firmware".into(),
        ),
    };

    let mut conditions = vec![ready, online, in_progress, synced];
    for c in &mut conditions {
        c.observed_generation = spec.generation;
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status && !p.last_transition_time.is_empty())
            .map_or_else(|| now.to_owned(), |p| p.last_transition_time.clone());
    }
    status.conditions = conditions;
    status.observed_generation = spec.generation;
    status
}

fn wait_sentence(reason: &str) -> &str {
    match reason {
        "armed" => "the vehicle is armed",
        "in_air" => "the vehicle is in the air",
        "battery_low" => "the battery is below the drone's minimum",
        "flight_state_unknown" => "the flight state is unknown (no flight-controller heartbeat)",
        "metered_link" => "the download would go over a metered link (it resumes on an unmetered one)",
        "download_window" => "outside the drone's download window",
        "not_charging" => "the vehicle is not charging (install.require_charging)",
        other => other,
    }
}

/// True when two statuses differ in more than the heartbeat time (a write is due).
pub fn content_differs(a: &FlightNodeStatus, b: &FlightNodeStatus) -> bool {
    let strip = |s: &FlightNodeStatus| FlightNodeStatus {
        last_heartbeat_time: None,
        heartbeat_seq: None,
        ..s.clone()
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::v1;

    fn heartbeat() -> HeartbeatRequest {
        let mut hb = flightnode_proto::sample::idle_heartbeat("drone-1", "1.0.0");
        hb.resources = Some(v1::Resources {
            cpu_percent: 12.3,
            memory_used_bytes: 300 << 20,
            memory_total_bytes: 1 << 30,
            disk_free_bytes: 5_000_000_000,
            load1: 0.2,
            uptime_seconds: 100,
            temperature_celsius: Some(41.0),
        });
        hb
    }

    #[test]
    fn names_and_quantities() {
        assert_eq!(camel_case("rolling_back"), "RollingBack");
        assert_eq!(camel_case("downloading"), "Downloading");
        assert_eq!(camel_case("already_installed"), "AlreadyInstalled");
        assert_eq!(coarse_quantity(0), "0");
        assert_eq!(coarse_quantity(1 << 30), "1Gi");
        assert_eq!(coarse_quantity(1_992_294_400), "1.9Gi");
        assert_eq!(coarse_quantity(512 << 20), "510Mi");
        assert_eq!(coarse_quantity(5_000_000_000), "4.7Gi");
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(45), "45s");
        assert_eq!(duration_text(750), "12m30s");
        assert_eq!(duration_text(3725), "1h2m5s");
        assert_eq!(unix_rfc3339(0), None);
        assert_eq!(
            unix_rfc3339(1_700_000_000).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }

    /// The drone's arming lock reaches `status.armLock`; none (or an empty reason) is absent, and
    /// a lock that comes or goes is a status change.
    #[test]
    fn the_arming_lock_maps_to_the_status() {
        let mut hb = heartbeat();
        assert_eq!(from_heartbeat(&hb).arm_lock, None);
        hb.arm_lock = Some(flightnode_proto::v1::ArmLock {
            reason: " ".into(),
            message: "x".into(),
        });
        assert_eq!(from_heartbeat(&hb).arm_lock, None, "no reason, no lock");
        hb.arm_lock = Some(flightnode_proto::v1::ArmLock {
            reason: "trial".into(),
            message: "2.0.0 in slot b is on trial, not yet confirmed".into(),
        });
        let s = from_heartbeat(&hb);
        let lock = s.arm_lock.clone().unwrap_or_default();
        assert_eq!(lock.reason, "trial");
        assert_eq!(lock.message, "2.0.0 in slot b is on trial, not yet confirmed");
        assert!(content_differs(&from_heartbeat(&heartbeat()), &s));
    }

    /// Flights since commit reach `status.firmware`; a drone without a MAVLink link has none.
    #[test]
    fn flights_since_commit_map_to_the_firmware_status() {
        let mut hb = heartbeat();
        let fw = from_heartbeat(&hb).firmware.unwrap_or_default();
        assert_eq!((fw.flights, fw.flight_time), (None, None));
        if let Some(f) = hb.firmware.as_mut() {
            f.flights = Some(3);
            f.airborne_seconds = Some(3725);
        }
        let before = from_heartbeat(&heartbeat());
        let s = from_heartbeat(&hb);
        let fw = s.firmware.clone().unwrap_or_default();
        assert_eq!(fw.flights, Some(3));
        assert_eq!(fw.flight_time.as_deref(), Some("1h2m5s"));
        assert!(content_differs(&before, &s), "a landing is a status change");
    }

    #[test]
    fn heartbeat_maps_to_status() {
        let mut hb = heartbeat();
        let s = from_heartbeat(&hb);
        assert_eq!(s.phase.as_deref(), Some("Idle"));
        let r = s.resources.clone().unwrap_or_default();
        assert_eq!(
            (r.cpu_percent, r.memory_used_percent, r.temperature_celsius),
            (Some(10), Some(30), Some(40))
        );
        // Jitter does not change the coarse status.
        if let Some(r) = hb.resources.as_mut() {
            r.cpu_percent = 14.0;
        }
        assert!(!content_differs(&s, &from_heartbeat(&hb)));
        hb.upgrade = Some(v1::CurrentUpgrade {
            upgrade_id: "u1".into(),
            phase: "rolling_back".into(),
            ..Default::default()
        });
        assert_eq!(from_heartbeat(&hb).phase.as_deref(), Some("RollingBack"));
        hb.last_upgrade = Some(v1::LastUpgrade {
            upgrade_id: "u0".into(),
            result: "rolled_back".into(),
            error_code: "health_check_failed".into(),
            finished_unix: 1_700_000_000,
            ..Default::default()
        });
        let lu = from_heartbeat(&hb).last_upgrade.unwrap_or_default();
        assert_eq!(lu.result.as_deref(), Some("RolledBack"));
        assert_eq!(lu.error_code.as_deref(), Some("health_check_failed"));
    }

    #[test]
    fn conditions_follow_liveness_spec_and_keep_transition_times() {
        let base = from_heartbeat(&heartbeat());
        let spec = SpecView {
            firmware_version: Some("1.0.0".into()),
            generation: Some(3),
            ..SpecView::default()
        };
        let s1 = with_conditions(base.clone(), Liveness::Online, &spec, &[], "T1");
        let get = |s: &FlightNodeStatus, t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(get(&s1, "Ready").status, "True");
        assert_eq!(get(&s1, "FirmwareSynced").status, "True");
        assert_eq!(s1.observed_generation, Some(3));

        let s2 = with_conditions(
            base.clone(),
            Liveness::Offline { silent_secs: 40 },
            &spec,
            &s1.conditions,
            "T2",
        );
        assert_eq!(get(&s2, "Online").status, "False");
        assert_eq!(get(&s2, "Online").reason, "HeartbeatTimeout");
        assert_eq!(get(&s2, "Ready").status, "Unknown");
        assert_eq!(get(&s2, "Ready").last_transition_time, "T2");
        assert_eq!(get(&s2, "FirmwareSynced").last_transition_time, "T1");

        let want2 = SpecView {
            firmware_version: Some("2.0.0".into()),
            generation: Some(4),
            ..SpecView::default()
        };
        let s3 = with_conditions(base, Liveness::Online, &want2, &s2.conditions, "T3");
        assert_eq!(get(&s3, "FirmwareSynced").status, "False");
        assert_eq!(get(&s3, "Ready").reason, "FirmwareNotSynced");
        assert!(content_differs(&s1, &s3));
    }

    /// A crash of the `heartbeat` fuzz target (its phase invariant): device "drone-1" with an
    /// upgrade whose phase is "_" made an empty `phase` and an `UpgradeInProgress` condition with
    /// an empty reason.
    #[test]
    fn an_underscore_phase_is_idle_not_empty() {
        use prost::Message;
        let input = b"\x0a\x07drone-1\x32\x03\x12\x01_";
        let hb = HeartbeatRequest::decode(&input[..]).unwrap();
        assert_eq!(hb.upgrade.as_ref().map(|u| u.phase.as_str()), Some("_"));
        let s = with_conditions(
            from_heartbeat(&hb),
            Liveness::Online,
            &SpecView::default(),
            &[],
            "T",
        );
        assert_eq!(s.phase.as_deref(), Some("Idle"));
        assert!(s.conditions.iter().all(|c| !c.reason.is_empty()));
        crate::heartbeat::fuzzing::heartbeat(input);
    }
}
