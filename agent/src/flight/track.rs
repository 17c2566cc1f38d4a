//! What the agent believes about one vehicle from its MAVLink messages (the I/O is in
//! [`super::link`]).
//!
//! - One MAVLink system only: `flight.system_id`, or the first autopilot HEARTBEAT heard (logged).
//!   A router or an open UDP port also carries ground stations, fleet-mates and spoofed datagrams,
//!   any of which may say "disarmed". Within that system, only the autopilot component.
//! - Each value expires on its own after `stale_after`: armed (HEARTBEAT), the landed state, the
//!   battery. An armed vehicle whose landed state expired counts as in the air.
//! - A change that would open the gate (to disarmed, to on the ground, to more battery, or from
//!   nothing to a value that does not hold it shut) is believed after `confirm_samples`
//!   consecutive samples agree on it; a change that closes the gate counts at once, from nothing
//!   too. One stray frame cannot open the gate.

use super::FlightState;
use mavlink::MavlinkVersion;
use mavlink::dialects::common::{
    MavAutopilot, MavBatteryChargeState, MavLandedState, MavMessage, MavModeFlag,
};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// MAV_COMP_ID_AUTOPILOT1: the flight controller itself, as opposed to cameras, gimbals, GCSs.
pub(super) const AUTOPILOT_COMPONENT: u8 = 1;

/// What the link believes and how: from `[flight]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    pub(super) system_id: Option<u8>,
    pub(super) confirm: usize,
    pub(super) stale_after: Duration,
}

/// One value carried by one message type: expires `stale_after` after its last sample, and moves
/// towards "safer to upgrade" (lower [`Risky::risk`]) only once `confirm` samples in a row agree.
#[derive(Debug)]
struct Tracked<T> {
    value: Option<T>,
    at: Option<Instant>,
    /// Consecutive samples that would lower the risk, not yet believed.
    pending: Vec<T>,
}

impl<T> Default for Tracked<T> {
    fn default() -> Self {
        Self {
            value: None,
            at: None,
            pending: Vec::new(),
        }
    }
}

/// How much a value holds the gate shut: higher = more.
trait Risky {
    fn risk(&self) -> i32;
    /// Whether this value alone holds the gate shut: believed at once even from unknown, so
    /// `unknown = "allow"` does not let an armed vehicle through while its first samples confirm.
    fn closes(&self) -> bool;
}

impl Risky for bool {
    /// `armed`.
    fn risk(&self) -> i32 {
        i32::from(*self)
    }
    fn closes(&self) -> bool {
        *self
    }
}

impl Risky for &'static str {
    /// A landed state: only `on_ground` lets an armed vehicle through.
    fn risk(&self) -> i32 {
        i32::from(*self != "on_ground")
    }
    fn closes(&self) -> bool {
        *self != "on_ground"
    }
}

impl Risky for u8 {
    /// Battery percent: less is riskier.
    fn risk(&self) -> i32 {
        -i32::from(*self)
    }
    /// Whether a level is too low is the gate's call (`min_battery_percent`).
    fn closes(&self) -> bool {
        false
    }
}

impl<T: Risky + Clone> Tracked<T> {
    fn get(&self, now: Instant, stale_after: Duration) -> Option<T> {
        let fresh = self
            .at
            .is_some_and(|t| now.saturating_duration_since(t) <= stale_after);
        self.value.clone().filter(|_| fresh)
    }

    fn sample(&mut self, v: T, now: Instant, rules: &Rules) {
        let current = self.get(now, rules.stale_after);
        if current.is_none() {
            // Expired: what was believed before the silence says nothing about now.
            self.value = None;
        }
        self.at = Some(now);
        let opens = match &current {
            None => !v.closes(),
            Some(c) => v.risk() < c.risk(),
        };
        if !opens {
            self.value = Some(v);
            self.pending.clear();
            return;
        }
        self.pending.push(v);
        if self.pending.len() >= rules.confirm {
            // Of the agreeing samples, the most cautious one.
            self.value = self.pending.drain(..).max_by_key(Risky::risk);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Latest {
    /// The vehicle's system id, once configured or heard.
    pub(super) system: Option<u32>,
    /// Systems already logged as ignored (each once).
    ignored: BTreeSet<u32>,
    /// The MAVLink version the vehicle speaks (its HEARTBEATs').
    pub(super) version: Option<MavlinkVersion>,
    armed: Tracked<bool>,
    landed: Tracked<&'static str>,
    battery: Tracked<u8>,
    /// Whether a battery level was ever believed on this link (then an expired one is unknown).
    battery_seen: bool,
    /// BATTERY_STATUS `charge_state` == CHARGING, and when it was heard. Taken as sent: only
    /// `install.require_charging` reads it, and not charging is its safe side.
    charging: Option<(bool, Instant)>,
    /// SYSTEM_TIME's unix time (from GPS) in milliseconds, and when it was heard.
    gps_time: Option<(i64, Instant)>,
    /// Whether the state was ever known: before that an unknown state is "not heard yet".
    pub(super) known_once: bool,
    autopilot: Option<String>,
    system_status: Option<String>,
    firmware_version: Option<String>,
}

impl Latest {
    pub(super) fn new(rules: &Rules) -> Self {
        Self {
            system: rules.system_id.map(u32::from),
            ..Self::default()
        }
    }

    /// Folds one message from `(system, component)`; true when it came from the vehicle.
    pub(super) fn fold(
        &mut self,
        (system, component): (u32, u8),
        version: MavlinkVersion,
        msg: &MavMessage,
        now: Instant,
        rules: &Rules,
    ) -> bool {
        if self.system.is_none()
            && component == AUTOPILOT_COMPONENT
            && let MavMessage::HEARTBEAT(hb) = msg
            && hb.autopilot != MavAutopilot::MAV_AUTOPILOT_INVALID
        {
            tracing::info!(
                system_id = system,
                "MAVLink: following system {system}, the first autopilot heard; \
                 set flight.system_id to pin it"
            );
            self.system = Some(system);
        }
        if self.system != Some(system) {
            if self.ignored.insert(system) {
                tracing::warn!(system_id = system, following = ?self.system,
                    "MAVLink: ignoring system {system}: not the vehicle this agent follows");
            }
            return false;
        }
        if component != AUTOPILOT_COMPONENT {
            return false;
        }
        match msg {
            MavMessage::HEARTBEAT(hb) => {
                // A ground station's or a companion's HEARTBEAT on the vehicle's system id.
                if hb.autopilot == MavAutopilot::MAV_AUTOPILOT_INVALID {
                    return false;
                }
                self.version = Some(version);
                self.armed.sample(
                    hb.base_mode.contains(MavModeFlag::MAV_MODE_FLAG_SAFETY_ARMED),
                    now,
                    rules,
                );
                self.autopilot = Some(enum_name(&hb.autopilot, "MAV_AUTOPILOT_"));
                self.system_status = Some(enum_name(&hb.system_status, "MAV_STATE_"));
            }
            MavMessage::EXTENDED_SYS_STATE(x) => {
                let landed = match x.landed_state {
                    MavLandedState::MAV_LANDED_STATE_ON_GROUND => "on_ground",
                    MavLandedState::MAV_LANDED_STATE_IN_AIR => "in_air",
                    MavLandedState::MAV_LANDED_STATE_TAKEOFF => "takeoff",
                    MavLandedState::MAV_LANDED_STATE_LANDING => "landing",
                    MavLandedState::MAV_LANDED_STATE_UNDEFINED => "undefined",
                };
                self.landed.sample(landed, now, rules);
            }
            // -1 = the autopilot does not know: no sample.
            MavMessage::BATTERY_STATUS(b) if b.id == 0 => {
                self.charging = Some((
                    b.charge_state == MavBatteryChargeState::MAV_BATTERY_CHARGE_STATE_CHARGING,
                    now,
                ));
                if b.battery_remaining >= 0 {
                    self.battery
                        .sample(b.battery_remaining.unsigned_abs().min(100), now, rules);
                }
            }
            MavMessage::SYS_STATUS(s) if s.battery_remaining >= 0 => {
                self.battery
                    .sample(s.battery_remaining.unsigned_abs().min(100), now, rules);
            }
            // ArduPilot and PX4 send 0 until GPS gave them the time.
            MavMessage::SYSTEM_TIME(t) if t.time_unix_usec > 0 => {
                let ms = i64::try_from(t.time_unix_usec / 1000).unwrap_or(i64::MAX);
                self.gps_time = Some((ms, now));
            }
            MavMessage::AUTOPILOT_VERSION(v) => {
                let [major, minor, patch, _type] = v.flight_sw_version.to_be_bytes();
                self.firmware_version = Some(format!("{major}.{minor}.{patch}"));
            }
            _ => {}
        }
        true
    }

    /// When the message with MAVLink id `id` (EXTENDED_SYS_STATE 245, SYS_STATUS 1,
    /// BATTERY_STATUS 147) last gave a sample.
    pub(super) fn last_sample(&self, id: u32) -> Option<Instant> {
        match id {
            245 => self.landed.at,
            1 | 147 => self.battery.at,
            2 => self.gps_time.map(|(_, at)| at),
            _ => None,
        }
    }

    pub(super) fn state(&mut self, now: Instant, rules: &Rules) -> FlightState {
        let armed = self.armed.get(now, rules.stale_after);
        let battery = self.battery.get(now, rules.stale_after);
        self.battery_seen |= battery.is_some();
        let mut s = FlightState {
            armed,
            landed_state: self.landed.get(now, rules.stale_after).map(str::to_owned),
            battery_percent: battery,
            battery_expired: self.battery_seen && battery.is_none(),
            charging: self
                .charging
                .filter(|(_, at)| now.saturating_duration_since(*at) <= rules.stale_after)
                .map(|(c, _)| c),
            autopilot: self.autopilot.clone(),
            system_status: self.system_status.clone(),
            firmware_version: self.firmware_version.clone(),
            gps_time: self.gps_time,
            ..FlightState::default()
        };
        s.observed = s.summarize(armed.is_some());
        self.known_once |= armed.is_some();
        s
    }
}

/// `MAV_AUTOPILOT_ARDUPILOTMEGA` → `ardupilotmega`.
fn enum_name(value: &impl std::fmt::Debug, prefix: &str) -> String {
    let name = format!("{value:?}");
    name.strip_prefix(prefix).unwrap_or(&name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::ObservedState;
    use mavlink::dialects::common::{
        BATTERY_STATUS_DATA, EXTENDED_SYS_STATE_DATA, HEARTBEAT_DATA, MavState, MavType, SYS_STATUS_DATA,
    };

    #[test]
    fn charging_is_battery_status_charge_state_and_expires() {
        let t = Instant::now();
        let mut l = Latest::new(&RULES);
        feed(&mut l, (1, 1), &heartbeat(false), t, &RULES);
        assert_eq!(l.state(t, &RULES).charging, None, "nothing heard");
        let battery = |charge_state| {
            MavMessage::BATTERY_STATUS(BATTERY_STATUS_DATA {
                charge_state,
                battery_remaining: 50,
                ..BATTERY_STATUS_DATA::DEFAULT
            })
        };
        feed(
            &mut l,
            (1, 1),
            &battery(MavBatteryChargeState::MAV_BATTERY_CHARGE_STATE_CHARGING),
            t,
            &RULES,
        );
        assert_eq!(l.state(t, &RULES).charging, Some(true));
        feed(
            &mut l,
            (1, 1),
            &battery(MavBatteryChargeState::MAV_BATTERY_CHARGE_STATE_OK),
            t,
            &RULES,
        );
        assert_eq!(l.state(t, &RULES).charging, Some(false));
        // A MAVLink 1 frame has no extension fields: it reads as the default, not charging.
        feed(
            &mut l,
            (1, 1),
            &MavMessage::BATTERY_STATUS(BATTERY_STATUS_DATA::DEFAULT),
            t,
            &RULES,
        );
        assert_eq!(l.state(t, &RULES).charging, Some(false));
        feed(
            &mut l,
            (1, 1),
            &battery(MavBatteryChargeState::MAV_BATTERY_CHARGE_STATE_CHARGING),
            t,
            &RULES,
        );
        let later = t + RULES.stale_after + Duration::from_millis(1);
        assert_eq!(l.state(later, &RULES).charging, None, "expired after stale_after");
    }

    const RULES: Rules = Rules {
        system_id: None,
        confirm: 3,
        stale_after: Duration::from_secs(1),
    };

    fn heartbeat(armed: bool) -> MavMessage {
        let mut base_mode = MavModeFlag::MAV_MODE_FLAG_CUSTOM_MODE_ENABLED;
        if armed {
            base_mode |= MavModeFlag::MAV_MODE_FLAG_SAFETY_ARMED;
        }
        MavMessage::HEARTBEAT(HEARTBEAT_DATA {
            custom_mode: 0,
            mavtype: MavType::MAV_TYPE_QUADROTOR,
            autopilot: MavAutopilot::MAV_AUTOPILOT_ARDUPILOTMEGA,
            base_mode,
            system_status: MavState::MAV_STATE_STANDBY,
            mavlink_version: 3,
        })
    }

    fn landed(state: MavLandedState) -> MavMessage {
        MavMessage::EXTENDED_SYS_STATE(EXTENDED_SYS_STATE_DATA {
            landed_state: state,
            ..EXTENDED_SYS_STATE_DATA::DEFAULT
        })
    }

    fn feed(l: &mut Latest, from: (u32, u8), msg: &MavMessage, now: Instant, rules: &Rules) -> bool {
        l.fold(from, MavlinkVersion::V2, msg, now, rules)
    }

    #[test]
    fn follows_one_system_first_heard_or_configured() {
        let t = Instant::now();
        let mut l = Latest::new(&RULES);
        for _ in 0..3 {
            assert!(feed(&mut l, (7, 1), &heartbeat(true), t, &RULES));
        }
        for _ in 0..10 {
            assert!(!feed(&mut l, (255, 1), &heartbeat(false), t, &RULES));
            assert!(!feed(
                &mut l,
                (8, 1),
                &landed(MavLandedState::MAV_LANDED_STATE_ON_GROUND),
                t,
                &RULES
            ));
        }
        // Armed, no landed state from the vehicle: in the air.
        assert_eq!(l.state(t, &RULES).observed, ObservedState::InAir);
        assert_eq!(l.state(t, &RULES).landed_state, None);

        let pinned = Rules {
            system_id: Some(9),
            ..RULES
        };
        let mut l = Latest::new(&pinned);
        for _ in 0..5 {
            assert!(!feed(&mut l, (1, 1), &heartbeat(false), t, &pinned));
        }
        assert_eq!(l.state(t, &pinned).observed, ObservedState::Unknown);
    }

    #[test]
    fn opening_needs_agreeing_samples_closing_does_not() {
        let t = Instant::now();
        let mut l = Latest::new(&RULES);
        let on_ground = landed(MavLandedState::MAV_LANDED_STATE_ON_GROUND);
        for i in 0..3 {
            assert_eq!(l.state(t, &RULES).observed, ObservedState::Unknown, "{i}");
            feed(&mut l, (1, 1), &heartbeat(false), t, &RULES);
            feed(&mut l, (1, 1), &on_ground, t, &RULES);
        }
        assert_eq!(l.state(t, &RULES).observed, ObservedState::Disarmed);
        // From unknown too: the first armed HEARTBEAT is believed at once (no window in which
        // `unknown = "allow"` lets an armed vehicle through).
        let mut fresh = Latest::new(&RULES);
        feed(&mut fresh, (1, 1), &heartbeat(true), t, &RULES);
        assert_eq!(fresh.state(t, &RULES).observed, ObservedState::InAir);
        // One armed HEARTBEAT closes the gate at once.
        feed(&mut l, (1, 1), &heartbeat(true), t, &RULES);
        assert_eq!(l.state(t, &RULES).observed, ObservedState::Armed);
        // Disarmed, armed, disarmed, disarmed: not three in a row.
        for armed in [false, true, false, false] {
            feed(&mut l, (1, 1), &heartbeat(armed), t, &RULES);
            assert_eq!(l.state(t, &RULES).observed, ObservedState::Armed);
        }
        feed(&mut l, (1, 1), &heartbeat(false), t, &RULES);
        assert_eq!(l.state(t, &RULES).observed, ObservedState::Disarmed);
        // A battery rise is believed at the lowest of the agreeing samples.
        let battery = |pct| {
            MavMessage::SYS_STATUS(SYS_STATUS_DATA {
                battery_remaining: pct,
                ..SYS_STATUS_DATA::DEFAULT
            })
        };
        for (pct, believed) in [
            (20, None),
            (20, None),
            (20, Some(20)),
            (60, Some(20)),
            (50, Some(20)),
            // Lower: at once.
            (10, Some(10)),
            (60, Some(10)),
            (50, Some(10)),
            (70, Some(50)),
        ] {
            feed(&mut l, (1, 1), &battery(pct), t, &RULES);
            assert_eq!(l.state(t, &RULES).battery_percent, believed, "after {pct}");
        }
    }

    #[test]
    fn each_message_type_expires_on_its_own() {
        let t = Instant::now();
        let mut l = Latest::new(&RULES);
        let on_ground = landed(MavLandedState::MAV_LANDED_STATE_ON_GROUND);
        for _ in 0..3 {
            feed(&mut l, (1, 1), &heartbeat(true), t, &RULES);
            feed(&mut l, (1, 1), &on_ground, t, &RULES);
        }
        assert_eq!(l.state(t, &RULES).observed, ObservedState::Armed);
        // HEARTBEATs go on, EXTENDED_SYS_STATE stops: armed with no landed state is in the air.
        let mut later = t;
        for _ in 0..3 {
            later += Duration::from_millis(500);
            feed(&mut l, (1, 1), &heartbeat(true), later, &RULES);
        }
        let s = l.state(later, &RULES);
        assert_eq!((s.observed, s.landed_state), (ObservedState::InAir, None));
        // After a silence the old value is not believed again from one frame.
        let much_later = later + Duration::from_secs(5);
        assert_eq!(l.state(much_later, &RULES).observed, ObservedState::Unknown);
        feed(&mut l, (1, 1), &heartbeat(false), much_later, &RULES);
        assert_eq!(l.state(much_later, &RULES).observed, ObservedState::Unknown);
    }
}
