//! Write scheduler: a per-drone latest-wins queue, a global token bucket, state transitions
//! ahead of refreshes, retries with backoff that honour `Retry-After`.
//!
//! Per drone at most one write is in flight; what arrives meanwhile is merged into one pending
//! write (newest status, union of events), so a burst of heartbeats becomes one write and a
//! retried write can never overwrite a newer status.

use crate::metrics::Metrics;
use crate::session::{Enqueue, Sessions};
use crate::sink::{StatusSink, WriteError, WriteRequest};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Order of writes: transitions first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Only `lastHeartbeatTime` is stale.
    Refresh,
    /// Something an operator should see changed.
    Transition,
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sustained writes per second.
    pub qps: f64,
    /// Bucket size.
    pub burst: u32,
    /// Writes in flight at once.
    pub workers: usize,
    /// First retry delay (doubles per attempt).
    pub backoff_base: Duration,
    /// Longest retry delay, including a server's `Retry-After`.
    pub backoff_max: Duration,
    /// Create missing `FlightNode`s.
    pub auto_register: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            qps: 20.0,
            burst: 40,
            workers: 8,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            auto_register: false,
        }
    }
}

/// A classic token bucket on tokio's clock (so paused-time tests are exact).
#[derive(Debug)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            qps: qps.max(0.001),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.qps))
        }
    }

    /// Returns an unused token.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Queued(Priority),
    InFlight,
    Delayed,
}

struct Pending {
    req: WriteRequest,
    priority: Priority,
    attempts: u32,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    slots: HashMap<String, Slot>,
    transitions: VecDeque<String>,
    refreshes: VecDeque<String>,
}

impl State {
    /// Merges a write into the pending one; `newer` says whose status wins.
    fn merge(&mut self, req: WriteRequest, priority: Priority, attempts: u32, newer: bool) {
        match self.pending.get_mut(&req.name) {
            None => {
                self.pending.insert(
                    req.name.clone(),
                    Pending {
                        req,
                        priority,
                        attempts,
                    },
                );
            }
            Some(p) => {
                let mut events = std::mem::take(&mut p.req.events);
                events.extend(req.events.iter().cloned());
                events.sort_by_key(|e| e.seq);
                events.dedup_by_key(|e| e.seq);
                if newer {
                    p.req = req;
                }
                p.req.events = events;
                p.priority = p.priority.max(priority);
                p.attempts = p.attempts.max(attempts);
            }
        }
    }

    /// Queues `name` if it has a pending write and is idle (or was queued as a refresh and is
    /// now a transition); true when a worker should look.
    fn schedule(&mut self, name: &str) -> bool {
        let Some(priority) = self.pending.get(name).map(|p| p.priority) else {
            self.slots.remove(name);
            return false;
        };
        match self.slots.get(name) {
            None | Some(Slot::Queued(Priority::Refresh)) if priority == Priority::Transition => {
                self.slots
                    .insert(name.to_owned(), Slot::Queued(Priority::Transition));
                self.transitions.push_back(name.to_owned());
                true
            }
            None => {
                self.slots.insert(name.to_owned(), Slot::Queued(priority));
                self.refreshes.push_back(name.to_owned());
                true
            }
            _ => false,
        }
    }

    fn pop(&mut self) -> Option<Pending> {
        for (queue, priority) in [
            (&mut self.transitions, Priority::Transition),
            (&mut self.refreshes, Priority::Refresh),
        ] {
            while let Some(name) = queue.pop_front() {
                if self.slots.get(&name) == Some(&Slot::Queued(priority)) {
                    self.slots.insert(name.clone(), Slot::InFlight);
                    if let Some(p) = self.pending.remove(&name) {
                        return Some(p);
                    }
                    self.slots.remove(&name);
                }
            }
        }
        None
    }

    fn has_queued(&self) -> bool {
        !self.transitions.is_empty() || !self.refreshes.is_empty()
    }
}

/// The scheduler: shared by heartbeats, liveness and its workers.
pub struct Scheduler {
    config: SchedulerConfig,
    state: Mutex<State>,
    bucket: Mutex<TokenBucket>,
    work: Notify,
    sink: Arc<dyn StatusSink>,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    me: std::sync::Weak<Scheduler>,
}

impl Scheduler {
    /// A scheduler writing to `sink`; call [`Scheduler::spawn_workers`] to start writing.
    pub fn new(
        config: SchedulerConfig,
        sink: Arc<dyn StatusSink>,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Scheduler {
            me: me.clone(),
            bucket: Mutex::new(TokenBucket::new(config.qps, config.burst)),
            config,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            sink,
            sessions,
            metrics,
        })
    }

    // NB: std Mutexes: nothing awaits while they are held.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a write; it replaces (latest wins) any write still pending for the drone.
    pub fn enqueue(&self, e: Enqueue) {
        let name = e.req.name.clone();
        let mut state = self.state();
        state.merge(e.req, e.priority, 0, true);
        let wake = state.schedule(&name);
        self.metrics.queue_depth.set(state.pending.len() as i64);
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Writes waiting (pending, not in flight).
    pub fn depth(&self) -> usize {
        self.state().pending.len()
    }

    /// Starts the writer tasks.
    pub fn spawn_workers(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|_| {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.worker().await })
            })
            .collect()
    }

    async fn take_token(&self) {
        loop {
            let wait = {
                let mut bucket = self
                    .bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match bucket.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.state().has_queued() {
                notified.await;
                continue;
            }
            self.take_token().await;
            let Some(job) = self.state().pop() else {
                self.bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .refund();
                continue;
            };
            // Another worker may be needed for what is still queued.
            if self.state().has_queued() {
                self.work.notify_one();
            }
            self.run(job).await;
        }
    }

    async fn run(&self, job: Pending) {
        let started = Instant::now();
        let result = self.sink.write_status(&job.req).await;
        self.metrics
            .write_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(()) => "ok",
            Err(e) => e.label(),
        };
        self.metrics.writes(label).inc();
        let device_id = job.req.device_id.clone();
        match result {
            Ok(()) => {
                self.sessions.write_done(&job.req, Instant::now());
                tracing::debug!(device_id = %device_id, priority = ?job.priority, "status written");
                self.finish(&job.req.name);
            }
            Err(WriteError::NotFound) if self.config.auto_register => {
                self.take_token().await;
                match self.sink.create(&job.req.name, &job.req.hardware_id).await {
                    Ok(()) => {
                        tracing::info!(device_id = %device_id, name = %job.req.name, "registered FlightNode");
                        self.metrics.registered.inc();
                        self.retry(job, Duration::ZERO);
                    }
                    Err(e) => {
                        tracing::warn!(device_id = %device_id, error = %e, "auto-registration failed");
                        let delay = self.backoff(job.attempts + 1, None);
                        self.retry(job, delay);
                    }
                }
            }
            Err(WriteError::NotFound) => {
                self.metrics.missing.inc();
                if self.sessions.mark_missing(&job.req.name) {
                    tracing::warn!(
                        device_id = %device_id,
                        name = %job.req.name,
                        "no FlightNode for this drone; create it or run with --auto-register"
                    );
                }
                self.finish(&job.req.name);
            }
            Err(WriteError::Retryable {
                code,
                retry_after,
                message,
            }) => {
                let delay = self.backoff(job.attempts + 1, retry_after);
                tracing::debug!(device_id = %device_id, code, ?delay, %message, "status write will be retried");
                self.retry(job, delay);
            }
            Err(WriteError::Permanent { code, message }) => {
                tracing::warn!(device_id = %device_id, code, %message, "status write failed; dropped");
                self.finish(&job.req.name);
            }
        }
    }

    fn backoff(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
        retry_after.unwrap_or(exp).min(self.config.backoff_max)
    }

    fn finish(&self, name: &str) {
        let mut state = self.state();
        state.slots.remove(name);
        let wake = state.schedule(name);
        self.metrics.queue_depth.set(state.pending.len() as i64);
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Puts a failed write back under any newer pending one and re-queues it after `delay`.
    fn retry(&self, job: Pending, delay: Duration) {
        let name = job.req.name.clone();
        {
            let mut state = self.state();
            state.merge(job.req, job.priority, job.attempts + 1, false);
            state.slots.insert(name.clone(), Slot::Delayed);
        }
        let sched = self.weak();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(me) = sched.upgrade() {
                me.finish(&name);
            }
        });
    }

    fn weak(&self) -> std::sync::Weak<Self> {
        self.me.clone()
    }
}
