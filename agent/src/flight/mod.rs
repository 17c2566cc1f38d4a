//! The flight gate: never switch, apply, reboot or roll back while the vehicle is armed or flying.
//!
//! # Layout
//! - [`link`]: reads one vehicle's MAVLink stream (version 1 or 2; the agent sends nothing but
//!   the stream requests it needs) into a [`FlightState`] that the daemon reports and the gate
//!   judges.
//! - [`track`]: what is believed: one MAVLink system, values that expire, changes that open
//!   the gate only once confirmed.
//! - [`gate`]: the policy of `[flight]` (allowed states, battery floor, what unknown means) and
//!   the `gate_command` of boards without MAVLink; [`Gate::check`] says go or why to wait.
//!
//! - [`arm`]: the arming interlock: when the vehicle must not arm, and how the link tells the
//!   autopilot (a Lua script on ArduPilot, the arm-authorisation protocol on PX4).
//! - [`log`]: flights since the running image was committed (takeoff → landing cycles and
//!   airborne time), persisted and reported upstream.
//!
//! The engine calls the gate before each step that touches the vehicle or the running system and
//! holds the upgrade in phase `waiting` (persisted, with the reason) until it says go.

pub mod arm;
pub mod gate;
pub mod link;
pub mod log;
mod track;

pub use gate::{Gate, Verdict};
pub use link::Monitor;

use flightnode_proto::ObservedState;
use serde::Serialize;

/// What the flight controller last told us, as reported upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FlightState {
    /// Summary used by the gate and the FlightNode's `observedState`.
    pub observed: ObservedState,
    /// HEARTBEAT `base_mode` has `MAV_MODE_FLAG_SAFETY_ARMED`.
    pub armed: Option<bool>,
    /// EXTENDED_SYS_STATE `landed_state`: `on_ground`, `in_air`, `takeoff`, `landing`, `undefined`.
    pub landed_state: Option<String>,
    /// Remaining battery from BATTERY_STATUS (or SYS_STATUS), 0-100.
    pub battery_percent: Option<u8>,
    /// The vehicle reported a battery level on this link, but none lately: unknown, not absent.
    #[serde(skip)]
    pub battery_expired: bool,
    /// BATTERY_STATUS `charge_state` is MAV_BATTERY_CHARGE_STATE_CHARGING (a MAVLink 2 extension
    /// field: a MAVLink 1 frame reads as not charging); `None` when none was heard within
    /// `flight.stale_after`.
    #[serde(skip)]
    pub charging: Option<bool>,
    /// HEARTBEAT `autopilot`, e.g. `ardupilotmega`, `px4`.
    pub autopilot: Option<String>,
    /// HEARTBEAT `system_status`, e.g. `standby`, `active`.
    pub system_status: Option<String>,
    /// AUTOPILOT_VERSION `flight_sw_version` as `major.minor.patch`, when the vehicle offers it.
    pub firmware_version: Option<String>,
    /// SYSTEM_TIME `time_unix_usec` (GPS time; 0 without a fix is not taken) as unix
    /// milliseconds, and when it was heard: the trusted clock's best source.
    #[serde(skip)]
    pub gps_time: Option<(i64, std::time::Instant)>,
}

impl FlightState {
    /// Whether the vehicle is taking off, flying or landing according to `landed_state`.
    pub fn in_air(&self) -> bool {
        matches!(
            self.landed_state.as_deref(),
            Some("in_air" | "takeoff" | "landing")
        )
    }

    /// Whether the vehicle is armed and its landed state is not known to be `on_ground` (none
    /// reported lately, or `undefined`): it may be flying, so it counts as in the air.
    pub fn armed_landed_state_unknown(&self) -> bool {
        self.armed == Some(true) && !self.in_air() && self.landed_state.as_deref() != Some("on_ground")
    }

    /// The observed state from the fields (`fresh` = a HEARTBEAT arrived within `stale_after`).
    pub fn summarize(&self, fresh: bool) -> ObservedState {
        if !fresh || self.armed.is_none() {
            ObservedState::Unknown
        } else if self.in_air() || self.armed_landed_state_unknown() {
            ObservedState::InAir
        } else if self.armed == Some(true) {
            ObservedState::Armed
        } else {
            ObservedState::Disarmed
        }
    }
}

/// Checks a `flight.mavlink` address without opening it.
pub fn check_address(address: &str) -> Result<(), String> {
    let (scheme, _) = address
        .split_once(':')
        .ok_or_else(|| format!("{address:?} is not SCHEME:ADDRESS"))?;
    if !matches!(scheme, "udpin" | "udpout" | "tcpin" | "tcpout" | "serial") {
        return Err(format!(
            "{address:?}: use udpin:, udpout:, tcpin:, tcpout: or serial:PORT:BAUD"
        ));
    }
    mavlink::ConnectionAddress::parse_address(address)
        .map(|_| ())
        .map_err(|e| format!("{address:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_state_prefers_in_air_over_armed_and_needs_a_fresh_heartbeat() {
        let mut s = FlightState {
            armed: Some(false),
            landed_state: Some("on_ground".into()),
            ..FlightState::default()
        };
        assert_eq!(s.summarize(true), ObservedState::Disarmed);
        assert_eq!(s.summarize(false), ObservedState::Unknown);
        s.armed = Some(true);
        assert_eq!(s.summarize(true), ObservedState::Armed);
        // Armed with no landed state, or an undefined one: it may be flying.
        for landed in [None, Some("undefined")] {
            let armed = FlightState {
                landed_state: landed.map(str::to_owned),
                ..s.clone()
            };
            assert_eq!(armed.summarize(true), ObservedState::InAir, "{landed:?}");
        }
        s.landed_state = Some("takeoff".into());
        assert_eq!(s.summarize(true), ObservedState::InAir);
        // Disarmed but still reported in the air (a landing not finished): in the air.
        s.armed = Some(false);
        assert_eq!(s.summarize(true), ObservedState::InAir);
    }

    #[test]
    fn addresses_are_checked() {
        for ok in [
            "udpin:0.0.0.0:14540",
            "tcpout:127.0.0.1:5760",
            "serial:/dev/ttyS1:921600",
        ] {
            check_address(ok).unwrap();
        }
        for bad in [
            "14540",
            "file:capture.tlog",
            "serial:/dev/ttyS1:fast",
            "http://fc",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }
}
