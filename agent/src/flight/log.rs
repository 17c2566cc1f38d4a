//! Flights since the running image was committed: takeoff → landing cycles and airborne time,
//! counted from the flight controller's landed state, kept in the store and reported in the
//! status and the heartbeats (the FlightNode's `status.firmware.flights` and `flightTime`).
//!
//! A new image proves itself by flying: a hub can wait for a number of flights on it before the
//! next wave. The count belongs to one image, named by its slot and committed version: when the
//! running image changes (a commit, a rollback) it starts again from zero. A flight is counted
//! when the vehicle reports itself on the ground again; a power cut in the air keeps its takeoff
//! time, so the flight is counted (with the time the agent was down) once it is seen landed.

use crate::flight::FlightState;
use crate::state::DeviceState;
use crate::store::Durable;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The sled key of the log.
const KEY: &[u8] = b"flight-log";

/// The flights of one image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlightLog {
    /// The image counted: `<slot>/<committed version>`.
    pub image: String,
    /// Completed flights (takeoff to landing).
    pub flights: u32,
    /// Seconds in the air over those flights.
    pub airborne_secs: u64,
    /// Unix milliseconds of the takeoff of the flight under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub airborne_since_ms: Option<u64>,
}

/// The image `state` runs, as [`FlightLog::image`] names it.
pub fn image_of(state: &DeviceState) -> String {
    format!("{}/{}", state.active, state.committed_version)
}

/// What the landed state says: `Some(true)` taking off, flying or landing; `Some(false)` on the
/// ground; `None` unknown (no report, `undefined`, or the link is lost), which changes nothing.
fn airborne(f: &FlightState) -> Option<bool> {
    if f.in_air() {
        Some(true)
    } else if f.landed_state.as_deref() == Some("on_ground") {
        Some(false)
    } else {
        None
    }
}

impl FlightLog {
    /// Takes in what the vehicle says at `now_ms` while `image` runs; true when the log changed
    /// (and must be written).
    pub fn observe(&mut self, image: &str, flying: Option<bool>, now_ms: u64) -> bool {
        let mut changed = false;
        if self.image != image {
            // NB: a flight under way carries over to the new image: it took off before the
            // switch only if the gate failed, and then it is this image that lands it.
            *self = FlightLog {
                image: image.to_owned(),
                airborne_since_ms: self.airborne_since_ms,
                ..FlightLog::default()
            };
            changed = true;
        }
        match (flying, self.airborne_since_ms) {
            (Some(true), None) => {
                self.airborne_since_ms = Some(now_ms);
                true
            }
            (Some(false), Some(took_off)) => {
                self.flights = self.flights.saturating_add(1);
                self.airborne_secs = self
                    .airborne_secs
                    .saturating_add(now_ms.saturating_sub(took_off) / 1000);
                self.airborne_since_ms = None;
                true
            }
            _ => changed,
        }
    }

    /// (flights, airborne seconds) of `image`: zero for another image than the one counted.
    pub fn of(&self, image: &str) -> (u32, u64) {
        if self.image == image {
            (self.flights, self.airborne_secs)
        } else {
            (0, 0)
        }
    }
}

/// Reads the log from the store; an unreadable one is logged and starts again.
pub fn load(db: &Durable) -> FlightLog {
    match db.db().get(KEY) {
        Ok(Some(raw)) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "flight log does not decode; counting from zero");
            FlightLog::default()
        }),
        Ok(None) => FlightLog::default(),
        Err(e) => {
            tracing::warn!(error = %e, "flight log cannot be read; counting from zero");
            FlightLog::default()
        }
    }
}

fn save(db: &Durable, log: &FlightLog) {
    let Ok(bytes) = serde_json::to_vec(log) else {
        return;
    };
    if let Err(e) = db.db().insert(KEY, bytes) {
        tracing::warn!(error = %e, "flight log cannot be written");
        return;
    }
    if let Err(e) = db.sync() {
        tracing::warn!(error = %flightnode_proto::error::Chain(&e), "flight log cannot be made durable");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps the log while the agent runs: on every change of the flight state or of the running
/// image, counts, writes the log when it changed and publishes it on `out`.
pub async fn keep(
    db: Durable,
    mut flight: watch::Receiver<FlightState>,
    mut state: watch::Receiver<DeviceState>,
    out: watch::Sender<FlightLog>,
    shutdown: CancellationToken,
) {
    let mut log = out.borrow().clone();
    loop {
        let image = image_of(&state.borrow_and_update());
        let flying = airborne(&flight.borrow_and_update());
        if log.observe(&image, flying, now_ms()) {
            let (db, written) = (db.clone(), log.clone());
            // sled's flush and the fsync block: not on the async threads.
            let _ = tokio::task::spawn_blocking(move || save(&db, &written)).await;
            tracing::info!(image = %log.image, flights = log.flights, airborne_secs = log.airborne_secs,
                flying = log.airborne_since_ms.is_some(), "flight log");
            out.send_replace(log.clone());
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = flight.changed() => if r.is_err() { return },
            r = state.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeoff_to_landing_is_one_flight_and_a_new_image_starts_from_zero() {
        let mut log = FlightLog::default();
        assert!(log.observe("a/1.0.0", Some(false), 1_000));
        assert_eq!(log.of("a/1.0.0"), (0, 0));
        assert!(!log.observe("a/1.0.0", None, 2_000), "unknown changes nothing");
        assert!(log.observe("a/1.0.0", Some(true), 10_000));
        assert!(!log.observe("a/1.0.0", Some(true), 20_000));
        assert!(
            !log.observe("a/1.0.0", None, 30_000),
            "a lost link in the air is no landing"
        );
        assert!(log.observe("a/1.0.0", Some(false), 75_500));
        assert_eq!(log.of("a/1.0.0"), (1, 65));
        assert!(log.observe("a/1.0.0", Some(true), 100_000));
        assert!(log.observe("a/1.0.0", Some(false), 130_000));
        assert_eq!(log.of("a/1.0.0"), (2, 95));
        // Another image (a commit, a rollback): from zero, and the old count is not reported.
        assert_eq!(log.of("b/2.0.0"), (0, 0));
        assert!(log.observe("b/2.0.0", Some(false), 140_000));
        assert_eq!(log.of("b/2.0.0"), (0, 0));
        assert_eq!(log.of("a/1.0.0"), (0, 0));
    }
}
