//! Write scheduler: a per-drone latest-wins queue, a global token bucket, state transitions
//! ahead of refreshes, retries with backoff that honour `Retry-After`.
//!
//! The queue holds drone names, not statuses: per drone at most one write is in flight, and a
//! write is built from the session when a worker takes it, so a burst of heartbeats becomes one
//! write of the newest status (with every event not yet durable) and a retried write can never
//! overwrite a newer status. Registrations and refreshes leave half the bucket to transitions.
//!
//! The scheduler knows nothing of sessions: it asks a [`StatusSource`] (the sessions, or a fake
//! in tests) for the write and tells it the outcome.

use crate::metrics::Metrics;
use crate::store::sink::{StatusSink, WriteError, WriteRequest};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Order of writes: transitions first, then first writes of newly seen drones, then refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Only `lastHeartbeatTime` is stale.
    Refresh,
    /// The first write of a drone this hub has not written yet (after a hub start, the whole
    /// fleet): needed, but an operator waits for nothing in particular.
    Register,
    /// Something an operator should see changed.
    Transition,
}

impl Priority {
    const ALL: [Priority; 3] = [Priority::Transition, Priority::Register, Priority::Refresh];

    fn index(self) -> usize {
        match self {
            Priority::Transition => 0,
            Priority::Register => 1,
            Priority::Refresh => 2,
        }
    }
}

/// A write to hand to the scheduler: which drone, and how urgent. The status itself is built
/// when the write goes out, so a queued write always carries the newest status (latest wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueue {
    /// `FlightNode` name.
    pub name: String,
    /// Transition, registration or refresh.
    pub priority: Priority,
}

/// A status write built by a [`StatusSource`], with the content hash it records once the write
/// succeeded.
#[derive(Debug, Clone)]
pub struct Built {
    /// The write.
    pub req: WriteRequest,
    /// Hash of `req.status` without its heartbeat time.
    pub content: u64,
}

/// What the scheduler needs from whoever holds the statuses (the sessions).
pub trait StatusSource: Send + Sync + 'static {
    /// The write for a drone as it stands now; `None` when the drone is gone.
    fn build(&self, name: &str) -> Option<Built>;
    /// Records a successful write of `built`, finished at `now`.
    fn write_done(&self, built: &Built, now: Instant);
    /// The drone's object does not exist; true the first time (so it is logged once).
    fn mark_missing(&self, name: &str) -> bool;
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
        self.try_take_above(now, 0.0)
    }

    /// Takes a token only if `keep` tokens stay in the bucket (a reserve for more urgent
    /// writes), or says how long until that is so.
    pub fn try_take_above(&mut self, now: Instant, keep: f64) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.last = now;
        let need = (1.0 + keep).min(self.burst);
        if self.tokens >= need {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / self.qps))
        }
    }

    /// Returns an unused token.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }
}

/// Where a drone's write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing queued or running (a write may still be wanted while a retry waits).
    Idle,
    /// Waiting in the queue of this priority.
    Queued(Priority),
    /// A worker is writing it.
    InFlight,
    /// A failed write waits for its retry.
    Delayed,
}

/// One drone's place in the scheduler; dropped once nothing is wanted or running.
struct Entry {
    stage: Stage,
    /// A write is wanted, at least this urgent.
    wanted: Option<Priority>,
    /// Failed attempts of the current write.
    attempts: u32,
}

/// A write a worker took: the drone and how urgent it was.
struct Job {
    name: String,
    priority: Priority,
    attempts: u32,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// One FIFO per priority; stale names (re-queued at a higher priority, or taken) are
    /// skipped when popped.
    queues: [VecDeque<String>; 3],
}

impl State {
    /// Wants a write for `name` at `priority` or more.
    fn want(&mut self, name: &str, priority: Priority) -> &mut Entry {
        let entry = self.entries.entry(name.to_owned()).or_insert(Entry {
            stage: Stage::Idle,
            wanted: None,
            attempts: 0,
        });
        entry.wanted = entry.wanted.max(Some(priority));
        entry
    }

    /// Queues `name` if a write is wanted and it is idle (or queued less urgently); drops the
    /// entry when nothing is wanted; true when a worker should look.
    fn schedule(&mut self, name: &str) -> bool {
        let Some(entry) = self.entries.get_mut(name) else {
            return false;
        };
        let Some(priority) = entry.wanted else {
            if entry.stage == Stage::Idle {
                self.entries.remove(name);
            }
            return false;
        };
        match entry.stage {
            Stage::Idle => {}
            Stage::Queued(queued) if queued < priority => {}
            _ => return false,
        }
        entry.stage = Stage::Queued(priority);
        self.queues[priority.index()].push_back(name.to_owned());
        true
    }

    /// The most urgent priority with a queued write.
    fn best(&mut self) -> Option<Priority> {
        for p in Priority::ALL {
            let queue = &mut self.queues[p.index()];
            while let Some(name) = queue.front() {
                match self.entries.get(name) {
                    Some(e) if e.stage == Stage::Queued(p) => return Some(p),
                    _ => {
                        queue.pop_front();
                    }
                }
            }
        }
        None
    }

    fn pop(&mut self) -> Option<Job> {
        for p in Priority::ALL {
            while let Some(name) = self.queues[p.index()].pop_front() {
                let Some(entry) = self.entries.get_mut(&name) else {
                    continue;
                };
                if entry.stage != Stage::Queued(p) {
                    continue;
                }
                entry.stage = Stage::InFlight;
                let priority = entry.wanted.take().unwrap_or(p);
                return Some(Job {
                    attempts: entry.attempts,
                    name,
                    priority,
                });
            }
        }
        None
    }

    /// Drones with a write wanted or running.
    fn depth(&self) -> usize {
        self.entries.len()
    }
}

/// The scheduler: shared by heartbeats, liveness and its workers.
pub struct Scheduler {
    config: SchedulerConfig,
    state: Mutex<State>,
    bucket: Mutex<TokenBucket>,
    work: Notify,
    sink: Arc<dyn StatusSink>,
    source: Arc<dyn StatusSource>,
    metrics: Arc<Metrics>,
    me: std::sync::Weak<Scheduler>,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set by [`Scheduler::drain`]: workers end once nothing is queued.
    draining: std::sync::atomic::AtomicBool,
}

impl Scheduler {
    /// A scheduler writing to `sink`; call [`Scheduler::spawn_workers`] to start writing.
    pub fn new(
        config: SchedulerConfig,
        sink: Arc<dyn StatusSink>,
        source: Arc<dyn StatusSource>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        metrics.write_budget_qps.set(config.qps);
        Arc::new_cyclic(|me| Scheduler {
            me: me.clone(),
            bucket: Mutex::new(TokenBucket::new(config.qps, config.burst)),
            config,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            sink,
            source,
            metrics,
            workers: Mutex::new(Vec::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    // NB: std Mutexes: nothing awaits while they are held.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wants a write for a drone; what goes out is its newest status when a token allows.
    pub fn enqueue(&self, e: &Enqueue) {
        let mut state = self.state();
        state.want(&e.name, e.priority);
        let wake = state.schedule(&e.name);
        self.metrics
            .queue_depth
            .set(i64::try_from(state.depth()).unwrap_or(i64::MAX));
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Drones with a write waiting or running.
    pub fn depth(&self) -> usize {
        self.state().depth()
    }

    /// Starts the writer tasks; [`Scheduler::drain`] ends them.
    pub fn spawn_workers(self: &Arc<Self>) {
        let spawned = (0..self.config.workers.max(1)).map(|_| {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.worker().await })
        });
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(spawned);
    }

    /// Shutdown: the workers write what is queued (at the bucket's rate) and end once the queue
    /// is empty; after `timeout` the rest is dropped, with a log line saying how much. A write
    /// waiting for its retry is not waited for.
    pub async fn drain(&self, timeout: Duration) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        self.work.notify_waiters();
        let workers = std::mem::take(
            &mut *self
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let deadline = Instant::now() + timeout;
        for mut worker in workers {
            if tokio::time::timeout_at(deadline, &mut worker).await.is_err() {
                worker.abort();
            }
        }
        let left = self.depth();
        if left > 0 {
            tracing::warn!(
                drones = left,
                ?timeout,
                "shutdown: status writes still waiting were dropped"
            );
        }
    }

    /// Tokens that only transitions may take: registrations and refreshes leave them in the
    /// bucket, so a phase change finds tokens even while the whole fleet waits to be written.
    fn reserve(&self, priority: Priority) -> f64 {
        match priority {
            Priority::Transition => 0.0,
            Priority::Register | Priority::Refresh => f64::from(self.config.burst / 2),
        }
    }

    fn try_take(&self, priority: Priority) -> Result<(), Duration> {
        self.bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_take_above(Instant::now(), self.reserve(priority))
    }

    async fn take_token(&self, priority: Priority) {
        while let Err(wait) = self.try_take(priority) {
            tokio::time::sleep(wait).await;
        }
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(best) = self.state().best() else {
                if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
                continue;
            };
            if let Err(wait) = self.try_take(best) {
                // A more urgent write may arrive meanwhile and may use the reserve.
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = notified => {}
                }
                continue;
            }
            let Some(job) = self.state().pop() else {
                self.bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .refund();
                continue;
            };
            // Another worker may be needed for what is still queued.
            if self.state().best().is_some() {
                self.work.notify_one();
            }
            self.run(job).await;
        }
    }

    async fn run(&self, job: Job) {
        let Some(built) = self.source.build(&job.name) else {
            self.finish(&job.name, true);
            return;
        };
        let req = &built.req;
        let started = Instant::now();
        let result = self.sink.write_status(req).await;
        self.metrics
            .write_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(()) => "ok",
            Err(e) => e.label(),
        };
        self.metrics.writes(label).inc();
        match result {
            Ok(()) => {
                self.source.write_done(&built, Instant::now());
                tracing::debug!(device_id = %req.device_id, priority = ?job.priority, "status written");
                self.finish(&job.name, true);
            }
            Err(WriteError::NotFound) if self.config.auto_register => {
                self.take_token(job.priority).await;
                match self.sink.create(&req.name, &req.hardware_id).await {
                    Ok(()) => {
                        tracing::info!(device_id = %req.device_id, name = %req.name, "registered FlightNode");
                        self.metrics.registered.inc();
                        self.retry(job, Duration::ZERO);
                    }
                    Err(e) => {
                        tracing::warn!(device_id = %req.device_id, error = %flightnode_proto::error::Chain(&e), "auto-registration failed");
                        let delay = self.backoff(job.attempts + 1, None);
                        self.retry(job, delay);
                    }
                }
            }
            Err(WriteError::NotFound) => {
                self.metrics.missing.inc();
                if self.source.mark_missing(&req.name) {
                    tracing::warn!(
                        device_id = %req.device_id,
                        name = %req.name,
                        "no FlightNode for this drone; create it or run with --auto-register"
                    );
                }
                self.finish(&job.name, true);
            }
            Err(WriteError::Retryable {
                code,
                retry_after,
                message,
            }) => {
                let delay = self.backoff(job.attempts + 1, retry_after);
                tracing::debug!(device_id = %req.device_id, code, ?delay, %message, "status write will be retried");
                self.retry(job, delay);
            }
            Err(WriteError::Permanent { code, message }) => {
                tracing::warn!(device_id = %req.device_id, code, %message, "status write failed; dropped");
                self.finish(&job.name, true);
            }
        }
    }

    fn backoff(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let exp = flightnode_proto::backoff::exponential(
            self.config.backoff_base,
            attempts,
            self.config.backoff_max,
        );
        retry_after.unwrap_or(exp).min(self.config.backoff_max)
    }

    /// Ends a drone's write (or its retry wait); `done` resets its attempts. Queues it again
    /// when a newer write was wanted meanwhile.
    fn finish(&self, name: &str, done: bool) {
        let mut state = self.state();
        if let Some(entry) = state.entries.get_mut(name) {
            entry.stage = Stage::Idle;
            if done {
                entry.attempts = 0;
            }
        }
        let wake = state.schedule(name);
        self.metrics
            .queue_depth
            .set(i64::try_from(state.depth()).unwrap_or(i64::MAX));
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Wants the failed write again (with whatever is newest then) after `delay`.
    fn retry(&self, job: Job, delay: Duration) {
        {
            let mut state = self.state();
            let entry = state.want(&job.name, job.priority);
            entry.stage = Stage::Delayed;
            entry.attempts = job.attempts + 1;
        }
        let sched = self.weak();
        let name = job.name;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(me) = sched.upgrade() {
                me.finish(&name, false);
            }
        });
    }

    fn weak(&self) -> std::sync::Weak<Self> {
        self.me.clone()
    }
}

#[cfg(test)]
mod tests;
