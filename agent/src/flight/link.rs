//! The MAVLink link to the flight controller, read only.
//!
//! One thread owns the connection (`mavlink::connect`, blocking) and folds every HEARTBEAT,
//! EXTENDED_SYS_STATE, BATTERY_STATUS, SYS_STATUS and AUTOPILOT_VERSION into the latest state;
//! a second one publishes that state on a watch every [`TICK`], turning it `unknown` when no
//! HEARTBEAT came for `stale_after`. Nothing is ever sent to the vehicle: a udpin/tcpout link to a
//! flight controller or mavlink-router streams without being asked. A broken link is reopened
//! every [`RECONNECT`].

use super::FlightState;
use mavlink::MavConnection;
use mavlink::dialects::ardupilotmega::{MavLandedState, MavMessage, MavModeFlag};
use mavlink::error::MessageReadError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the published state is refreshed (and goes stale).
pub const TICK: Duration = Duration::from_millis(100);
/// Wait before reopening a link that failed.
pub const RECONNECT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Latest {
    state: FlightState,
    heartbeat: Option<Instant>,
}

/// The running link; dropping it stops the publisher (the reader ends with the process or the
/// next message).
pub struct Monitor {
    rx: watch::Receiver<FlightState>,
    started: Instant,
    stale_after: Duration,
    latest: Arc<Mutex<Latest>>,
    stop: Arc<AtomicBool>,
}

impl Monitor {
    /// Starts reading `address` (see [`super::check_address`]).
    pub fn start(address: &str, stale_after: Duration) -> std::io::Result<Self> {
        let latest = Arc::new(Mutex::new(Latest::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(FlightState::default());
        {
            let (latest, stop, address) = (latest.clone(), stop.clone(), address.to_owned());
            std::thread::Builder::new()
                .name("flightnode-mavlink".into())
                .spawn(move || read_loop(&address, &latest, &stop))?;
        }
        {
            let (latest, stop) = (latest.clone(), stop.clone());
            std::thread::Builder::new()
                .name("flightnode-flight".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let now = snapshot(&latest, stale_after);
                        tx.send_if_modified(|s| {
                            let changed = *s != now;
                            if changed && s.observed != now.observed {
                                tracing::info!(observed = %now.observed, armed = ?now.armed,
                                    landed_state = ?now.landed_state, battery = ?now.battery_percent,
                                    "flight state changed");
                            }
                            *s = now;
                            changed
                        });
                        std::thread::sleep(TICK);
                    }
                })?;
        }
        tracing::info!(mavlink = %address, stale_after = ?stale_after, "reading the flight state over MAVLink");
        Ok(Self {
            rx,
            started: Instant::now(),
            stale_after,
            latest,
            stop,
        })
    }

    /// The flight state now.
    pub fn state(&self) -> FlightState {
        snapshot(&self.latest, self.stale_after)
    }

    /// Changes of the flight state.
    pub fn subscribe(&self) -> watch::Receiver<FlightState> {
        self.rx.clone()
    }

    /// True while the link has just started and no HEARTBEAT could have arrived yet: an unknown
    /// state then means "not heard yet", not "lost".
    pub fn settling(&self) -> bool {
        self.started.elapsed() < self.stale_after && self.latest.lock().is_ok_and(|l| l.heartbeat.is_none())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn snapshot(latest: &Mutex<Latest>, stale_after: Duration) -> FlightState {
    let Ok(l) = latest.lock() else {
        return FlightState::default();
    };
    let fresh = l.heartbeat.is_some_and(|t| t.elapsed() <= stale_after);
    let mut s = l.state.clone();
    s.observed = s.summarize(fresh);
    s
}

fn read_loop(address: &str, latest: &Mutex<Latest>, stop: &AtomicBool) {
    let mut logged = false;
    while !stop.load(Ordering::Relaxed) {
        let conn = match mavlink::connect::<MavMessage>(address) {
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
        logged = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match conn.recv() {
                Ok((header, msg)) => {
                    if let Ok(mut l) = latest.lock() {
                        fold(&mut l, header.component_id, &msg);
                    }
                }
                // A corrupt frame is skipped; the stream goes on.
                Err(MessageReadError::Parse(_)) => {}
                Err(MessageReadError::Io(e)) => {
                    tracing::warn!(mavlink = %address, "MAVLink link broken: {e}; reopening");
                    std::thread::sleep(RECONNECT);
                    break;
                }
            }
        }
    }
}

/// MAV_COMP_ID_AUTOPILOT1: the flight controller itself, as opposed to cameras, gimbals, GCSs.
const AUTOPILOT_COMPONENT: u8 = 1;

fn fold(l: &mut Latest, component: u8, msg: &MavMessage) {
    match msg {
        MavMessage::HEARTBEAT(hb) => {
            // Ground stations and other companions send HEARTBEATs too; only the autopilot's count.
            if component != AUTOPILOT_COMPONENT
                || hb.autopilot == mavlink::dialects::ardupilotmega::MavAutopilot::MAV_AUTOPILOT_INVALID
            {
                return;
            }
            l.heartbeat = Some(Instant::now());
            l.state.armed = Some(hb.base_mode.contains(MavModeFlag::MAV_MODE_FLAG_SAFETY_ARMED));
            l.state.autopilot = Some(enum_name(&hb.autopilot, "MAV_AUTOPILOT_"));
            l.state.system_status = Some(enum_name(&hb.system_status, "MAV_STATE_"));
        }
        MavMessage::EXTENDED_SYS_STATE(x) => {
            l.state.landed_state = Some(
                match x.landed_state {
                    MavLandedState::MAV_LANDED_STATE_ON_GROUND => "on_ground",
                    MavLandedState::MAV_LANDED_STATE_IN_AIR => "in_air",
                    MavLandedState::MAV_LANDED_STATE_TAKEOFF => "takeoff",
                    MavLandedState::MAV_LANDED_STATE_LANDING => "landing",
                    MavLandedState::MAV_LANDED_STATE_UNDEFINED => "undefined",
                }
                .to_owned(),
            );
        }
        // -1 = the autopilot does not know; keep what we had.
        MavMessage::BATTERY_STATUS(b) if b.battery_remaining >= 0 && b.id == 0 => {
            l.state.battery_percent = Some(b.battery_remaining.unsigned_abs().min(100));
        }
        MavMessage::SYS_STATUS(s) if s.battery_remaining >= 0 => {
            l.state.battery_percent = Some(s.battery_remaining.unsigned_abs().min(100));
        }
        MavMessage::AUTOPILOT_VERSION(v) => {
            let [major, minor, patch, _type] = v.flight_sw_version.to_be_bytes();
            l.state.firmware_version = Some(format!("{major}.{minor}.{patch}"));
        }
        _ => {}
    }
}

/// `MAV_AUTOPILOT_ARDUPILOTMEGA` → `ardupilotmega`.
fn enum_name(value: &impl std::fmt::Debug, prefix: &str) -> String {
    let name = format!("{value:?}");
    name.strip_prefix(prefix).unwrap_or(&name).to_ascii_lowercase()
}
