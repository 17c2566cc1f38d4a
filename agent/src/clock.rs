//! The time a drone trusts for the validity of commands: a companion computer after a power cut
//! may have no clock at all, and one set back a year would take a stale command for a fresh one.
//!
//! In order of trust: the flight controller's GPS time (MAVLink SYSTEM_TIME, when it has a
//! fix), the hub's signed time (in each heartbeat response, verified with the hub's command
//! keys), then the system clock. Whatever the source, the result is never earlier than the
//! *floor*: the newest trusted time this drone has seen (GPS, hub, the `issued_at` of a hub-signed
//! command it accepted), kept in the state store so a restart with a clock that went backwards
//! cannot undo it. Each reading says which source it came from ([`TimeSource`]), so a refusal
//! and the status can name it.

use crate::flight::FlightState;
use crate::store::Durable;
use flightnode_proto::error::Chain;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The floor is written when it moved by more than this (or at once for a command): a drone
/// that lost power loses at most this much of it.
const PERSIST_STEP: Duration = Duration::from_mins(1);
const FLOOR_KEY: &[u8] = b"floor_unix_ms";
/// A source behind the floor by less than this still names the reading (the value is the floor).
const FLOOR_SLACK: Duration = Duration::from_secs(10);

/// Where a trusted reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The flight controller's GPS time.
    Gps,
    /// The hub's signed time from a heartbeat response.
    Hub,
    /// The system clock: nothing better was heard, and it is not behind the floor.
    System,
    /// The system clock is behind the newest trusted time seen (by more than a few seconds), so
    /// that time is used.
    Floor,
}

impl TimeSource {
    /// The snake_case name used in status and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gps => "gps",
            Self::Hub => "hub",
            Self::System => "system",
            Self::Floor => "floor",
        }
    }
}

/// One trusted reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrustedTime {
    /// Unix milliseconds.
    pub unix_ms: i64,
    /// Where it came from.
    pub source: TimeSource,
}

impl TrustedTime {
    /// Unix seconds (rounded down).
    pub fn unix_secs(self) -> i64 {
        self.unix_ms.div_euclid(1000)
    }
}

struct Inner {
    hub: Option<(i64, Instant)>,
    floor: i64,
    persisted: i64,
    flight: Option<watch::Receiver<FlightState>>,
}

/// The trusted clock; cheap to clone.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Mutex<Inner>>,
    tree: sled::Tree,
    store: Durable,
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn since(anchor: (i64, Instant)) -> i64 {
    let elapsed = i64::try_from(anchor.1.elapsed().as_millis()).unwrap_or(i64::MAX);
    anchor.0.saturating_add(elapsed)
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("now", &self.now()).finish()
    }
}

impl Clock {
    /// Opens the clock's floor in `store`.
    pub fn open(store: &Durable) -> Result<Self, sled::Error> {
        let tree = store.db().open_tree("clock")?;
        let floor = tree
            .get(FLOOR_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, i64::from_be_bytes);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                hub: None,
                floor,
                persisted: floor,
                flight: None,
            })),
            tree,
            store: store.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads GPS time from the flight link from now on.
    pub fn follow_flight(&self, flight: watch::Receiver<FlightState>) {
        self.lock().flight = Some(flight);
    }

    /// A hub time whose signature verified with a configured hub key.
    pub fn hub_time(&self, unix_ms: i64) {
        self.lock().hub = Some((unix_ms, Instant::now()));
        self.raise_floor(unix_ms, false);
    }

    /// Raises the floor to `unix_ms` (a trusted time), writing it durably when it moved by
    /// [`PERSIST_STEP`] or when `now` is set (a command is about to be obeyed on it).
    pub fn raise_floor(&self, unix_ms: i64, now: bool) {
        let write = {
            let mut inner = self.lock();
            inner.floor = inner.floor.max(unix_ms);
            let step = i64::try_from(PERSIST_STEP.as_millis()).unwrap_or(i64::MAX);
            let due = inner.floor > inner.persisted && (now || inner.floor - inner.persisted >= step);
            if due {
                inner.persisted = inner.floor;
            }
            due.then_some(inner.floor)
        };
        if let Some(floor) = write {
            let saved = self
                .tree
                .insert(FLOOR_KEY, &floor.to_be_bytes())
                .map_err(|e| e.to_string())
                .and_then(|_| self.store.sync().map_err(|e| Chain(&e).to_string()));
            if let Err(e) = saved {
                tracing::warn!("cannot keep the trusted time floor in the state store: {e}");
            }
        }
    }

    /// The trusted time now.
    pub fn now(&self) -> TrustedTime {
        let (gps, hub, floor) = {
            let inner = self.lock();
            let gps = inner.flight.as_ref().and_then(|f| f.borrow().gps_time);
            (gps, inner.hub, inner.floor)
        };
        let (unix_ms, source) = if let Some(gps) = gps {
            let t = since(gps);
            self.raise_floor(t, false);
            (t, TimeSource::Gps)
        } else if let Some(hub) = hub {
            (since(hub), TimeSource::Hub)
        } else {
            (system_ms(), TimeSource::System)
        };
        // Two good sources differ by a little (GPS time in whole seconds, the hub's latency):
        // that keeps the source's name; a clock far behind what was seen is named the floor.
        let slack = i64::try_from(FLOOR_SLACK.as_millis()).unwrap_or(i64::MAX);
        let source = if unix_ms.saturating_add(slack) < floor {
            TimeSource::Floor
        } else {
            source
        };
        TrustedTime {
            unix_ms: unix_ms.max(floor),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn the_floor_survives_a_restart_and_beats_a_clock_set_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let year_ahead = system_ms() + 365 * 24 * 3600 * 1000;
        let clock = Clock::open(&store.durable()).unwrap();
        assert_eq!(clock.now().source, TimeSource::System);
        clock.raise_floor(year_ahead, true);
        assert_eq!(
            clock.now(),
            TrustedTime {
                unix_ms: year_ahead,
                source: TimeSource::Floor
            }
        );
        drop(clock);
        // A new agent process reads the floor back from the store.
        let clock = Clock::open(&store.durable()).unwrap();
        let now = clock.now();
        assert_eq!(now.source, TimeSource::Floor);
        assert!(now.unix_ms >= year_ahead);
    }

    #[test]
    fn hub_time_wins_over_the_system_clock_and_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let clock = Clock::open(&store.durable()).unwrap();
        let hub = system_ms() + 3_600_000;
        clock.hub_time(hub);
        let now = clock.now();
        assert_eq!(now.source, TimeSource::Hub);
        assert!(now.unix_ms >= hub && now.unix_ms < hub + 60_000);
    }
}
