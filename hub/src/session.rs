//! Sessions: one per drone, in memory. Decides when a status write is due and which events a
//! heartbeat may acknowledge.
//!
//! A write is due when the computed status differs from the last one written (ignoring
//! `lastHeartbeatTime`), or when the written heartbeat time is older than the refresh interval,
//! or when there are events the sink still has to record. Nothing here writes: callers pass the
//! returned [`Enqueue`] to the scheduler and report the outcome with [`Sessions::write_done`].

use crate::crd::FlightNodeStatus;
use crate::scheduler::Priority;
use crate::sink::{EventRecord, WriteRequest};
use crate::status::{self, Liveness, SpecView};
use flightnode_proto::v1::HeartbeatRequest;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Timing of sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Rewrite an unchanged status when its heartbeat time is this old.
    pub refresh: Duration,
    /// Declare a drone offline after this long without a heartbeat.
    pub grace: Duration,
    /// True when the sink records events itself (local store); false when events only shape the
    /// status (kube), so an unchanged written status already covers them.
    pub sink_stores_events: bool,
}

/// Spec fields per `FlightNode` name, fed by the kube watcher or the local store.
#[derive(Debug, Default)]
pub struct SpecCache(RwLock<HashMap<String, SpecView>>);

impl SpecCache {
    /// The spec of one object (default when unknown).
    pub fn get(&self, name: &str) -> SpecView {
        self.0
            .read()
            .map(|m| m.get(name).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Stores a spec; true when it changed.
    pub fn set(&self, name: &str, spec: SpecView) -> bool {
        match self.0.write() {
            Ok(mut m) => m.insert(name.to_owned(), spec.clone()).as_ref() != Some(&spec),
            Err(_) => false,
        }
    }
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

/// A write to hand to the scheduler.
#[derive(Debug, Clone)]
pub struct Enqueue {
    /// The write.
    pub req: WriteRequest,
    /// Transition or refresh.
    pub priority: Priority,
    /// Session generation: a completed write is only recorded when it is the newest.
    pub generation: u64,
}

/// What a heartbeat led to.
#[derive(Debug)]
pub struct Observed {
    /// A write to enqueue, if one is due.
    pub enqueue: Option<Enqueue>,
    /// Highest event seq that this heartbeat waits for (0: none).
    pub wants_seq: u64,
    /// Follows the durable event seq of the drone.
    pub acked: watch::Receiver<u64>,
}

struct Session {
    device_id: String,
    hardware_id: String,
    last_seen: Instant,
    online: bool,
    base: FlightNodeStatus,
    current: FlightNodeStatus,
    written: Option<(FlightNodeStatus, Instant)>,
    pending_events: BTreeMap<u64, EventRecord>,
    generation: u64,
    missing_logged: bool,
    acked: watch::Sender<u64>,
}

impl Session {
    fn enqueue(&mut self, name: &str, priority: Priority) -> Enqueue {
        self.generation += 1;
        Enqueue {
            req: WriteRequest {
                name: name.to_owned(),
                device_id: self.device_id.clone(),
                hardware_id: self.hardware_id.clone(),
                status: self.current.clone(),
                events: self.pending_events.values().cloned().collect(),
            },
            priority,
            generation: self.generation,
        }
    }

    fn durable(&self) -> u64 {
        *self.acked.borrow()
    }
}

/// All sessions.
pub struct Sessions {
    config: SessionConfig,
    specs: Arc<SpecCache>,
    map: Mutex<HashMap<String, Session>>,
    /// Woken when a deadline may have moved earlier (a new or returning drone).
    pub liveness_wake: Notify,
}

fn now_rfc3339() -> String {
    status::rfc3339(time::OffsetDateTime::now_utc())
}

impl Sessions {
    /// No sessions yet.
    pub fn new(config: SessionConfig, specs: Arc<SpecCache>) -> Self {
        Sessions {
            config,
            specs,
            map: Mutex::new(HashMap::new()),
            liveness_wake: Notify::new(),
        }
    }

    /// The spec cache.
    pub fn specs(&self) -> &Arc<SpecCache> {
        &self.specs
    }

    /// The configuration.
    pub fn config(&self) -> SessionConfig {
        self.config
    }

    // NB: a std Mutex: nothing awaits while it is held.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn due(&self, s: &Session, now: Instant) -> Option<Priority> {
        match &s.written {
            None => Some(Priority::Transition),
            Some((written, _)) if status::content_differs(written, &s.current) => Some(Priority::Transition),
            _ if self.config.sink_stores_events && !s.pending_events.is_empty() => Some(Priority::Transition),
            Some((_, at)) if now.saturating_duration_since(*at) >= self.config.refresh => {
                Some(Priority::Refresh)
            }
            _ => None,
        }
    }

    /// Records a (validated) heartbeat received at `now`.
    pub fn observe(&self, hb: &HeartbeatRequest, now: Instant) -> Observed {
        let name = object_name(&hb.device_id);
        let spec = self.specs.get(&name);
        let wall = now_rfc3339();
        let mut map = self.lock();
        let session = map.entry(name.clone()).or_insert_with(|| Session {
            device_id: hb.device_id.clone(),
            hardware_id: hb.hardware_id.clone(),
            last_seen: now,
            online: true,
            base: FlightNodeStatus::default(),
            current: FlightNodeStatus::default(),
            written: None,
            pending_events: BTreeMap::new(),
            generation: 0,
            missing_logged: false,
            acked: watch::channel(0).0,
        });
        let was_offline = !session.online;
        session.hardware_id.clone_from(&hb.hardware_id);
        session.last_seen = now;
        session.online = true;
        session.base = status::from_heartbeat(hb);
        let durable = session.durable();
        let mut wants_seq = 0;
        for event in hb.events.iter().filter(|e| e.seq > durable) {
            wants_seq = wants_seq.max(event.seq);
            session
                .pending_events
                .entry(event.seq)
                .or_insert_with(|| EventRecord::from_proto(event));
        }
        let mut current = status::with_conditions(
            session.base.clone(),
            Liveness::Online,
            &spec,
            &session.current.conditions,
            &wall,
        );
        current.last_heartbeat_time = Some(wall);
        session.current = current;

        let priority = self.due(session, now);
        if priority.is_none() && !session.pending_events.is_empty() {
            // The written status already shows what these events did (kube sink).
            let top = session.pending_events.keys().next_back().copied().unwrap_or(0);
            session.pending_events.clear();
            session.acked.send_replace(top.max(durable));
        }
        let enqueue = priority.map(|p| session.enqueue(&name, p));
        let acked = session.acked.subscribe();
        drop(map);
        if was_offline || enqueue.as_ref().is_some_and(|e| e.generation == 1) {
            self.liveness_wake.notify_one();
        }
        Observed {
            enqueue,
            wants_seq,
            acked,
        }
    }

    /// Records a successful write of `req` made for its generation.
    pub fn write_done(&self, req: &WriteRequest, now: Instant) {
        let mut map = self.lock();
        let Some(s) = map.get_mut(&req.name) else { return };
        s.written = Some((req.status.clone(), now));
        s.missing_logged = false;
        if let Some(top) = req.events.iter().map(|e| e.seq).max() {
            let durable = s.durable().max(top);
            s.pending_events.retain(|seq, _| *seq > durable);
            s.acked.send_replace(durable);
        }
    }

    /// Marks a drone's object missing; true the first time (so it is logged once).
    pub fn mark_missing(&self, name: &str) -> bool {
        let mut map = self.lock();
        match map.get_mut(name) {
            Some(s) if !s.missing_logged => {
                s.missing_logged = true;
                true
            }
            _ => false,
        }
    }

    /// Marks drones silent for the grace period offline; returns their writes.
    pub fn expire(&self, now: Instant) -> Vec<Enqueue> {
        let grace = self.config.grace;
        let wall = now_rfc3339();
        let mut map = self.lock();
        let mut out = Vec::new();
        for (name, s) in map.iter_mut() {
            if !s.online || now.saturating_duration_since(s.last_seen) < grace {
                continue;
            }
            s.online = false;
            let spec = self.specs.get(name);
            let silent_secs = now.saturating_duration_since(s.last_seen).as_secs();
            let heartbeat_time = s.current.last_heartbeat_time.clone();
            let mut current = status::with_conditions(
                s.base.clone(),
                Liveness::Offline { silent_secs },
                &spec,
                &s.current.conditions,
                &wall,
            );
            current.last_heartbeat_time = heartbeat_time;
            s.current = current;
            tracing::info!(device_id = %s.device_id, silent_secs, "drone offline: heartbeat timeout");
            out.push(s.enqueue(name, Priority::Transition));
        }
        out
    }

    /// When the next online drone would time out.
    pub fn next_deadline(&self) -> Option<Instant> {
        let grace = self.config.grace;
        self.lock()
            .values()
            .filter(|s| s.online)
            .map(|s| s.last_seen + grace)
            .min()
    }

    /// Recomputes a drone's status after its spec changed; returns a write if one is due.
    pub fn spec_changed(&self, name: &str, now: Instant) -> Option<Enqueue> {
        let spec = self.specs.get(name);
        let wall = now_rfc3339();
        let mut map = self.lock();
        let s = map.get_mut(name)?;
        let liveness = if s.online {
            Liveness::Online
        } else {
            Liveness::Offline {
                silent_secs: now.saturating_duration_since(s.last_seen).as_secs(),
            }
        };
        let heartbeat_time = s.current.last_heartbeat_time.clone();
        let mut current =
            status::with_conditions(s.base.clone(), liveness, &spec, &s.current.conditions, &wall);
        current.last_heartbeat_time = heartbeat_time;
        s.current = current;
        let priority = self.due(s, now).filter(|p| *p == Priority::Transition)?;
        Some(s.enqueue(name, priority))
    }

    /// The latest computed status of a drone.
    pub fn current(&self, name: &str) -> Option<FlightNodeStatus> {
        self.lock().get(name).map(|s| s.current.clone())
    }

    /// Number of drones per (condition type, status), for metrics.
    pub fn condition_counts(&self) -> BTreeMap<(String, String), i64> {
        let mut counts = BTreeMap::new();
        for s in self.lock().values() {
            for c in &s.current.conditions {
                *counts.entry((c.type_.clone(), c.status.clone())).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no drone has been heard from.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
