//! Sessions: one per drone, in memory. Decides when a status write is due and which events a
//! heartbeat may acknowledge.
//!
//! A write is due when the computed status differs from the last one written (ignoring
//! `lastHeartbeatTime`), or when the written heartbeat time is older than the refresh interval,
//! or when there are events the sink still has to record. Nothing here writes: callers pass the
//! returned [`Enqueue`] to the scheduler, which asks [`Sessions::build`] for the newest status
//! when a token lets it write, and reports the outcome with [`Sessions::write_done`].
//!
//! A fleet means tens of thousands of sessions, so a session is kept compact (under 1 KiB): the
//! heartbeat-derived part of the status as JSON bytes, the four conditions as (status, since)
//! pairs, and hashes instead of copies of what was computed and written. The full
//! `FlightNodeStatus` is rebuilt only when it is written or asked for.

use crate::api::flightnode::{FlightNodeStatus, condition, object_name};
use crate::api::meta::Condition;
use crate::decide::status::{self, Liveness, SpecView};
use crate::heartbeat::scheduler::{Built, Enqueue, Priority, StatusSource};
use crate::store::sink::{EventRecord, WriteRequest};
use flightnode_proto::v1::HeartbeatRequest;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
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
            Ok(mut m) => m.insert(name.to_owned(), spec.clone()) != Some(spec),
            Err(_) => false,
        }
    }
}

/// What a heartbeat led to.
#[derive(Debug)]
pub struct Observed {
    /// `FlightNode` name of the drone.
    pub name: String,
    /// A write to enqueue, if one is due.
    pub enqueue: Option<Enqueue>,
    /// Highest event seq that this heartbeat waits for (0: none).
    pub wants_seq: u64,
    /// Highest event seq durably recorded when the heartbeat was observed.
    pub durable_seq: u64,
}

/// The condition types in the order [`status::with_conditions`] lists them.
const CONDITION_TYPES: [&str; 4] = [
    condition::READY,
    condition::ONLINE,
    condition::UPGRADE_IN_PROGRESS,
    condition::FIRMWARE_SYNCED,
];
const CONDITION_STATUS: [&str; 4] = ["", "True", "False", "Unknown"];

/// One condition as a session keeps it: its status and since when (unix seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CondState {
    status: u8,
    since: i64,
}

fn compact_conditions(conditions: &[Condition]) -> [CondState; 4] {
    let mut out = [CondState::default(); 4];
    for c in conditions {
        let Some(i) = CONDITION_TYPES.iter().position(|t| *t == c.type_) else {
            continue;
        };
        out[i] = CondState {
            status: CONDITION_STATUS
                .iter()
                .position(|s| *s == c.status)
                .and_then(|p| u8::try_from(p).ok())
                .unwrap_or(0),
            since: parse_unix(&c.last_transition_time),
        };
    }
    out
}

fn parse_unix(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map_or(0, time::OffsetDateTime::unix_timestamp)
}

/// Hash of a status without its heartbeat time: equal hashes mean nothing to write but a
/// refresh. (A 64-bit collision would only delay a write until the next change or refresh.)
/// The flight details (battery, landed state, ...) are left out: of the flight state only a
/// change of `observedState` is worth a write of its own. So is a change of the clock the drone
/// trusts (rare: once at start, once when GPS gives the time).
pub fn content_hash(status: &FlightNodeStatus) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    status.phase.hash(&mut h);
    status.wait_reason.hash(&mut h);
    status.observed_state.hash(&mut h);
    status.clock_source.hash(&mut h);
    status.firmware.hash(&mut h);
    status.last_upgrade.hash(&mut h);
    status.resources.hash(&mut h);
    status.agent.hash(&mut h);
    status.observed_generation.hash(&mut h);
    status.conditions.hash(&mut h);
    status.current_upgrade.hash(&mut h);
    h.finish()
}

struct Session {
    device_id: Box<str>,
    hardware_id: Box<str>,
    last_seen: Instant,
    liveness: Liveness,
    /// JSON of the heartbeat-derived status (no conditions, no heartbeat time).
    base: Box<[u8]>,
    conditions: [CondState; 4],
    /// Committed firmware version and upgrade phase of the status computed last, kept apart
    /// from `base` so a scrape counts them without parsing every drone's JSON.
    version: Box<str>,
    phase: Box<str>,
    heartbeat_unix: i64,
    /// The agent's sequence number of the last heartbeat (0: none seen).
    seq: u64,
    /// [`content_hash`] of the status computed last.
    content: u64,
    /// Hash of the flight details in `base` (not part of `content`).
    flight: u64,
    /// Content hash and time of the last successful write.
    written: Option<(u64, Instant)>,
    pending_events: BTreeMap<u64, EventRecord>,
    durable_seq: u64,
    missing_logged: bool,
    /// Not served here: a drone the store shows online, watched from its stored
    /// `lastHeartbeatTime` so that someone marks it offline when it goes silent ([`Sessions::watch`]).
    watching: bool,
}

impl Session {
    fn new(hb: &HeartbeatRequest, now: Instant) -> Session {
        Session {
            device_id: hb.device_id.as_str().into(),
            hardware_id: hb.hardware_id.as_str().into(),
            last_seen: now,
            liveness: Liveness::Online,
            base: Box::default(),
            conditions: [CondState::default(); 4],
            version: Box::default(),
            phase: Box::default(),
            heartbeat_unix: 0,
            seq: 0,
            content: 0,
            flight: 0,
            written: None,
            pending_events: BTreeMap::new(),
            durable_seq: 0,
            missing_logged: false,
            watching: false,
        }
    }

    /// How long this session may stay silent. A watched drone's stored heartbeat time is only
    /// rewritten every `refresh` by the replica that serves it, so it gets that much longer.
    fn grace(&self, config: &SessionConfig) -> Duration {
        if self.watching {
            config.grace + config.refresh
        } else {
            config.grace
        }
    }

    /// Watches the drone from the heartbeat another replica stored (unix seconds, agent seq).
    fn watch_from(&mut self, stored_unix: i64, stored_seq: u64, now: Instant) {
        self.watching = true;
        self.heartbeat_unix = stored_unix;
        self.seq = stored_seq;
        self.last_seen = instant_of(stored_unix, now);
    }

    /// Whether another replica stored a newer heartbeat of this drone than this session saw, and
    /// is still writing it. By the agent's own sequence number, never by comparing two pods'
    /// clocks; a stored status without one (an older hub) falls back to its time. A stored
    /// status that nobody refreshed for the grace period plus the refresh interval does not
    /// count: a drone whose state dir was wiped starts its numbers again from 1.
    fn newer_elsewhere(&self, spec: &SpecView, config: &SessionConfig) -> bool {
        let newer = if spec.stored_seq > 0 && self.seq > 0 {
            spec.stored_seq > self.seq
        } else {
            spec.stored_heartbeat_unix > self.heartbeat_unix
        };
        let alive_for = i64::try_from((config.grace + config.refresh).as_secs()).unwrap_or(i64::MAX);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        newer && now.saturating_sub(spec.stored_heartbeat_unix) < alive_for
    }

    fn previous_conditions(&self) -> Vec<Condition> {
        CONDITION_TYPES
            .iter()
            .zip(self.conditions)
            .filter(|(_, c)| c.status != 0)
            .map(|(type_, c)| Condition {
                type_: (*type_).to_owned(),
                status: CONDITION_STATUS[usize::from(c.status)].to_owned(),
                last_transition_time: status::unix_rfc3339(c.since).unwrap_or_default(),
                ..Condition::default()
            })
            .collect()
    }

    fn base(&self) -> FlightNodeStatus {
        if self.base.is_empty() {
            return FlightNodeStatus::default();
        }
        serde_json::from_slice(&self.base).unwrap_or_else(|e| {
            tracing::warn!(device_id = %self.device_id, error = %e,
                "session: the kept status does not decode; rebuilding it from the next heartbeat");
            FlightNodeStatus::default()
        })
    }

    /// Recomputes the full status from `base` (the heartbeat part) and records it; true when
    /// its content changed. New flight details alone are recorded but return false.
    fn compute(&mut self, base: FlightNodeStatus, spec: &SpecView, wall: &str) -> bool {
        let full = status::with_conditions(base, self.liveness, spec, &self.previous_conditions(), wall);
        let content = content_hash(&full);
        let flight = {
            let mut h = std::hash::DefaultHasher::new();
            full.flight.hash(&mut h);
            h.finish()
        };
        let same = content == self.content && !self.base.is_empty();
        if same && flight == self.flight {
            return false;
        }
        self.flight = flight;
        let mut base = full.clone();
        base.conditions.clear();
        base.observed_generation = None;
        // NB: serialising a status of plain strings and numbers cannot fail.
        self.base = serde_json::to_vec(&base).unwrap_or_default().into_boxed_slice();
        self.conditions = compact_conditions(&full.conditions);
        self.version = full
            .firmware
            .as_ref()
            .and_then(|f| f.committed_version.as_deref())
            .unwrap_or_default()
            .into();
        self.phase = full.phase.as_deref().unwrap_or_default().into();
        self.content = content;
        !same
    }

    /// The full status as it would be written now.
    fn status(&self, spec: &SpecView, wall: &str) -> FlightNodeStatus {
        let mut s = status::with_conditions(
            self.base(),
            self.liveness,
            spec,
            &self.previous_conditions(),
            wall,
        );
        s.last_heartbeat_time = status::unix_rfc3339(self.heartbeat_unix);
        s.heartbeat_seq = (self.seq > 0).then_some(self.seq);
        s
    }
}

/// All sessions.
pub struct Sessions {
    config: SessionConfig,
    specs: Arc<SpecCache>,
    map: Mutex<HashMap<String, Session>>,
    /// Bumped whenever some drone's durable event seq moves (heartbeats waiting for their
    /// events to be recorded watch it).
    durable_tick: watch::Sender<u64>,
    /// Woken when a deadline may have moved earlier (a new or returning drone).
    pub liveness_wake: Notify,
}

fn now_rfc3339() -> String {
    status::rfc3339(time::OffsetDateTime::now_utc())
}

/// The monotonic instant of wall-clock time `unix` (seconds), given that it is `now` now.
fn instant_of(unix: i64, now: Instant) -> Instant {
    let ago = time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .saturating_sub(unix);
    now.checked_sub(Duration::from_secs(u64::try_from(ago).unwrap_or(0)))
        .unwrap_or(now)
}

impl Sessions {
    /// No sessions yet.
    pub fn new(config: SessionConfig, specs: Arc<SpecCache>) -> Self {
        Sessions {
            config,
            specs,
            map: Mutex::new(HashMap::new()),
            durable_tick: watch::channel(0).0,
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

    fn due(&self, s: &Session, now: Instant, changed: bool) -> Option<Priority> {
        match &s.written {
            // A drone this hub has not written yet: a registration, unless it is already
            // moving (then the operator is waiting for it).
            None if changed => Some(Priority::Transition),
            None => Some(Priority::Register),
            Some((written, _)) if *written != s.content => Some(Priority::Transition),
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
        let wall_time = time::OffsetDateTime::now_utc();
        let wall = status::rfc3339(wall_time);
        let mut map = self.lock();
        let mut is_new = false;
        let session = map.entry(name.clone()).or_insert_with(|| {
            is_new = true;
            Session::new(hb, now)
        });
        let was_offline = session.liveness != Liveness::Online || session.watching;
        session.watching = false;
        if *session.hardware_id != *hb.hardware_id {
            session.hardware_id = hb.hardware_id.as_str().into();
        }
        session.last_seen = now;
        session.liveness = Liveness::Online;
        session.heartbeat_unix = wall_time.unix_timestamp();
        session.seq = hb.seq;
        let durable = session.durable_seq;
        let mut wants_seq = 0;
        for event in hb.events.iter().filter(|e| e.seq > durable) {
            wants_seq = wants_seq.max(event.seq);
            session
                .pending_events
                .entry(event.seq)
                .or_insert_with(|| EventRecord::from_proto(event));
        }
        let changed = session.compute(status::from_heartbeat(hb), &spec, &wall) && !is_new;

        let priority = self.due(session, now, changed);
        if priority.is_none() && !session.pending_events.is_empty() {
            // The written status already shows what these events did (kube sink).
            let top = session.pending_events.keys().next_back().copied().unwrap_or(0);
            session.pending_events.clear();
            session.durable_seq = top.max(durable);
            self.durable_tick.send_modify(|t| *t = t.wrapping_add(1));
        }
        let durable_seq = session.durable_seq;
        drop(map);
        if was_offline || is_new {
            self.liveness_wake.notify_one();
        }
        Observed {
            enqueue: priority.map(|priority| Enqueue {
                name: name.clone(),
                priority,
            }),
            name,
            wants_seq,
            durable_seq,
        }
    }

    /// The write for a drone as it stands now: newest status and every event not yet durable.
    pub fn build(&self, name: &str) -> Option<Built> {
        let spec = self.specs.get(name);
        let wall = now_rfc3339();
        let map = self.lock();
        let s = map.get(name)?;
        // A write queued here while the drone moved to another replica (a retry, a slow
        // bucket) must not land over that replica's newer status.
        if !s.watching && s.newer_elsewhere(&spec, &self.config) {
            tracing::info!(device_id = %s.device_id, seq = s.seq, stored_seq = spec.stored_seq,
                "another replica stored a newer heartbeat of this drone; not writing over it");
            return None;
        }
        let status = s.status(&spec, &wall);
        Some(Built {
            content: content_hash(&status),
            req: WriteRequest {
                name: name.to_owned(),
                device_id: s.device_id.to_string(),
                hardware_id: s.hardware_id.to_string(),
                status,
                events: s.pending_events.values().cloned().collect(),
            },
        })
    }

    /// Records a successful write of `built`.
    pub fn write_done(&self, built: &Built, now: Instant) {
        let mut map = self.lock();
        let Some(s) = map.get_mut(&built.req.name) else {
            return;
        };
        s.written = Some((built.content, now));
        s.missing_logged = false;
        if let Some(top) = built.req.events.iter().map(|e| e.seq).max() {
            s.durable_seq = s.durable_seq.max(top);
            let durable = s.durable_seq;
            s.pending_events.retain(|seq, _| *seq > durable);
            drop(map);
            self.durable_tick.send_modify(|t| *t = t.wrapping_add(1));
        }
    }

    /// The highest event seq of a drone that is durably recorded (0 when unknown).
    pub fn durable_seq(&self, name: &str) -> u64 {
        self.lock().get(name).map_or(0, |s| s.durable_seq)
    }

    /// Waits until the drone's durable event seq reaches `wanted` (callers bound it with a
    /// timeout); returns the durable seq.
    pub async fn wait_durable(&self, name: &str, wanted: u64) -> u64 {
        let mut tick = self.durable_tick.subscribe();
        loop {
            let seq = self.durable_seq(name);
            if seq >= wanted || tick.changed().await.is_err() {
                return seq;
            }
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
        let wall = now_rfc3339();
        let mut map = self.lock();
        let mut out = Vec::new();
        for (name, s) in map.iter_mut() {
            if s.liveness != Liveness::Online
                || now.saturating_duration_since(s.last_seen) < s.grace(&self.config)
            {
                continue;
            }
            let spec = self.specs.get(name);
            // With several replicas, a drone that reconnected to another one is not offline:
            // that replica stored a newer heartbeat. Watch it from there instead of writing over
            // it: if that replica goes away too, this one still marks the drone offline.
            if s.newer_elsewhere(&spec, &self.config) {
                if !s.watching {
                    tracing::info!(device_id = %s.device_id, "drone served by another replica; watching its stored heartbeat");
                }
                s.watch_from(spec.stored_heartbeat_unix, spec.stored_seq, now);
                continue;
            }
            let silent_secs = now.saturating_duration_since(s.last_seen).as_secs();
            s.liveness = Liveness::Offline { silent_secs };
            s.compute(s.base(), &spec, &wall);
            tracing::info!(device_id = %s.device_id, silent_secs, watched = s.watching, "drone offline: heartbeat timeout");
            out.push(Enqueue {
                name: name.clone(),
                priority: Priority::Transition,
            });
        }
        out
    }

    /// When the next online drone would time out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .values()
            .filter(|s| s.liveness == Liveness::Online)
            .map(|s| s.last_seen + s.grace(&self.config))
            .min()
    }

    /// Recomputes a drone's status after its spec changed; returns a write if one is due.
    pub fn spec_changed(&self, name: &str, now: Instant) -> Option<Enqueue> {
        let spec = self.specs.get(name);
        let wall = now_rfc3339();
        let mut map = self.lock();
        // A watched drone's status is its serving replica's to write.
        let s = map.get_mut(name).filter(|s| !s.watching)?;
        let changed = s.compute(s.base(), &spec, &wall);
        let priority = self.due(s, now, changed).filter(|p| *p == Priority::Transition)?;
        Some(Enqueue {
            name: name.to_owned(),
            priority,
        })
    }

    /// The latest computed status of a drone.
    pub fn current(&self, name: &str) -> Option<FlightNodeStatus> {
        self.build(name).map(|b| b.req.status)
    }

    /// Number of drones per (condition type, status), for metrics.
    pub fn condition_counts(&self) -> BTreeMap<(String, String), i64> {
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for s in self.lock().values().filter(|s| !s.watching) {
            for (type_, c) in CONDITION_TYPES.iter().zip(s.conditions) {
                if c.status != 0 {
                    *counts
                        .entry((type_, CONDITION_STATUS[usize::from(c.status)]))
                        .or_insert(0) += 1;
                }
            }
        }
        counts
            .into_iter()
            .map(|((t, s), n)| ((t.to_owned(), s.to_owned()), n))
            .collect()
    }

    /// Number of drones per committed firmware version and per upgrade phase, for metrics;
    /// `unknown` for a drone that reports none.
    pub fn version_phase_counts(&self) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
        let mut versions: BTreeMap<String, i64> = BTreeMap::new();
        let mut phases: BTreeMap<String, i64> = BTreeMap::new();
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s.to_owned()
            }
        };
        for s in self.lock().values().filter(|s| !s.watching) {
            *versions.entry(or_unknown(&s.version)).or_insert(0) += 1;
            *phases.entry(or_unknown(&s.phase)).or_insert(0) += 1;
        }
        (versions, phases)
    }

    /// Number of drones served here (watched ones not counted).
    pub fn len(&self) -> usize {
        self.lock().values().filter(|s| !s.watching).count()
    }

    /// Watches a drone the store shows online that this replica has no session for, from its
    /// stored status (called for every object the store reports, so it must be cheap). Sessions
    /// live in memory and start from a heartbeat: without this, a drone that went dark while its
    /// replica restarted (or was scaled away) would stay `Online=True` forever, pass the
    /// rollouts' online gate and be dispatched. It is marked offline when its stored heartbeat
    /// time gets older than the grace period plus the refresh interval (no replica rewrote it).
    pub fn watch(&self, name: &str, stored: &FlightNodeStatus, now: Instant) {
        let online = stored
            .conditions
            .iter()
            .any(|c| c.type_ == condition::ONLINE && c.status == "True");
        let stored_unix = stored.last_heartbeat_time.as_deref().map_or(0, parse_unix);
        let mut map = self.lock();
        if let Some(s) = map.get_mut(name) {
            let stored_seq = stored.heartbeat_seq.unwrap_or(0);
            if s.watching && (stored_unix > s.heartbeat_unix || stored_seq > s.seq) {
                s.watch_from(stored_unix, stored_seq, now);
            }
            return;
        }
        if !online || stored_unix <= 0 {
            return;
        }
        let device_id = stored.device_id.as_deref().unwrap_or(name);
        let mut session = Session::new(
            &HeartbeatRequest {
                device_id: device_id.to_owned(),
                ..HeartbeatRequest::default()
            },
            now,
        );
        session.watch_from(stored_unix, stored.heartbeat_seq.unwrap_or(0), now);
        session.conditions = compact_conditions(&stored.conditions);
        let mut base = stored.clone();
        base.conditions.clear();
        base.observed_generation = None;
        base.firmware_sync = None;
        base.last_heartbeat_time = None;
        session.compute(base, &self.specs.get(name), &now_rfc3339());
        // Nothing to write while it is online: the stored status is what it shows.
        session.written = Some((session.content, now));
        tracing::debug!(
            name,
            device_id,
            "watching a drone another replica serves (or served)"
        );
        map.insert(name.to_owned(), session);
        drop(map);
        self.liveness_wake.notify_one();
    }

    /// True when no drone has been heard from.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StatusSource for Sessions {
    fn build(&self, name: &str) -> Option<Built> {
        Sessions::build(self, name)
    }

    fn write_done(&self, built: &Built, now: Instant) {
        Sessions::write_done(self, built, now);
    }

    fn mark_missing(&self, name: &str) -> bool {
        Sessions::mark_missing(self, name)
    }
}

#[cfg(test)]
mod tests;
