//! The event outbox: phase transitions kept in sled until the hub acknowledges them.
//!
//! Events live in the `outbox` tree keyed by their big-endian `seq`, so iteration is oldest first.
//! [`Outbox::push`] syncs the store ([`Durable::sync`]) before it returns: an event is durable
//! before the side effect it announces, and one that was pushed survives a power cut. The outbox
//! is bounded by `cap`: beyond it the oldest events are dropped, counted in [`Outbox::dropped`]
//! and logged — it is bounded and says so.
//!
//! An event's `seq` is the device state's `seq` after its transition, unless that is not above
//! the last seq the outbox handed out: then it is the next number. Refused commands
//! ([`Event::refused`]) are events without a transition of their own, so they take the next
//! number and the transitions after them move up with it: seqs only grow, per state dir (the
//! highest is kept in `outbox_meta`), which is what the hub's acknowledgement relies on.
//!
//! The hub answers every heartbeat with the highest `seq` it has durably recorded;
//! [`Outbox::ack`] removes everything up to it.
//!
//! The outbox also hands out heartbeat sequence numbers ([`Outbox::next_heartbeat_seq`]): a run
//! counter persisted in the `outbox_meta` tree (bumped once per [`Outbox::open`]) in the high 32
//! bits and an in-memory counter in the low 32 bits, so they grow monotonically per state dir
//! without a write per heartbeat.

use crate::state::DeviceState;
use crate::store::{Durable, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::watch;

const TREE: &str = "outbox";
const META_TREE: &str = "outbox_meta";
const RUN_KEY: &[u8] = b"run";
/// The highest event seq handed out (see the module docs).
const HIGH_KEY: &[u8] = b"high_seq";
/// The newest refusal ([`Outbox::push_refusal`]), kept after the hub acknowledged it.
const REFUSAL_KEY: &[u8] = b"last_refusal";

/// One phase transition, as sent in `HeartbeatRequest.events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Agent event sequence, monotonic per state dir: [`DeviceState::seq`] after the transition
    /// or the next number (see the module docs). [`Outbox::push`] assigns it.
    pub seq: u64,
    /// When it happened, Unix milliseconds.
    pub time_unix_ms: i64,
    /// Upgrade id.
    pub upgrade_id: String,
    /// Phase entered (contract string); `idle` when the upgrade ended.
    pub phase: String,
    /// Result (contract string) when the upgrade ended, else empty.
    pub result: String,
    /// Error code (contract string), else empty.
    pub error_code: String,
    /// Human sentence: the error message, else empty.
    pub message: String,
}

impl Event {
    /// The event for the transition that produced `state`, stamped now: `seq` is `state.seq`, the
    /// phase is `state.phase()`; when idle, upgrade id, result and error come from `state.last`.
    pub fn from_state(state: &DeviceState) -> Self {
        let mut event = Event {
            seq: state.seq,
            time_unix_ms: now_unix_ms(),
            upgrade_id: String::new(),
            phase: state.phase().as_str().to_owned(),
            result: String::new(),
            error_code: String::new(),
            message: String::new(),
        };
        if let Some(u) = &state.upgrade {
            event.upgrade_id.clone_from(&u.id);
            if let Some(e) = &u.error {
                e.code.as_str().clone_into(&mut event.error_code);
                event.message.clone_from(&e.message);
            } else if let Some(reason) = u.wait_reason() {
                event.message = if reason.is_flight() {
                    format!("waiting for the vehicle: {reason}")
                } else {
                    // A link, window or charging hold: not the flight gate's.
                    format!("waiting: {reason}")
                };
            }
        } else if let Some(last) = &state.last {
            event.upgrade_id.clone_from(&last.upgrade_id);
            last.result.as_str().clone_into(&mut event.result);
            if let Some(e) = &last.error {
                e.code.as_str().clone_into(&mut event.error_code);
                event.message.clone_from(&e.message);
            }
        }
        event
    }

    /// A command refused without becoming an upgrade (busy, malformed, refused by the engine):
    /// phase `idle`, result `rejected`, with the refusal's code (an [`ErrorCode`] string or
    /// `malformed`). Its `seq` is assigned by [`Outbox::push`].
    ///
    /// [`ErrorCode`]: flightnode_proto::ErrorCode
    pub fn refused(upgrade_id: &str, code: &str, message: &str) -> Self {
        Event {
            seq: 0,
            time_unix_ms: now_unix_ms(),
            upgrade_id: upgrade_id.to_owned(),
            phase: flightnode_proto::Phase::Idle.as_str().to_owned(),
            result: flightnode_proto::UpgradeResult::Rejected.as_str().to_owned(),
            error_code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    /// An upgrade canceled before it ever ran (waiting to start, or not arrived yet): phase
    /// `idle`, result `canceled`, code `canceled`. Pushed like a refusal
    /// ([`Outbox::push_refusal`]): it never becomes the device state's `last`, yet it is the
    /// answer the hub waits for to stop sending the cancel.
    pub fn canceled(upgrade_id: &str, message: &str) -> Self {
        Event {
            result: flightnode_proto::UpgradeResult::Canceled.as_str().to_owned(),
            error_code: flightnode_proto::ErrorCode::Canceled.as_str().to_owned(),
            ..Event::refused(upgrade_id, "", message)
        }
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Outbox failures.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// sled failed.
    #[error("outbox store")]
    Sled(#[from] sled::Error),
    /// The store could not make the outbox durable.
    #[error("outbox store")]
    Store(#[from] StoreError),
    /// An event could not be encoded.
    #[error("outbox: encoding event {seq}")]
    Encode {
        /// The event's seq.
        seq: u64,
        /// Why.
        source: serde_json::Error,
    },
}

/// Unacknowledged events, oldest first. Cheap to clone: clones share the tree and counters.
#[derive(Clone)]
pub struct Outbox {
    tree: sled::Tree,
    meta: sled::Tree,
    store: Durable,
    cap: usize,
    dropped: Arc<AtomicU64>,
    heartbeat: Arc<AtomicU64>,
    /// The highest seq handed out; held while a push assigns and stores the next.
    high: Arc<Mutex<u64>>,
    /// The seq of the last pushed event, for whoever sends them (the hub link).
    pushed: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("cap", &self.cap)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens the outbox in `store`, keeping at most `cap` events (at least one). Bumps and syncs
    /// the persisted run counter used by [`Outbox::next_heartbeat_seq`].
    pub fn open(store: &Durable, cap: usize) -> Result<Self, OutboxError> {
        let tree = store.db().open_tree(TREE)?;
        let meta = store.db().open_tree(META_TREE)?;
        let run = meta
            .update_and_fetch(RUN_KEY, |old| {
                let prev = old.and_then(decode_u64).unwrap_or(0);
                Some(prev.wrapping_add(1).to_be_bytes().to_vec())
            })?
            .as_deref()
            .and_then(decode_u64)
            .unwrap_or(1);
        store.sync()?;
        let high = meta
            .get(HIGH_KEY)?
            .as_deref()
            .and_then(decode_u64)
            .unwrap_or(0)
            .max(tree.last()?.and_then(|(k, _)| decode_u64(&k)).unwrap_or(0));
        let outbox = Self {
            tree,
            meta,
            store: store.clone(),
            cap: cap.max(1),
            dropped: Arc::new(AtomicU64::new(0)),
            heartbeat: Arc::new(AtomicU64::new((run & 0xffff_ffff) << 32)),
            high: Arc::new(Mutex::new(high)),
            pushed: Arc::new(watch::Sender::new(high)),
        };
        // A smaller cap than in the last run applies at once.
        outbox.enforce_cap()?;
        Ok(outbox)
    }

    /// Stores `event` with its seq (see the module docs) and syncs: when this returns, the
    /// event survives a power cut. Beyond the cap the oldest events are dropped (counted and
    /// logged). Returns the seq it was stored with.
    pub fn push(&self, event: &Event) -> Result<u64, OutboxError> {
        self.push_keeping(event, false)
    }

    /// [`Outbox::push`] for a refused command ([`Event::refused`]), which is also kept as the
    /// newest refusal ([`Outbox::last_refusal`]) in the same sync. A refusal is no transition, so
    /// the device state's `last` never names it; without this the heartbeat's `last_upgrade`
    /// would not either, and a rollout waiting for the drone would learn of it only at its
    /// timeout.
    pub fn push_refusal(&self, event: &Event) -> Result<u64, OutboxError> {
        self.push_keeping(event, true)
    }

    /// The newest refused command, if any was refused in this state dir. A record that does not
    /// decode counts as none.
    pub fn last_refusal(&self) -> Result<Option<Event>, OutboxError> {
        Ok(self
            .meta
            .get(REFUSAL_KEY)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn push_keeping(&self, event: &Event, refusal: bool) -> Result<u64, OutboxError> {
        let mut high = self.high.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = event.seq.max(high.saturating_add(1));
        let event = Event { seq, ..event.clone() };
        let value = serde_json::to_vec(&event).map_err(|source| OutboxError::Encode { seq, source })?;
        // The mark first: an event stored without it still counts through the tree's last key.
        self.meta.insert(HIGH_KEY, &seq.to_be_bytes())?;
        if refusal {
            self.meta.insert(REFUSAL_KEY, value.as_slice())?;
        }
        self.tree.insert(seq.to_be_bytes(), value)?;
        self.enforce_cap()?;
        self.store.sync()?;
        *high = seq;
        drop(high);
        self.pushed.send_replace(seq);
        Ok(seq)
    }

    /// Changes to the seq of the last pushed event.
    pub fn pushed(&self) -> watch::Receiver<u64> {
        self.pushed.subscribe()
    }

    fn enforce_cap(&self) -> Result<(), OutboxError> {
        let len = self.tree.len();
        if len <= self.cap {
            return Ok(());
        }
        let excess = len - self.cap;
        let mut dropped = 0u64;
        let mut first = None;
        let mut last = None;
        for _ in 0..excess {
            match self.tree.pop_min()? {
                Some((k, _)) => {
                    let seq = decode_u64(&k);
                    first = first.or(seq);
                    last = seq;
                    dropped += 1;
                }
                None => break,
            }
        }
        if dropped > 0 {
            self.store.sync()?;
            let total = self.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
            tracing::warn!(
                dropped,
                first_seq = first.unwrap_or(0),
                last_seq = last.unwrap_or(0),
                total_dropped = total,
                cap = self.cap,
                "outbox full: dropped the {dropped} oldest unacknowledged event(s); the hub will not see them"
            );
        }
        Ok(())
    }

    /// Up to `limit` events, oldest first. Entries that do not decode are skipped (and logged);
    /// they go with the next acknowledgement beyond them.
    pub fn pending(&self, limit: usize) -> Result<Vec<Event>, OutboxError> {
        let mut out = Vec::with_capacity(limit.min(128));
        for item in &self.tree {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            match serde_json::from_slice::<Event>(&v) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(
                    key = ?decode_u64(&k),
                    error = %flightnode_proto::error::Chain(&e),
                    "outbox: skipping an event that does not decode"
                ),
            }
        }
        Ok(out)
    }

    /// Removes every event with `seq <= upto_seq` and syncs. Returns how many were removed.
    pub fn ack(&self, upto_seq: u64) -> Result<usize, OutboxError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree.range(..=upto_seq.to_be_bytes()) {
            let (k, _) = item?;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.tree.apply_batch(batch)?;
            self.store.sync()?;
        }
        Ok(n)
    }

    /// Number of events waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Seq of the newest waiting event.
    pub fn last_seq(&self) -> Result<Option<u64>, OutboxError> {
        Ok(self.tree.last()?.and_then(|(k, _)| decode_u64(&k)))
    }

    /// Events dropped because the outbox was full, since this outbox was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The next heartbeat sequence number: monotonic per state dir (see the module docs).
    pub fn next_heartbeat_seq(&self) -> u64 {
        self.heartbeat.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn decode_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            time_unix_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap(),
            upgrade_id: "up-1".into(),
            phase: "downloading".into(),
            result: String::new(),
            error_code: String::new(),
            message: String::new(),
        }
    }

    fn db() -> (tempfile::TempDir, Durable) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        (dir, store.durable())
    }

    fn seqs(o: &Outbox, limit: usize) -> Vec<u64> {
        o.pending(limit).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_waiting_event_says_who_holds_it() {
        let mut state = DeviceState::factory(semver::Version::new(1, 0, 0));
        state.begin("u1".into(), "http://x/fw".into(), false);
        state.hold(flightnode_proto::WaitReason::InAir);
        assert_eq!(
            Event::from_state(&state).message,
            "waiting for the vehicle: in_air"
        );
        state.hold(flightnode_proto::WaitReason::MeteredLink);
        let e = Event::from_state(&state);
        assert_eq!(
            (e.phase.as_str(), e.message.as_str()),
            ("waiting", "waiting: metered_link")
        );
    }

    #[test]
    fn ordered_by_seq_across_byte_boundaries() {
        let (_d, db) = db();
        let o = Outbox::open(&db, 100).unwrap();
        for s in [1u64, 2, 255, 256, 300] {
            o.push(&event(s)).unwrap();
        }
        assert_eq!(seqs(&o, 10), vec![1, 2, 255, 256, 300]);
        assert_eq!(seqs(&o, 2), vec![1, 2]);
        assert_eq!(o.len(), 5);
        assert_eq!(o.last_seq().unwrap(), Some(300));
        assert_eq!(o.pending(10).unwrap()[0], event(1));
    }

    #[test]
    fn ack_removes_up_to_seq() {
        let (_d, db) = db();
        let o = Outbox::open(&db, 100).unwrap();
        for s in 1..=5 {
            o.push(&event(s)).unwrap();
        }
        assert_eq!(o.ack(0).unwrap(), 0);
        assert_eq!(o.ack(3).unwrap(), 3);
        assert_eq!(seqs(&o, 10), vec![4, 5]);
        assert_eq!(o.ack(3).unwrap(), 0);
        assert_eq!(o.ack(u64::MAX).unwrap(), 2);
        assert!(o.is_empty());
        assert_eq!(o.last_seq().unwrap(), None);
    }

    #[test]
    fn cap_drops_oldest_and_counts() {
        let (_d, db) = db();
        let o = Outbox::open(&db, 3).unwrap();
        let clone = o.clone();
        for s in 1..=5 {
            clone.push(&event(s)).unwrap();
        }
        assert_eq!(seqs(&o, 10), vec![3, 4, 5]);
        assert_eq!(o.dropped(), 2);
        assert_eq!(clone.dropped(), 2);
    }

    #[test]
    fn survives_reopen_and_heartbeat_seq_grows() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let store = crate::store::Store::open(dir.path()).unwrap();
            let o = Outbox::open(&store.durable(), 10).unwrap();
            o.push(&event(7)).unwrap();
            first = o.next_heartbeat_seq();
            assert!(o.next_heartbeat_seq() > first);
        }
        let store = crate::store::reopen(dir.path());
        let db = store.durable();
        let o = Outbox::open(&db, 10).unwrap();
        assert_eq!(seqs(&o, 10), vec![7]);
        assert!(o.next_heartbeat_seq() > first + 1);
        // A smaller cap on reopen applies at once.
        drop(o);
        let o = Outbox::open(&db, 1).unwrap();
        o.push(&event(8)).unwrap();
        assert_eq!(seqs(&o, 10), vec![8]);
    }

    #[test]
    fn a_refusal_takes_the_next_seq_and_later_transitions_move_up_across_reopen() {
        let (dir, db) = db();
        let o = Outbox::open(&db, 10).unwrap();
        assert_eq!(o.push(&event(4)).unwrap(), 4);
        let mut pushed = o.pushed();
        assert_eq!(
            o.push(&Event::refused("up-2", "busy", "up-1 is in flight"))
                .unwrap(),
            5
        );
        assert!(pushed.has_changed().unwrap());
        assert_eq!(*pushed.borrow_and_update(), 5);
        // The state's next transition is seq 5 too: it must not replace the refusal.
        assert_eq!(o.push(&event(5)).unwrap(), 6);
        let events = o.pending(10).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(
            (
                events[1].result.as_str(),
                events[1].error_code.as_str(),
                events[1].phase.as_str()
            ),
            ("rejected", "busy", "idle")
        );
        // Acknowledged and reopened: the mark survives an empty outbox.
        o.ack(6).unwrap();
        drop((o, db));
        let store = crate::store::reopen(dir.path());
        let o = Outbox::open(&store.durable(), 10).unwrap();
        assert_eq!(o.push(&event(6)).unwrap(), 7);
        assert_eq!(o.push(&event(9)).unwrap(), 9);
    }

    #[test]
    fn the_newest_refusal_outlives_its_acknowledgement_and_a_reopen() {
        let (dir, db) = db();
        let o = Outbox::open(&db, 10).unwrap();
        assert!(o.last_refusal().unwrap().is_none());
        o.push_refusal(&Event::refused("up-1", "malformed", "no url"))
            .unwrap();
        let seq = o
            .push_refusal(&Event::refused("up-2", "busy", "up-0 is in flight"))
            .unwrap();
        // A transition is no refusal.
        o.push(&event(1)).unwrap();
        o.ack(seq + 1).unwrap();
        drop((o, db));
        let store = crate::store::reopen(dir.path());
        let o = Outbox::open(&store.durable(), 10).unwrap();
        let last = o.last_refusal().unwrap().unwrap();
        assert_eq!(
            (last.upgrade_id.as_str(), last.error_code.as_str(), last.seq),
            ("up-2", "busy", seq)
        );
    }

    #[test]
    fn from_state_maps_contract_strings() {
        let mut s = DeviceState::factory(semver::Version::new(1, 0, 0));
        s.begin("up-9".into(), "https://x/b".into(), false);
        let e = Event::from_state(&s);
        assert_eq!(
            (e.seq, e.phase.as_str(), e.upgrade_id.as_str()),
            (1, "downloading", "up-9")
        );
        s.fail(flightnode_proto::ErrorCode::DownloadFailed, "boom".into());
        let e = Event::from_state(&s);
        assert_eq!(e.phase, "idle");
        assert_eq!(e.upgrade_id, "up-9");
        assert_eq!(e.error_code, "download_failed");
        assert_eq!(e.message, "boom");
        assert!(!e.result.is_empty());
    }
}
