//! The engine thread: the upgrade engine is synchronous, so it runs on its own thread and takes
//! jobs from a queue, publishing every saved transition and every progress step to the async side.

use crate::engine::{Engine, Interrupts, Observer, Outcome, Request};
use crate::outbox::{Event, Outbox};
use crate::state::DeviceState;
use flightnode_proto::error::{Chain, chain};
use flightnode_proto::mqtt::StatusError;
use flightnode_proto::status::Progress;
use flightnode_proto::{Phase, Slot, WaitReason};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch};

/// Work for the engine thread.
pub enum Job {
    /// Finish whatever was in flight (first job after start).
    Resume,
    /// Install; the reply gets the outcome (or the engine error) when it ends.
    Install {
        /// What to install and from where.
        req: Request,
        /// Who waits for the outcome (`None`: nobody, e.g. an MQTT command).
        reply: Option<oneshot::Sender<Result<Outcome, String>>>,
    },
    /// mark-good / mark-bad.
    Mark {
        /// The slot to mark.
        slot: Slot,
        /// Good (true) or bad.
        good: bool,
        /// Gets the engine's answer or its error.
        reply: oneshot::Sender<Result<String, String>>,
    },
}

impl Job {
    /// The upgrade id of an install job.
    fn install_id(&self) -> Option<String> {
        match self {
            Job::Install { req, .. } => Some(req.id.clone()),
            Job::Resume | Job::Mark { .. } => None,
        }
    }
}

/// The install job between its submission and its end.
struct PendingInstall {
    id: String,
    /// The engine thread took it up.
    started: bool,
    /// Canceled before it started: the engine thread drops it.
    canceled: bool,
}

/// Handle on the engine thread.
pub struct Worker {
    /// `None` once [`Worker::shutdown`] closed the queue.
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    pending: Arc<AtomicUsize>,
    /// The install job queued or running (at most one: see the dispatcher).
    install: Arc<Mutex<Option<PendingInstall>>>,
    /// Latest saved state.
    pub state: watch::Receiver<DeviceState>,
    /// Latest download progress.
    pub progress: watch::Receiver<Option<Progress>>,
    /// Cancel / pause the download in flight.
    pub interrupts: Arc<Interrupts>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Disconnected when the engine thread ends (its sender lives on that thread).
    ended: Mutex<std::sync::mpsc::Receiver<()>>,
}

// NB: std Mutexes: held only for a take, a send or a bounded wait, never across an await.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forwards the engine's notifications: every transition (never coalesced, so no phase is lost)
/// to `transitions` and the outbox, the latest state and progress to watches.
struct Relay {
    state: watch::Sender<DeviceState>,
    progress: watch::Sender<Option<Progress>>,
    transitions: mpsc::UnboundedSender<DeviceState>,
    outbox: Option<Outbox>,
    last: TransitionKey,
}

/// (upgrade, phase and why it waits, ending) of the last transition.
pub type TransitionKey = (Option<String>, (Phase, Option<WaitReason>), Option<String>);

/// The event a transition produces, if it is one (a phase entered, a new reason to wait, or an
/// upgrade ended); `last` remembers the previous one so repeated saves of one phase make no event.
pub fn transition_event(state: &DeviceState, last: &mut TransitionKey) -> Option<Event> {
    let key = (
        state.upgrade.as_ref().map(|u| u.id.clone()),
        (
            state.phase(),
            state
                .upgrade
                .as_ref()
                .and_then(crate::state::Upgrade::wait_reason),
        ),
        state
            .last
            .as_ref()
            .map(|l| format!("{}:{}", l.upgrade_id, l.finished)),
    );
    if key == *last {
        return None;
    }
    let ended = key.2 != last.2;
    *last = key;
    (state.upgrade.is_some() || ended).then(|| Event::from_state(state))
}

impl Observer for Relay {
    fn changed(&mut self, state: &DeviceState) {
        if let Some(event) = transition_event(state, &mut self.last) {
            if let Some(outbox) = &self.outbox
                && let Err(e) = outbox.push(&event)
            {
                tracing::error!(upgrade_id = %event.upgrade_id, "cannot record event for the hub: {}", Chain(&e));
            }
            let _ = self.transitions.send(state.clone());
        }
        if state.upgrade.is_none() {
            self.progress.send_replace(None);
        }
        self.state.send_replace(state.clone());
    }

    fn progress(&mut self, bytes: u64, total: u64) {
        self.progress.send_replace(Some(Progress { bytes, total }));
    }
}

/// An install without a waiting caller (an MQTT command) that the engine refused before it
/// became an upgrade: its id and why.
pub type Refusal = (String, StatusError);

impl Worker {
    /// Starts the engine thread. `transitions` gets every saved phase change, `refusals` every
    /// MQTT install the engine refused before it started (to be reported like any refusal).
    pub fn start(
        mut engine: Engine,
        outbox: Option<Outbox>,
        transitions: mpsc::UnboundedSender<DeviceState>,
        refusals: mpsc::UnboundedSender<Refusal>,
    ) -> std::io::Result<Self> {
        let initial = engine.state().clone();
        let (state_tx, state) = watch::channel(initial.clone());
        let (progress_tx, progress) = watch::channel(None);
        let mut last: TransitionKey = (None, (Phase::Idle, None), None);
        transition_event(&initial, &mut last);
        engine.set_observer(Box::new(Relay {
            state: state_tx.clone(),
            progress: progress_tx,
            transitions,
            outbox,
            last,
        }));
        let interrupts = engine.interrupts();
        let pending = Arc::new(AtomicUsize::new(0));
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let thread_pending = pending.clone();
        let install = Arc::new(Mutex::new(None::<PendingInstall>));
        let thread_install = install.clone();
        let queued = super::queued::Queued::open(&engine.durable())
            .map_err(|e| std::io::Error::other(format!("opening the queued commands: {e}")))?;
        let (alive, ended) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("flightnode-engine".into())
            .spawn(move || {
                let _alive = alive;
                for job in rx {
                    let install_id = job.install_id();
                    let canceled = install_id.is_some()
                        && lock(&thread_install).as_mut().is_some_and(|p| {
                            p.started = true;
                            p.canceled
                        });
                    if install_id.is_some() {
                        crate::failpoint::hit("install_taken");
                    }
                    if canceled {
                        if let Job::Install { req, reply } = job {
                            tracing::info!(upgrade_id = %req.id, "canceled before it started; not installing");
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(format!("canceled: upgrade {} was canceled before it started", req.id)));
                            }
                        }
                    } else if let Some(error) = run_job(&mut engine, job) {
                        // Only what never became an upgrade is a refusal; one that started and
                        // stopped on an engine error is in the state and reported from there.
                        let state = engine.state();
                        let known = |id: &str| {
                            state.upgrade.as_ref().is_some_and(|u| u.id == id)
                                || state.last.as_ref().is_some_and(|l| l.upgrade_id == id)
                        };
                        if let Some(id) = install_id.as_deref().filter(|id| !known(id)) {
                            let _ = refusals.send((id.to_owned(), error));
                        }
                    }
                    state_tx.send_replace(engine.state().clone());
                    if let Some(id) = install_id {
                        // The store holds the upgrade's outcome now (or its phase, for a reboot
                        // still to come): the command has nothing left to say.
                        queued.remove(&id);
                        lock(&thread_install).take();
                    }
                    thread_pending.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            pending,
            install,
            state,
            progress,
            interrupts,
            thread: Mutex::new(Some(thread)),
            ended: Mutex::new(ended),
        })
    }

    /// Queues a job. An install is recorded at once (see [`Worker::install`]), so two commands
    /// cannot both pass the busy check.
    pub fn submit(&self, job: Job) -> bool {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let install = job.install_id();
        let mut current = lock(&self.install);
        if let Some(id) = &install {
            *current = Some(PendingInstall {
                id: id.clone(),
                started: false,
                canceled: false,
            });
        }
        let sent = lock(&self.jobs)
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            if install.is_some() {
                current.take();
            }
        }
        sent
    }

    /// Whether a job is queued or running.
    pub fn is_busy(&self) -> bool {
        self.pending.load(Ordering::SeqCst) > 0
    }

    /// The upgrade id of the install job that is queued (behind start-up recovery, say) or
    /// running, until that job has ended and the state shows its outcome.
    pub fn install(&self) -> Option<String> {
        lock(&self.install).as_ref().map(|p| p.id.clone())
    }

    /// Cancels the install of `upgrade_id` if it is still waiting to start: the engine thread
    /// then drops it. False when it is not the waiting install (or already started).
    pub fn cancel_waiting(&self, upgrade_id: &str) -> bool {
        lock(&self.install)
            .as_mut()
            .filter(|p| p.id == upgrade_id && !p.started)
            .is_some_and(|p| {
                p.canceled = true;
                true
            })
    }

    /// Pauses any download, closes the job queue and waits up to `grace` for the engine thread
    /// to end (at a resumable point), then joins it. Every step is write-ahead, so exiting after
    /// the grace period is as safe as a crash. Blocks: call it from a blocking thread.
    pub fn shutdown(&self, grace: std::time::Duration) {
        self.interrupts.pause.store(true, Ordering::SeqCst);
        // The thread ends once its queue is empty and closed.
        drop(lock(&self.jobs).take());
        let ended = lock(&self.ended).recv_timeout(grace);
        if ended != Err(std::sync::mpsc::RecvTimeoutError::Disconnected) {
            tracing::warn!(
                ?grace,
                "the engine did not stop within the grace period; exiting (every step is write-ahead)"
            );
            return;
        }
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// Runs one job. Returns the error of an install nobody waits for (an MQTT command).
fn run_job(engine: &mut Engine, job: Job) -> Option<StatusError> {
    match job {
        Job::Resume => {
            match engine.resume() {
                Ok(outcome) => tracing::info!(?outcome, "start-up recovery done"),
                Err(e) => tracing::error!("start-up recovery failed: {}", Chain(&e)),
            }
            None
        }
        Job::Install { req, reply } => {
            let id = req.id.clone();
            let result = engine.install(req);
            let refusal = match &result {
                Err(e) => {
                    tracing::error!(upgrade_id = %id, code = %e.code(), "install failed: {}", Chain(e));
                    reply.is_none().then(|| StatusError::code(e.code(), chain(e)))
                }
                Ok(_) => None,
            };
            if let Some(reply) = reply {
                let _ = reply.send(result.map_err(|e| format!("{}: {}", e.code(), Chain(&e))));
            }
            refusal
        }
        Job::Mark { slot, good, reply } => {
            let _ = reply.send(engine.mark(slot, good).map_err(|e| chain(&e)));
            None
        }
    }
}
