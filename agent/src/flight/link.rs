//! The MAVLink link to the flight controller.
//!
//! One thread owns the connection (`mavlink::connect`, blocking, MAVLink 1 and 2 frames alike)
//! and folds HEARTBEAT, EXTENDED_SYS_STATE, BATTERY_STATUS, SYS_STATUS and AUTOPILOT_VERSION of
//! one vehicle into the latest state ([`super::track`] says what is believed); a second one
//! publishes that state on a watch every [`TICK`]. A broken link is reopened every [`RECONNECT`].
//!
//! What the agent sends: `MAV_CMD_SET_MESSAGE_INTERVAL` for EXTENDED_SYS_STATE, SYS_STATUS and
//! BATTERY_STATUS once the vehicle is known, and again while one of them does not arrive
//! (ArduPilot streams none of them unless asked; on Copter EXTENDED_SYS_STATE is in no stream
//! group at all, so an agent that waits to be told never learns the landed state); and the
//! arming interlock of [`super::arm`]: the lock every second, a STATUSTEXT when it changes, and
//! the answer to an arm-authorisation request.

use super::FlightState;
use super::arm::{self, ArmSwitch, AuthorizationAck};
use super::track::{AUTOPILOT_COMPONENT, Latest, Rules};
use crate::config::FlightConfig;
use mavlink::dialects::common::{
    COMMAND_ACK_DATA, COMMAND_LONG_DATA, MavCmd, MavMessage, MavResult, MavSeverity, NAMED_VALUE_INT_DATA,
    STATUSTEXT_DATA,
};
use mavlink::error::MessageReadError;
use mavlink::{MAVLinkMessageRaw, MavConnection, MavHeader, MavlinkVersion, Message};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the published state is refreshed (and goes stale).
pub const TICK: Duration = Duration::from_millis(100);
/// Wait before reopening a link that failed.
pub const RECONNECT: Duration = Duration::from_secs(1);
/// MAV_COMP_ID_ONBOARD_COMPUTER: who the agent is when it asks for streams.
const OWN_COMPONENT: u8 = 191;
/// The messages the gate needs and the vehicle may not send unasked, by MAVLink message id:
/// EXTENDED_SYS_STATE (landed state), SYS_STATUS and BATTERY_STATUS (battery), SYSTEM_TIME
/// (GPS time for the trusted clock).
const STREAMS: [u32; 4] = [245, 1, 147, 2];
/// MAVLink's nominal HEARTBEAT period: how long confirming the first state may take per sample.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// The running link; dropping it stops the publisher (the reader ends with the process or the
/// next message).
pub struct Monitor {
    rx: watch::Receiver<FlightState>,
    started: Instant,
    rules: Rules,
    latest: Arc<Mutex<Latest>>,
    stop: Arc<AtomicBool>,
    arm: ArmSwitch,
}

impl Monitor {
    /// Starts reading `address` (see [`super::check_address`]) with the rules of `cfg`.
    pub fn start(address: &str, cfg: &FlightConfig) -> std::io::Result<Self> {
        let rules = Rules {
            system_id: cfg.system_id,
            confirm: usize::from(cfg.confirm_samples.max(1)),
            stale_after: cfg.stale_after,
        };
        let latest = Arc::new(Mutex::new(Latest::new(&rules)));
        let stop = Arc::new(AtomicBool::new(false));
        let arm = ArmSwitch::default();
        let (tx, rx) = watch::channel(FlightState::default());
        {
            let (latest, stop, address, arm) =
                (latest.clone(), stop.clone(), address.to_owned(), arm.clone());
            std::thread::Builder::new()
                .name("flightnode-mavlink".into())
                .spawn(move || read_loop(&address, &rules, &latest, &stop, &arm))?;
        }
        {
            let (latest, stop) = (latest.clone(), stop.clone());
            std::thread::Builder::new()
                .name("flightnode-flight".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let now = snapshot(&latest, &rules);
                        tx.send_if_modified(|s| {
                            let changed = *s != now;
                            if s.observed != now.observed {
                                tracing::info!(observed = %now.observed, armed = ?now.armed,
                                    landed_state = ?now.landed_state, battery = ?now.battery_percent,
                                    "flight state changed");
                            }
                            // Apart from the observed state: whether the vehicle answers the
                            // stream requests at all shows here.
                            if s.landed_state != now.landed_state {
                                tracing::info!(landed_state = ?now.landed_state, "landed state changed");
                            }
                            if s.battery_percent.is_some() != now.battery_percent.is_some() {
                                tracing::info!(battery = ?now.battery_percent, "battery level known or lost");
                            }
                            *s = now;
                            changed
                        });
                        std::thread::sleep(TICK);
                    }
                })?;
        }
        tracing::info!(mavlink = %address, system_id = ?cfg.system_id, stale_after = ?cfg.stale_after,
            confirm_samples = cfg.confirm_samples, "reading the flight state over MAVLink");
        Ok(Self {
            rx,
            started: Instant::now(),
            rules,
            latest,
            stop,
            arm,
        })
    }

    /// Where the daemon sets the arming lock this link carries to the autopilot.
    pub fn arm_switch(&self) -> ArmSwitch {
        self.arm.clone()
    }

    /// The flight state now.
    pub fn state(&self) -> FlightState {
        snapshot(&self.latest, &self.rules)
    }

    /// Changes of the flight state.
    pub fn subscribe(&self) -> watch::Receiver<FlightState> {
        self.rx.clone()
    }

    /// True while the link has just started and the state could not be known yet (a HEARTBEAT,
    /// then `confirm_samples` of them): an unknown state then means "not heard yet", not "lost".
    pub fn settling(&self) -> bool {
        let confirming = HEARTBEAT_PERIOD.saturating_mul(u32::try_from(self.rules.confirm).unwrap_or(1));
        self.started.elapsed() < self.rules.stale_after + confirming
            && self.latest.lock().is_ok_and(|l| !l.known_once)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn snapshot(latest: &Mutex<Latest>, rules: &Rules) -> FlightState {
    let Ok(mut l) = latest.lock() else {
        return FlightState::default();
    };
    l.state(Instant::now(), rules)
}

/// When each stream was last asked for on this connection.
struct Requests {
    last: [Option<Instant>; STREAMS.len()],
    warned: bool,
}

impl Requests {
    /// Asks the vehicle for every stream of [`STREAMS`] that has not arrived within half of
    /// `stale_after`, at most once per half `stale_after` each: after a (re)connect, an autopilot
    /// reboot, or a request lost on a lossy radio.
    fn ask(
        &mut self,
        conn: &impl MavConnection<MavMessage>,
        system: u32,
        last_sample: [Option<Instant>; STREAMS.len()],
        rules: &Rules,
        now: Instant,
    ) {
        let every = rules.stale_after / 2;
        // Well within stale_after, so one lost message does not expire a value.
        let interval = (rules.stale_after / 4).min(Duration::from_millis(250));
        for (i, (&id, at)) in STREAMS.iter().zip(last_sample).enumerate() {
            let arriving = at.is_some_and(|t| now.saturating_duration_since(t) < every);
            let asked = self.last[i].is_some_and(|t| now.saturating_duration_since(t) < every);
            if arriving || asked {
                continue;
            }
            self.last[i] = Some(now);
            let header = MavHeader {
                system_id: system,
                component_id: OWN_COMPONENT,
                sequence: 0,
            };
            let cmd = MavMessage::COMMAND_LONG(COMMAND_LONG_DATA {
                target_system: u8::try_from(system).unwrap_or(0),
                target_component: AUTOPILOT_COMPONENT,
                command: MavCmd::MAV_CMD_SET_MESSAGE_INTERVAL,
                param1: id as f32,
                param2: interval.as_micros() as f32,
                ..COMMAND_LONG_DATA::DEFAULT
            });
            match conn.send(&header, &cmd) {
                Ok(_) => tracing::debug!(system_id = system, message_id = id, interval = ?interval,
                    "MAVLink: requested a stream"),
                Err(e) if !self.warned => {
                    self.warned = true;
                    tracing::warn!(
                        system_id = system,
                        message_id = id,
                        "MAVLink: cannot request a stream from the vehicle: {e}"
                    );
                }
                Err(_) => {}
            }
        }
    }
}

/// What this connection last told the autopilot about the arming lock.
struct Announced {
    code: Option<i32>,
    at: Option<Instant>,
    started: Instant,
}

impl Announced {
    /// Sends the lock when it changed or [`arm::ANNOUNCE`] passed, and a STATUSTEXT for the pilot
    /// when it changed.
    fn tell(
        &mut self,
        conn: &impl MavConnection<MavMessage>,
        header: MavHeader,
        lock: Option<&flightnode_proto::status::ArmLock>,
        now: Instant,
    ) {
        let code = arm::code(lock);
        let changed = self.code != Some(code);
        if !changed
            && self
                .at
                .is_some_and(|t| now.saturating_duration_since(t) < arm::ANNOUNCE)
        {
            return;
        }
        let value = MavMessage::NAMED_VALUE_INT(NAMED_VALUE_INT_DATA {
            time_boot_ms: u32::try_from(now.saturating_duration_since(self.started).as_millis())
                .unwrap_or(u32::MAX),
            value: code,
            name: arm::LOCK_NAME.into(),
        });
        if let Err(e) = conn.send(&header, &value) {
            tracing::debug!("MAVLink: cannot send the arming lock: {e}");
            return;
        }
        if changed {
            let text = match lock {
                Some(l) => STATUSTEXT_DATA {
                    severity: MavSeverity::MAV_SEVERITY_WARNING,
                    text: arm::status_text(l).as_str().into(),
                    ..STATUSTEXT_DATA::DEFAULT
                },
                None if self.code.is_some() => STATUSTEXT_DATA {
                    severity: MavSeverity::MAV_SEVERITY_INFO,
                    text: "flightnode: arming allowed again".into(),
                    ..STATUSTEXT_DATA::DEFAULT
                },
                None => STATUSTEXT_DATA::DEFAULT,
            };
            if text.text[0] != 0 {
                let _ = conn.send(&header, &MavMessage::STATUSTEXT(text));
            }
        }
        self.code = Some(code);
        self.at = Some(now);
    }
}

/// Answers a PX4 arm-authorisation request (`MAV_CMD_ARM_AUTHORIZATION_REQUEST` from the
/// vehicle) with the lock now: accepted for [`arm::AUTHORIZED_FOR`] s, or denied and why.
fn authorize(
    conn: &impl MavConnection<MavMessage>,
    header: MavHeader,
    requester: (u32, u8),
    lock: Option<&flightnode_proto::status::ArmLock>,
) {
    let ack = AuthorizationAck::answer(lock);
    if let Some(l) = lock {
        tracing::warn!(reason = %l.reason, "arm authorisation request denied: {}", l.message);
        let text = STATUSTEXT_DATA {
            severity: MavSeverity::MAV_SEVERITY_WARNING,
            text: arm::status_text(l).as_str().into(),
            ..STATUSTEXT_DATA::DEFAULT
        };
        let _ = conn.send(&header, &MavMessage::STATUSTEXT(text));
    } else {
        tracing::info!("arm authorisation request granted for {} s", arm::AUTHORIZED_FOR);
    }
    // MAVLink 1 frames leave the extension fields out: the bare result still answers.
    let sent = conn.send(
        &header,
        &MavMessage::COMMAND_ACK(COMMAND_ACK_DATA {
            command: MavCmd::MAV_CMD_ARM_AUTHORIZATION_REQUEST,
            result: if ack.accepted {
                MavResult::MAV_RESULT_ACCEPTED
            } else {
                MavResult::MAV_RESULT_DENIED
            },
            progress: ack.progress,
            result_param2: ack.result_param2,
            target_system: u8::try_from(requester.0).unwrap_or(0),
            target_component: requester.1,
        }),
    );
    if let Err(e) = sent {
        tracing::warn!("MAVLink: cannot answer the arm authorisation request: {e}");
    }
}

/// A `MAV_CMD_ARM_AUTHORIZATION_REQUEST` the vehicle addressed to its own system (PX4 sends it
/// to `COM_ARM_AUTH_ID`, set to the vehicle's `MAV_SYS_ID`) and to us or to every component.
fn authorization_request(msg: &MavMessage, vehicle: Option<u32>, from: (u32, u8)) -> bool {
    let MavMessage::COMMAND_LONG(c) = msg else {
        return false;
    };
    c.command == MavCmd::MAV_CMD_ARM_AUTHORIZATION_REQUEST
        && vehicle.is_none_or(|v| from.0 == v)
        && u32::from(c.target_system) == from.0
        && (c.target_component == 0 || c.target_component == OWN_COMPONENT)
}

fn read_loop(address: &str, rules: &Rules, latest: &Mutex<Latest>, stop: &AtomicBool, arm_lock: &ArmSwitch) {
    let mut logged = false;
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match mavlink::connect::<MavMessage>(address) {
            Ok(c) => c,
            Err(e) => {
                if !logged {
                    tracing::warn!(mavlink = %address, "cannot open the MAVLink link: {e}; retrying every {RECONNECT:?}");
                    logged = true;
                }
                std::thread::sleep(RECONNECT);
                continue;
            }
        };
        // A flight controller or a telemetry radio may speak MAVLink 1 only.
        conn.set_allow_recv_any_version(true);
        logged = false;
        let mut requests = Requests {
            last: [None; STREAMS.len()],
            warned: false,
        };
        let mut announced = Announced {
            code: None,
            at: None,
            started: Instant::now(),
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let raw = match conn.recv_raw() {
                Ok(raw) => raw,
                // A corrupt frame is skipped; the stream goes on.
                Err(MessageReadError::Parse(_)) => continue,
                Err(MessageReadError::Io(e)) => {
                    tracing::warn!(mavlink = %address, "MAVLink link broken: {e}; reopening");
                    std::thread::sleep(RECONNECT);
                    break;
                }
            };
            let version = match raw {
                MAVLinkMessageRaw::V1(_) => MavlinkVersion::V1,
                MAVLinkMessageRaw::V2(_) => MavlinkVersion::V2,
            };
            let Ok(msg) = MavMessage::parse(version, raw.message_id(), raw.payload()) else {
                continue;
            };
            let from = (raw.system_id(), raw.component_id());
            let Ok(mut l) = latest.lock() else { return };
            if authorization_request(&msg, l.system, from) {
                drop(l);
                let header = MavHeader {
                    system_id: from.0,
                    component_id: OWN_COMPONENT,
                    sequence: 0,
                };
                authorize(&conn, header, from, arm_lock.get().as_ref());
                continue;
            }
            let now = Instant::now();
            if !l.fold(from, version, &msg, now, rules) {
                continue;
            }
            let (system, version) = (l.system, l.version);
            let last_sample = STREAMS.map(|id| l.last_sample(id));
            // Not held while sending: a slow serial write would stall the published state.
            drop(l);
            // Answer in the vehicle's own version: a MAVLink 1 radio drops MAVLink 2 frames.
            if let Some(v) = version
                && v != conn.protocol_version()
            {
                conn.set_protocol_version(v);
            }
            if let Some(system) = system {
                requests.ask(&conn, system, last_sample, rules, now);
                let header = MavHeader {
                    system_id: system,
                    component_id: OWN_COMPONENT,
                    sequence: 0,
                };
                announced.tell(&conn, header, arm_lock.get().as_ref(), now);
            }
        }
    }
}
