//! Wiring: engine thread, MQTT link, hub link, control socket, systemd — and a clean stop.

use super::authority::Authority;
use super::commands::{Dispatcher, History, Reply};
use super::control::{self, Request as CtlRequest, Response};
use super::notify;
use super::queued::Queued;
use super::reports::{self, Sequencer};
use super::worker::{Job, Worker};
use crate::activation::Activation;
use crate::bundle::TrustedKeys;
use crate::clock::Clock;
use crate::config::{Config, FleetGate};
use crate::engine::{Engine, EngineError, Outcome};
use crate::hub_link::{self, DeviceInfo, Tls};
use crate::mqtt::{self, Inbound};
use crate::outbox::Outbox;
use crate::state::DeviceState;
use flightnode_proto::error::Chain;
use flightnode_proto::mqtt::{Command, StatusMessage, UpgradeCommand, derive_upgrade_id};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The engine (store, keys, backends).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A sled tree of the daemon (history, report sequence) in the state store.
    #[error("state store {}: opening the daemon's trees", path.display())]
    Store {
        /// The state store directory.
        path: std::path::PathBuf,
        /// Why.
        source: sled::Error,
    },
    /// The hub outbox.
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    /// The control socket.
    #[error("control socket {}", path.display())]
    Socket {
        /// Socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The engine thread.
    #[error("cannot start the engine thread")]
    Thread(#[source] std::io::Error),
    /// A `[commands] hub_keys` file.
    #[error("[commands] hub_keys: {0}")]
    HubKeys(#[source] crate::bundle::BundleError),
}

/// How long a stop waits for the engine to reach a resumable point.
const STOP_GRACE: Duration = Duration::from_secs(20);

fn boot_id(cfg: &Config) -> String {
    let path = cfg
        .boot
        .as_ref()
        .map_or(Path::new("/proc/sys/kernel/random/boot_id"), |b| {
            b.boot_id.as_path()
        });
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The fleet gate for reboot-mode commits, from the links' `connected` flags.
fn fleet_gate(
    kind: FleetGate,
    mqtt: Option<watch::Receiver<bool>>,
    hub: Option<watch::Receiver<bool>>,
) -> Option<crate::engine::FleetGate> {
    let links: Vec<_> = match kind {
        FleetGate::None => vec![],
        FleetGate::Any => mqtt.into_iter().chain(hub).collect(),
        FleetGate::Broker => mqtt.into_iter().collect(),
        FleetGate::Hub => hub.into_iter().collect(),
    };
    if links.is_empty() {
        return None;
    }
    Some(Box::new(move |timeout: Duration| {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if links.iter().any(|l| *l.borrow()) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }))
}

struct Shared {
    cfg: Config,
    worker: Worker,
    dispatcher: Mutex<Dispatcher>,
    activation: Activation,
    /// Flights since commit, when a MAVLink link counts them.
    flights: Option<watch::Receiver<crate::flight::log::FlightLog>>,
    /// What the flight controller reports, when a MAVLink link reads it.
    flight: Option<watch::Receiver<crate::flight::FlightState>>,
    /// Which MQTT commands are obeyed.
    authority: Authority,
    /// The trusted time.
    clock: Clock,
}

impl Shared {
    fn status(&self) -> flightnode_proto::status::DeviceStatus {
        let state = self.worker.state.borrow().clone();
        let booted = self.activation.booted(state.active).unwrap_or(state.active);
        let mut status = state.report(&self.cfg.device_id, booted);
        if let (Some(p), Some(_)) = (*self.worker.progress.borrow(), &status.upgrade) {
            status.progress = Some(p);
        }
        if let Some(log) = &self.flights {
            let (flights, airborne_secs) = log.borrow().of(&crate::flight::log::image_of(&state));
            status.flights = Some(flightnode_proto::status::Flights {
                flights,
                airborne_secs,
            });
        }
        let autopilot = self
            .flight
            .as_ref()
            .and_then(|f| f.borrow().firmware_version.clone());
        status.arm_lock = crate::flight::arm::lock_of(&state, autopilot.as_deref());
        let now = self.clock.now();
        status.clock = Some(flightnode_proto::status::ClockStatus {
            source: now.source.as_str().to_owned(),
            unix_ms: now.unix_ms,
        });
        status
    }

    /// The dispatcher. Its state lives in sled and is written before each reply, so after a
    /// panic while it was held it is still sound: the poisoned lock is logged and recovered
    /// instead of answering nothing to every later command.
    fn dispatcher(&self) -> MutexGuard<'_, Dispatcher> {
        self.dispatcher.lock().unwrap_or_else(|poisoned| {
            tracing::error!("the command dispatcher panicked while handling an earlier command; carrying on");
            poisoned.into_inner()
        })
    }

    fn dispatch(&self, command: Command, want_reply: bool) -> Reply {
        self.dispatcher().handle(&self.worker, command, want_reply)
    }

    fn report(&self, f: impl FnOnce(&mut Dispatcher, &DeviceState) -> StatusMessage) -> StatusMessage {
        let state = self.worker.state.borrow().clone();
        f(&mut self.dispatcher(), &state)
    }

    /// Runs `f` on a blocking thread: the dispatcher's history and report sequence live in sled
    /// (reads, inserts, flushes) and the activation backend may run a script. `None` (logged)
    /// when the task panicked.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Option<T> {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::error!(error = %e, "daemon: a blocking task failed");
                None
            }
        }
    }
}

/// Runs the daemon until `shutdown` fires (SIGTERM/SIGINT in `main`).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let mut engine = Engine::open(cfg.clone(), tokio::runtime::Handle::current())?;
    // Opened now, not at the first gated step: the hub shows the flight state all the time.
    let flight = engine.flight_state();
    let arm_switch = engine.arm_switch();
    let db = engine.durable();
    let clock = engine.clock();
    let (mqtt_up_tx, mqtt_up) = watch::channel(false);
    let mut mqtt_connected = mqtt_up.clone();
    let (hub_up_tx, hub_up) = watch::channel(false);
    let gate = fleet_gate(
        cfg.daemon.commit_requires,
        cfg.mqtt.as_ref().map(|_| mqtt_up.clone()),
        cfg.hub.as_ref().map(|_| hub_up.clone()),
    );
    if let Some(gate) = gate {
        engine.set_fleet_gate(gate);
    }
    let outbox = cfg
        .hub
        .as_ref()
        .map(|h| Outbox::open(&db, h.outbox_cap))
        .transpose()?;
    let (transitions_tx, mut transitions) = mpsc::unbounded_channel();
    let (refusals_tx, mut refusals) = mpsc::unbounded_channel();
    let worker =
        Worker::start(engine, outbox.clone(), transitions_tx, refusals_tx).map_err(DaemonError::Thread)?;
    worker.submit(Job::Resume);
    let activation = Activation::open(&cfg).map_err(EngineError::from)?;
    let store_err = |source| DaemonError::Store {
        path: cfg.state_dir.join("db"),
        source,
    };
    let dispatcher = Dispatcher {
        device_id: cfg.device_id.clone(),
        history: History::open(&db).map_err(store_err)?,
        seq: Sequencer::open(&db).map_err(store_err)?,
        queued: Queued::open(&db).map_err(store_err)?,
        outbox: outbox.clone(),
    };
    // Flights since commit, counted from the same MAVLink link as the gate (none without one).
    let (flights_tx, flights) = match &flight {
        Some(_) => {
            let (tx, rx) = watch::channel(crate::flight::log::load(&db));
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    if let Some(f) = &flight {
        clock.follow_flight(f.clone());
    }
    let hub_keys = if cfg.commands.hub_keys.is_empty() {
        None
    } else {
        Some(TrustedKeys::load(&cfg.commands.hub_keys).map_err(DaemonError::HubKeys)?)
    };
    let authority = Authority::open(
        &db,
        &cfg.device_id,
        hub_keys.clone(),
        cfg.commands.insecure_accept_unsigned,
        clock.clone(),
    )
    .map_err(store_err)?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        worker,
        dispatcher: Mutex::new(dispatcher),
        activation,
        flights: flights.clone(),
        flight: flight.clone(),
        authority,
        clock: clock.clone(),
    });
    let links = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(f), Some(switch)) = (flight.clone(), arm_switch) {
        tasks.spawn(crate::flight::arm::keep(
            switch,
            shared.worker.state.clone(),
            f,
            links.clone(),
        ));
    }
    if let (Some(f), Some(tx)) = (flight.clone(), flights_tx) {
        tasks.spawn(crate::flight::log::keep(
            db.clone(),
            f,
            shared.worker.state.clone(),
            tx,
            links.clone(),
        ));
    }

    let (out_tx, out_rx) = mpsc::channel::<StatusMessage>(256);
    let (in_tx, mut inbound) = mpsc::channel::<Inbound>(64);
    if let Some(m) = cfg.mqtt.clone() {
        let (device, token) = (cfg.device_id.clone(), links.clone());
        tasks.spawn(async move {
            if let Err(e) = mqtt::run(m, device, in_tx, out_rx, mqtt_up_tx, token).await {
                tracing::error!("MQTT link stopped: {}", Chain(&e));
            }
        });
    } else {
        drop((in_tx, out_rx));
    }
    if let (Some(h), Some(outbox)) = (cfg.hub.clone(), outbox) {
        let (ca, cert, key) = cfg.hub_tls();
        let info = DeviceInfo {
            device_id: cfg.device_id.clone(),
            hardware: cfg.hardware.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_id: boot_id(&cfg),
            state_dir: cfg.state_dir.clone(),
            booted: shared
                .blocking(|s| match &s.activation {
                    Activation::Reboot { boot, .. } => boot.booted().ok(),
                    Activation::Command { .. } => None,
                })
                .await
                .flatten(),
            hub_keys,
            clock: Some(clock.clone()),
        };
        let (state, progress, token) = (
            shared.worker.state.clone(),
            shared.worker.progress.clone(),
            links.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) = hub_link::run(
                h,
                Tls { ca, cert, key },
                info,
                state,
                progress,
                outbox,
                flight,
                flights,
                hub_up_tx,
                token,
            )
            .await
            {
                tracing::error!("hub link stopped: {}", Chain(&e));
            }
        });
    }
    let socket = control::socket_path(&cfg.state_dir);
    let listener = bind_control(&socket)?;
    tasks.spawn(serve_control(listener, shared.clone(), links.clone()));

    let phase = shared.worker.state.borrow().phase();
    notify::ready(&format!("phase: {phase}"));
    tracing::info!(device_id = %cfg.device_id, mqtt = cfg.mqtt.is_some(), hub = cfg.hub.is_some(), "flightnode-agent running");

    let publish = |msg: Option<StatusMessage>| {
        if let Some(msg) = msg
            && cfg.mqtt.is_some()
            && out_tx.try_send(msg).is_err()
        {
            tracing::warn!("MQTT report queue full; dropping a report");
        }
    };
    // Commands accepted before a restart whose install never ended: they run after the start-up
    // recovery, which is first in the engine's queue.
    for report in shared
        .blocking(|s| s.dispatcher().replay_queued(&s.worker))
        .await
        .unwrap_or_default()
    {
        publish(Some(report));
    }
    let mut progress_tick = tokio::time::interval(Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(notify::watchdog_period().unwrap_or(Duration::from_hours(1)));
    let mut last_progress = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(msg) = inbound.recv() => match msg {
                Inbound::Command(envelope) => {
                    let reply = shared.blocking(move |s| {
                        let upgrade_id = envelope.command.upgrade_id().to_owned();
                        match s.authority.check(envelope) {
                            Ok(c) => s.dispatch(c, false),
                            Err(e) => Reply::Report(s.report(|d, state| d.refuse(state, Some(upgrade_id), e))),
                        }
                    });
                    if let Some(Reply::Report(r)) = reply.await {
                        publish(Some(r));
                    }
                }
                Inbound::Malformed { reason, upgrade_id } => publish(
                    shared
                        .blocking(move |s| s.report(|d, _| d.malformed(&s.worker, reason, upgrade_id)))
                        .await,
                ),
            },
            Some((id, error)) = refusals.recv() => {
                let report = shared.blocking(move |s| s.report(|d, state| d.refuse(state, Some(id), error)));
                publish(report.await);
            }
            Some(state) = transitions.recv() => {
                notify::status(&format!("phase: {}", state.phase()));
                last_progress = None;
                let report = shared.blocking(move |s| {
                    if state.upgrade.is_none()
                        && let Some(last) = &state.last
                    {
                        s.dispatcher().history.record(last);
                    }
                    s.report(|d, _| reports::current(&d.device_id, d.seq.take(), &state, None))
                });
                publish(report.await);
            }
            _ = progress_tick.tick() => {
                let p = *shared.worker.progress.borrow();
                if p.is_some() && p != last_progress {
                    last_progress = p;
                    let report = shared.blocking(move |s| {
                        s.report(|d, s| reports::current(&d.device_id, d.seq.take(), s, p))
                    });
                    publish(report.await);
                }
            }
            // Connected (again): the retained status says what this drone is doing now, also
            // when it is idle and nothing would be reported otherwise (a broker that lost its
            // retained messages, an operator or hub that subscribes later).
            Ok(()) = mqtt_connected.changed(), if cfg.mqtt.is_some() => {
                if *mqtt_connected.borrow_and_update() {
                    let report = shared.blocking(move |s| {
                        let progress = *s.worker.progress.borrow();
                        s.report(|d, state| reports::current(&d.device_id, d.seq.take(), state, progress))
                    });
                    publish(report.await);
                }
            }
            _ = watchdog.tick() => notify::watchdog(),
        }
    }
    notify::stopping();
    tracing::info!("stopping: pausing any download, letting links finish");
    links.cancel();
    let _ = std::fs::remove_file(&socket);
    let stopping = shared.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.worker.shutdown(STOP_GRACE)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

fn bind_control(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if control::connect(path.parent().unwrap_or(Path::new("."))).is_some() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another flightnode-agent is running",
        )));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

async fn serve_control(listener: tokio::net::UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                tokio::spawn(handle_control(stream, shared.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle_control(stream: tokio::net::UnixStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(control::MAX_REQUEST_BYTES as u64));
    reader.read_line(&mut line).await?;
    let req: CtlRequest = match serde_json::from_str(&line) {
        Ok(req) => req,
        Err(e) => {
            let error = Response::Error {
                code: "malformed".into(),
                message: format!("bad request: {e}"),
            };
            return send(&mut w, &error).await;
        }
    };
    match req {
        CtlRequest::Status => {
            let resp = shared.blocking(Shared::status).await.map_or_else(
                || Response::Error {
                    code: "internal".into(),
                    message: "reading the status failed (see the agent's log)".into(),
                },
                |status| Response::Status(Box::new(status)),
            );
            send(&mut w, &resp).await
        }
        CtlRequest::Install {
            source,
            allow_downgrade,
            upgrade_id,
        } => {
            let id = upgrade_id.unwrap_or_else(|| derive_upgrade_id(&source));
            let cmd = Command::Upgrade(UpgradeCommand {
                upgrade_id: id,
                url: source,
                version: None,
                allow_downgrade,
            });
            let Some(reply) = shared.blocking(move |s| s.dispatch(cmd, true)).await else {
                // Not "the engine is not running": the dispatcher failed on this very command.
                let message = "handling the install command failed (see the agent's log)".into();
                return send(
                    &mut w,
                    &Response::Error {
                        code: "internal".into(),
                        message,
                    },
                )
                .await;
            };
            match reply {
                Reply::Started(Some(mut done)) => {
                    let mut progress = shared.worker.progress.clone();
                    loop {
                        tokio::select! {
                            outcome = &mut done => {
                                let resp = match outcome {
                                    Ok(Ok(Outcome::Finished(last))) => Response::Done(last),
                                    Ok(Ok(other)) => Response::Outcome(format!("{other:?}")),
                                    Ok(Err(e)) => Response::Error { code: "internal".into(), message: e },
                                    Err(_) => Response::Error { code: "internal".into(), message: "the engine stopped".into() },
                                };
                                return send(&mut w, &resp).await;
                            }
                            Ok(()) = progress.changed() => {
                                let p = *progress.borrow_and_update();
                                if let Some(p) = p {
                                    send(&mut w, &Response::Progress(p)).await?;
                                }
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                }
                Reply::Report(report) => {
                    let id = report.upgrade_id.clone().unwrap_or_default();
                    let ended = shared
                        .worker
                        .state
                        .borrow()
                        .last
                        .clone()
                        .filter(|l| l.upgrade_id == id);
                    let ended = if ended.is_some() {
                        ended
                    } else {
                        let id = id.clone();
                        let from_history = move |s: &Shared| s.dispatcher().history.get(&id);
                        shared.blocking(from_history).await.flatten()
                    };
                    let resp = match (ended, report.error) {
                        (Some(last), _) => Response::Done(last),
                        (None, Some(e)) => Response::Error {
                            code: e.code,
                            message: e.message,
                        },
                        (None, None) => Response::Outcome(format!("upgrade {id} is {}", report.phase)),
                    };
                    send(&mut w, &resp).await
                }
                Reply::Started(None) | Reply::Nothing => {
                    send(
                        &mut w,
                        &Response::Error {
                            code: "internal".into(),
                            message: "the engine is not running".into(),
                        },
                    )
                    .await
                }
            }
        }
        CtlRequest::Mark { slot, good } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            shared.worker.submit(Job::Mark {
                slot,
                good,
                reply: tx,
            });
            let resp = match rx.await {
                Ok(Ok(message)) => Response::Message(message),
                Ok(Err(message)) => Response::Error {
                    code: "refused".into(),
                    message,
                },
                Err(_) => Response::Error {
                    code: "internal".into(),
                    message: "the engine stopped".into(),
                },
            };
            send(&mut w, &resp).await
        }
    }
}
