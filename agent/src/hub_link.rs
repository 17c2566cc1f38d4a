//! The hub link: heartbeats over gRPC carrying the outbox's unacknowledged events.
//!
//! [`run`] is its own task and never blocks anything else: it only reads the `state` and
//! `progress` watches (a watch sender never waits for its receivers) and the outbox, and a hub that
//! is down or slow only delays the next heartbeat.
//!
//! When a heartbeat is sent:
//! - at start, then every `heartbeat_interval` (±10 % jitter; the hub may override the interval);
//! - shortly after `state` changes its `seq` or phase (changes within [`COALESCE`] go in one
//!   heartbeat); other state changes (bytes written) count as progress;
//! - shortly after an event was pushed to the outbox (a refused command is one without any
//!   state change);
//! - on progress changes, at most every [`PROGRESS_MIN`];
//! - shortly after the flight state's `observed` changes (battery and the like ride along with
//!   the next heartbeat);
//! - soon again when the hub acknowledged events and more are waiting (batches of [`MAX_EVENTS`]);
//! - after a failure, with jittered exponential backoff from [`BACKOFF_MIN`] capped at the
//!   interval. A phase change still gets one immediate attempt.
//!
//! The hub acknowledges with the highest event seq it recorded durably; the link removes events up
//! to it — but never beyond the newest event it actually sent — from the outbox.
//!
//! Heartbeat `seq` comes from [`Outbox::next_heartbeat_seq`]: a per-run counter persisted in sled
//! in the high 32 bits, an in-memory counter in the low 32 bits — monotonic per state dir.
//!
//! `FirmwareState.booted_slot` is [`DeviceInfo::booted`] (reboot mode: read from the bootloader at
//! start; it cannot change without a reboot), or the active slot in command mode.

use crate::config::HubConfig;
use crate::flight::FlightState;
use crate::outbox::{Event, Outbox};
use crate::resources::Sampler;
use crate::state::{DeviceState, SlotRecord};
use flightnode_proto::SlotState;
use flightnode_proto::backoff;
use flightnode_proto::error::{Chain, chain};
use flightnode_proto::status::Progress;
use flightnode_proto::v1;
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Changes within this window go in one heartbeat.
pub const COALESCE: Duration = Duration::from_millis(50);
/// Progress alone triggers a heartbeat at most this often.
pub const PROGRESS_MIN: Duration = Duration::from_secs(5);
/// Delay before the next batch when acknowledged events leave more waiting.
pub const SOON: Duration = Duration::from_millis(200);
/// First retry delay after a failure; doubles up to the heartbeat interval.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Most events in one heartbeat.
pub const MAX_EVENTS: usize = 100;
/// Shortest heartbeat interval accepted from the config or the hub.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest heartbeat interval accepted from the hub.
const MAX_INTERVAL: Duration = Duration::from_hours(1);

/// Who is heartbeating.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Device id; must equal the identity in the client certificate when the hub checks it.
    pub device_id: String,
    /// Hardware id (`HeartbeatRequest.hardware_id`).
    pub hardware: String,
    /// Agent version.
    pub agent_version: String,
    /// Changes on every boot.
    pub boot_id: String,
    /// State dir: disk free space is reported for its filesystem.
    pub state_dir: PathBuf,
    /// Reboot mode: the slot this boot came from. `None` in command mode (booted = active).
    pub booted: Option<flightnode_proto::Slot>,
    /// The hub's command keys (`[commands] hub_keys`): the hub's signed time is trusted from them.
    pub hub_keys: Option<crate::bundle::TrustedKeys>,
    /// The trusted clock: fed the hub's time, its source reported in each heartbeat.
    pub clock: Option<crate::clock::Clock>,
}

/// TLS material: CA, client certificate, client key (PEM files).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificate(s) that sign the hub's certificate; required for `https://`.
    pub ca: Option<PathBuf>,
    /// Client certificate (the device identity); optional, but only together with `key`.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
}

/// Why the link could not be set up. Once running, the link only logs and retries.
#[derive(Debug, thiserror::Error)]
pub enum HubLinkError {
    /// The endpoint is not a valid `http://` or `https://` URL.
    #[error("hub endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// `https://` without a CA to check the hub against.
    #[error("hub endpoint {endpoint:?} uses https but no CA is configured (hub.ca or mqtt.ca)")]
    MissingCa {
        /// The configured endpoint.
        endpoint: String,
    },
    /// Only one of the client certificate and key is configured.
    #[error("hub TLS: client certificate and key must be configured together (cert: {cert:?}, key: {key:?})")]
    IncompleteIdentity {
        /// Client certificate, if set.
        cert: Option<PathBuf>,
        /// Client key, if set.
        key: Option<PathBuf>,
    },
    /// A TLS file could not be read.
    #[error("hub TLS: reading {what} {path}")]
    Read {
        /// `CA`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file could be read but is not what it should be.
    #[error("hub TLS: bad {what} {path}: {reason}")]
    BadPem {
        /// `CA`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The first resource sample, taken on a blocking thread, panicked.
    #[error("hub link: the first resource sample failed")]
    BlockingTask {
        /// The task's end.
        source: tokio::task::JoinError,
    },
    /// tonic rejected the TLS configuration.
    #[error("hub TLS for {endpoint:?}: {reason}")]
    Tls {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// Builds the (lazily connecting) channel to `cfg.endpoint`: rustls with the CA from `tls.ca` and
/// the client identity from `tls.cert`/`tls.key` for `https://`, plain for `http://`.
pub fn channel(cfg: &HubConfig, tls: &Tls) -> Result<Channel, HubLinkError> {
    let endpoint_err = |reason: String| HubLinkError::Endpoint {
        endpoint: cfg.endpoint.clone(),
        reason,
    };
    let https = if cfg.endpoint.starts_with("https://") {
        true
    } else if cfg.endpoint.starts_with("http://") {
        false
    } else {
        return Err(endpoint_err(
            "must start with https:// (or http:// for testing)".into(),
        ));
    };
    let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| endpoint_err(chain(&e)))?
        .connect_timeout(cfg.timeout)
        .timeout(cfg.timeout)
        .tcp_keepalive(Some(Duration::from_mins(1)))
        .tcp_nodelay(true);
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(endpoint_err("no host".into()));
    }
    if https {
        let ca_path = tls.ca.as_ref().ok_or_else(|| HubLinkError::MissingCa {
            endpoint: cfg.endpoint.clone(),
        })?;
        let ca = read_certs("CA", ca_path)?;
        let mut tls_config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .timeout(cfg.timeout);
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let cert = read_certs("client certificate", cert)?;
                let key = read_key(key)?;
                tls_config = tls_config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (cert, key) => {
                return Err(HubLinkError::IncompleteIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                });
            }
        }
        endpoint = endpoint.tls_config(tls_config).map_err(|e| HubLinkError::Tls {
            endpoint: cfg.endpoint.clone(),
            reason: chain(&e),
        })?;
    } else if tls.cert.is_some() || tls.key.is_some() {
        tracing::warn!(endpoint = %cfg.endpoint, "hub endpoint is plain http://: the client certificate is not used");
    }
    Ok(endpoint.connect_lazy())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, HubLinkError> {
    std::fs::read(path).map_err(|source| HubLinkError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM file and checks that it holds at least one certificate.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<u8>, HubLinkError> {
    let pem = read(what, path)?;
    let bad = |reason: String| HubLinkError::BadPem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(pem)
}

/// Reads a PEM file and checks that it holds a private key.
fn read_key(path: &Path) -> Result<Vec<u8>, HubLinkError> {
    let what = "client key";
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| HubLinkError::BadPem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(pem)
}

/// `Unavailable: tcp connect error: Connection refused (os error 111)`.
fn status_text(status: &tonic::Status) -> String {
    let mut s = format!("{:?}", status.code());
    if !status.message().is_empty() {
        s.push_str(": ");
        s.push_str(status.message());
    }
    if let Some(cause) = std::error::Error::source(status).map(chain)
        && !s.contains(&cause)
    {
        s.push_str(": ");
        s.push_str(&cause);
    }
    s
}

/// `d` scaled by a random factor in `[lo, hi]`.
fn jitter(d: Duration, lo: f64, hi: f64) -> Duration {
    d.mul_f64(rand::random_range(lo..=hi))
}

fn slot_state(s: SlotState) -> &'static str {
    match s {
        SlotState::Good => "good",
        SlotState::Bad => "bad",
        SlotState::Trial => "trial",
        SlotState::Empty => "empty",
    }
}

fn slot_info(r: &SlotRecord) -> v1::SlotInfo {
    v1::SlotInfo {
        version: r.version.as_ref().map(ToString::to_string).unwrap_or_default(),
        state: slot_state(r.state).to_owned(),
    }
}

fn event(e: Event) -> v1::Event {
    v1::Event {
        seq: e.seq,
        time_unix_ms: e.time_unix_ms,
        upgrade_id: e.upgrade_id,
        phase: e.phase,
        result: e.result,
        error_code: e.error_code,
        message: e.message,
    }
}

/// The heartbeat for `state` (contract strings throughout; empty = not set), with the running
/// image's (flights, airborne seconds) when a MAVLink link counts them.
pub fn heartbeat_request(
    info: &DeviceInfo,
    state: &DeviceState,
    progress: Option<Progress>,
    resources: v1::Resources,
    events: Vec<Event>,
    seq: u64,
    flown: Option<(u32, u64)>,
) -> v1::HeartbeatRequest {
    let firmware = v1::FirmwareState {
        active_slot: state.active.as_str().to_owned(),
        booted_slot: info.booted.unwrap_or(state.active).as_str().to_owned(),
        slot_a: Some(slot_info(&state.a)),
        slot_b: Some(slot_info(&state.b)),
        committed_version: state.committed_version.to_string(),
        security_floor: state.security_floor,
        flights: flown.map(|f| f.0),
        airborne_seconds: flown.map(|f| f.1),
    };
    let upgrade = state.upgrade.as_ref().map(|u| {
        let total = u.manifest.as_ref().map_or(0, |m| m.image.size);
        let (bytes, total) = match progress {
            Some(p) => (p.bytes, if p.total > 0 { p.total } else { total }),
            None => (u.written, total),
        };
        v1::CurrentUpgrade {
            upgrade_id: u.id.clone(),
            phase: u.phase.as_str().to_owned(),
            bytes,
            total,
            version: u.version().map(ToString::to_string).unwrap_or_default(),
            wait_reason: u.wait_reason().map(|r| r.as_str().to_owned()).unwrap_or_default(),
        }
    });
    let last_upgrade = state.last.as_ref().map(|l| v1::LastUpgrade {
        upgrade_id: l.upgrade_id.clone(),
        version: l.version.clone().unwrap_or_default(),
        result: l.result.as_str().to_owned(),
        error_code: l
            .error
            .as_ref()
            .map(|e| e.code.as_str().to_owned())
            .unwrap_or_default(),
        error_message: l.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
        finished_unix: i64::try_from(l.finished).unwrap_or(i64::MAX),
    });
    v1::HeartbeatRequest {
        device_id: info.device_id.clone(),
        boot_id: info.boot_id.clone(),
        agent_version: info.agent_version.clone(),
        hardware_id: info.hardware.clone(),
        firmware: Some(firmware),
        upgrade,
        last_upgrade,
        resources: Some(resources),
        seq,
        events: events.into_iter().map(event).collect(),
        flight: None,
        arm_lock: None,
        clock_source: String::new(),
    }
}

/// The heartbeat's `last_upgrade`: the state's last upgrade, or the newest refused command when
/// that came later. A refusal never becomes the state's `last` (it is no upgrade), yet it is the
/// answer to the command the hub is waiting on.
fn newest_end(last: Option<v1::LastUpgrade>, refusal: Option<&Event>) -> Option<v1::LastUpgrade> {
    let Some(r) = refusal else { return last };
    let refused_unix = r.time_unix_ms.div_euclid(1000);
    if last.as_ref().is_some_and(|l| l.finished_unix > refused_unix) {
        return last;
    }
    Some(v1::LastUpgrade {
        upgrade_id: r.upgrade_id.clone(),
        version: String::new(),
        result: r.result.clone(),
        error_code: r.error_code.clone(),
        error_message: r.message.clone(),
        finished_unix: refused_unix,
    })
}

/// The heartbeat's flight state.
pub fn flight_state(s: &FlightState) -> v1::FlightState {
    v1::FlightState {
        observed: s.observed.as_str().to_owned(),
        armed: s.armed,
        landed_state: s.landed_state.clone().unwrap_or_default(),
        battery_percent: s.battery_percent.map(u32::from),
        autopilot: s.autopilot.clone().unwrap_or_default(),
        system_status: s.system_status.clone().unwrap_or_default(),
        firmware_version: s.firmware_version.clone().unwrap_or_default(),
    }
}

async fn flight_changed(
    rx: &mut Option<watch::Receiver<FlightState>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// What a heartbeat carries from disk and the system, gathered by [`gather`].
#[derive(Default)]
struct Gathered {
    events: Vec<Event>,
    refusal: Option<Event>,
    resources: v1::Resources,
}

/// What a heartbeat carries from disk and the system: the waiting events and the newest refusal
/// (sled reads) and a resource sample (sysinfo reads /proc, statvfs), gathered on a blocking
/// thread. A failure sends the heartbeat without them.
async fn gather(outbox: &Outbox, sampler: &Arc<std::sync::Mutex<Sampler>>) -> Gathered {
    let outbox = outbox.clone();
    let sampler = Arc::clone(sampler);
    let task = tokio::task::spawn_blocking(move || {
        let events = outbox.pending(MAX_EVENTS).unwrap_or_else(|e| {
            tracing::warn!(error = %Chain(&e), "hub link: reading the outbox failed; heartbeat without events");
            Vec::new()
        });
        let refusal = outbox.last_refusal().unwrap_or_else(|e| {
            tracing::warn!(error = %Chain(&e), "hub link: reading the last refusal failed; heartbeat without it");
            None
        });
        let resources = sampler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sample();
        Gathered {
            events,
            refusal,
            resources,
        }
    });
    task.await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "hub link: gathering events and resources failed; heartbeat without them");
        Gathered::default()
    })
}

/// Removes the events up to `upto` the hub acknowledged (a sled flush), on a blocking thread;
/// returns how many went and the newest event still waiting.
async fn ack(outbox: &Outbox, upto: Option<u64>) -> (usize, Option<u64>) {
    let outbox = outbox.clone();
    let task = tokio::task::spawn_blocking(move || {
        let removed = match upto.map(|upto| (upto, outbox.ack(upto))) {
            None => 0,
            Some((_, Ok(n))) => n,
            Some((upto, Err(e))) => {
                tracing::warn!(error = %Chain(&e), upto, "hub link: removing acknowledged events failed");
                0
            }
        };
        (removed, outbox.last_seq().ok().flatten())
    });
    task.await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "hub link: removing acknowledged events failed");
        (0, None)
    })
}

/// Runs the link until `shutdown`. Returns an error only for a configuration that cannot work
/// (endpoint URL, TLS files); the hub being unreachable is logged and retried, never an error.
/// `connected` is true while the last heartbeat succeeded, and false on exit.
#[allow(
    clippy::too_many_arguments,
    reason = "the daemon hands over each shared handle once, at start"
)]
pub async fn run(
    cfg: HubConfig,
    tls: Tls,
    info: DeviceInfo,
    mut state: watch::Receiver<DeviceState>,
    mut progress: watch::Receiver<Option<Progress>>,
    outbox: Outbox,
    mut flight: Option<watch::Receiver<FlightState>>,
    flights: Option<watch::Receiver<crate::flight::log::FlightLog>>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), HubLinkError> {
    let mut client = HubServiceClient::new(channel(&cfg, &tls)?);
    let state_dir = info.state_dir.clone();
    // sysinfo reads /proc and /sys: not on the async threads.
    let sampler = tokio::task::spawn_blocking(move || Sampler::new(state_dir))
        .await
        .map_err(|source| HubLinkError::BlockingTask { source })?;
    let sampler = Arc::new(std::sync::Mutex::new(sampler));
    let set_connected = |value: bool| {
        connected.send_if_modified(|c| std::mem::replace(c, value) != value);
    };
    let mut interval = cfg.heartbeat_interval.max(MIN_INTERVAL);
    let mut due = Instant::now();
    let mut last_attempt: Option<Instant> = None;
    // (seq, phase) of the state in the last attempted heartbeat: a change of either is urgent.
    let mut sent_mark = None;
    let mut failures: u32 = 0;
    let (mut state_open, mut progress_open) = (true, true);
    let mut sent_observed = None;
    let mut pushed = outbox.pushed();
    let mut pushed_open = true;
    tracing::info!(endpoint = %cfg.endpoint, interval = ?interval, "hub link started");

    // Progress-like changes: due no earlier than PROGRESS_MIN after the last attempt.
    let throttled = |last_attempt: Option<Instant>| {
        let now = Instant::now();
        last_attempt.map_or(now, |t| t + PROGRESS_MIN).max(now + COALESCE)
    };

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = state.changed(), if state_open => match r {
                Ok(()) => {
                    let mark = {
                        let s = state.borrow();
                        (s.seq, s.phase())
                    };
                    due = due.min(if sent_mark == Some(mark) {
                        throttled(last_attempt)
                    } else {
                        Instant::now() + COALESCE
                    });
                }
                Err(_) => state_open = false,
            },
            r = pushed.changed(), if pushed_open => match r {
                Ok(()) => due = due.min(Instant::now() + COALESCE),
                Err(_) => pushed_open = false,
            },
            r = progress.changed(), if progress_open => match r {
                Ok(()) => due = due.min(throttled(last_attempt)),
                Err(_) => progress_open = false,
            },
            r = flight_changed(&mut flight) => match r {
                Ok(()) => {
                    let observed = flight.as_ref().map(|f| f.borrow().observed);
                    if observed != sent_observed {
                        due = due.min(Instant::now() + COALESCE);
                    }
                }
                Err(_) => flight = None,
            },
            () = tokio::time::sleep_until(due) => {
                let st = state.borrow_and_update().clone();
                let pr = *progress.borrow_and_update();
                sent_mark = Some((st.seq, st.phase()));
                last_attempt = Some(Instant::now());
                let Gathered { events, refusal, resources } = gather(&outbox, &sampler).await;
                let newest_sent = events.last().map(|e| e.seq);
                let n_events = events.len();
                let hb_seq = outbox.next_heartbeat_seq();
                let flown = flights
                    .as_ref()
                    .map(|log| log.borrow().of(&crate::flight::log::image_of(&st)));
                let mut req = heartbeat_request(&info, &st, pr, resources, events, hb_seq, flown);
                req.last_upgrade = newest_end(req.last_upgrade.take(), refusal.as_ref());
                let mut autopilot = None;
                if let Some(f) = flight.as_mut() {
                    let f = f.borrow_and_update().clone();
                    sent_observed = Some(f.observed);
                    req.flight = Some(flight_state(&f));
                    autopilot = f.firmware_version;
                }
                req.clock_source = info
                    .clock
                    .as_ref()
                    .map(|c| c.now().source.as_str().to_owned())
                    .unwrap_or_default();
                req.arm_lock = crate::flight::arm::lock_of(&st, autopilot.as_deref()).map(|l| v1::ArmLock {
                    reason: l.reason.as_str().to_owned(),
                    message: l.message,
                });

                let mut request = tonic::Request::new(req);
                request.set_timeout(cfg.timeout);
                let call = tokio::time::timeout(cfg.timeout + Duration::from_secs(1), client.heartbeat(request));
                let outcome = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    r = call => match r {
                        Ok(Ok(resp)) => Ok(resp.into_inner()),
                        Ok(Err(status)) => Err(status_text(&status)),
                        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
                    },
                };
                let now = Instant::now();
                match outcome {
                    Ok(resp) => {
                        if failures > 0 {
                            tracing::info!(endpoint = %cfg.endpoint, failures, "hub reachable again");
                        }
                        failures = 0;
                        set_connected(true);
                        let upto = newest_sent.map(|newest| resp.acked_seq.min(newest));
                        let (removed, newest_waiting) = ack(&outbox, upto).await;
                        tracing::debug!(seq = hb_seq, events = n_events, acked = resp.acked_seq, removed, "heartbeat sent");
                        if let (Some(time), Some(keys), Some(clock)) = (&resp.time, &info.hub_keys, &info.clock) {
                            if keys
                                .with_id(&time.key_id)
                                .any(|k| flightnode_proto::signed::time_verifies(time, &info.device_id, hb_seq, k))
                            {
                                clock.hub_time(time.unix_ms);
                            } else {
                                tracing::warn!(key_id = %time.key_id, seq = hb_seq,
                                    "the hub's time does not verify with a configured hub key; not trusted");
                            }
                        }
                        if resp.heartbeat_interval_seconds > 0 {
                            let want = Duration::from_secs(u64::from(resp.heartbeat_interval_seconds))
                                .clamp(MIN_INTERVAL, MAX_INTERVAL);
                            if want != interval {
                                tracing::info!(interval = ?want, "hub set the heartbeat interval");
                                interval = want;
                            }
                        }
                        // More to send: events never sent, or the hub is taking batches.
                        let unsent = match (newest_waiting, newest_sent) {
                            (Some(w), Some(s)) => w > s,
                            (Some(_), None) => true,
                            (None, _) => false,
                        };
                        due = if unsent || (removed > 0 && newest_waiting.is_some()) {
                            now + SOON
                        } else {
                            now + jitter(interval, 0.9, 1.1)
                        };
                    }
                    Err(reason) => {
                        failures = failures.saturating_add(1);
                        set_connected(false);
                        if failures == 1 {
                            tracing::warn!(endpoint = %cfg.endpoint, error = %reason, "heartbeat failed; retrying with backoff");
                        } else {
                            tracing::debug!(endpoint = %cfg.endpoint, error = %reason, failures, "heartbeat failed again");
                        }
                        let delay = backoff::exponential(BACKOFF_MIN, failures, interval);
                        due = now + backoff::equal_jitter(delay, rand::random());
                    }
                }
            }
        }
    }
    set_connected(false);
    tracing::info!("hub link stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::{ErrorCode, Phase};

    fn info() -> DeviceInfo {
        DeviceInfo {
            booted: None,
            device_id: "dev-1".into(),
            hardware: "hw".into(),
            agent_version: "0.1.0".into(),
            boot_id: "boot".into(),
            state_dir: PathBuf::from("/"),
            hub_keys: None,
            clock: None,
        }
    }

    fn cfg(endpoint: &str) -> HubConfig {
        HubConfig {
            endpoint: endpoint.into(),
            heartbeat_interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            ca: None,
            cert: None,
            key: None,
            outbox_cap: 10,
        }
    }

    #[test]
    fn maps_state_to_contract_strings() {
        let mut s = DeviceState::factory(semver::Version::new(1, 2, 3));
        let r = heartbeat_request(&info(), &s, None, v1::Resources::default(), vec![], 7, None);
        let fw = r.firmware.unwrap();
        assert_eq!(fw.active_slot, "a");
        assert_eq!(fw.slot_a.unwrap().state, "good");
        assert_eq!(fw.slot_b.clone().unwrap().state, "empty");
        assert_eq!(fw.slot_b.unwrap().version, "");
        assert_eq!(fw.committed_version, "1.2.3");
        assert_eq!(
            (fw.flights, fw.airborne_seconds),
            (None, None),
            "no link, no count"
        );
        assert!(r.upgrade.is_none() && r.last_upgrade.is_none());
        assert_eq!(r.seq, 7);
        let r = heartbeat_request(
            &info(),
            &s,
            None,
            v1::Resources::default(),
            vec![],
            7,
            Some((2, 95)),
        );
        let fw = r.firmware.unwrap();
        assert_eq!((fw.flights, fw.airborne_seconds), (Some(2), Some(95)));

        s.begin("up-1".into(), "src".into(), false);
        s.enter(Phase::RollingBack);
        let progress = Some(Progress { bytes: 5, total: 10 });
        let r = heartbeat_request(&info(), &s, progress, v1::Resources::default(), vec![], 8, None);
        let u = r.upgrade.unwrap();
        assert_eq!((u.phase.as_str(), u.bytes, u.total), ("rolling_back", 5, 10));

        s.fail(ErrorCode::HealthCheckFailed, "unhealthy".into());
        let event = Event::from_state(&s);
        let r = heartbeat_request(&info(), &s, None, v1::Resources::default(), vec![event], 9, None);
        let last = r.last_upgrade.unwrap();
        assert_eq!(last.error_code, "health_check_failed");
        assert_eq!(last.error_message, "unhealthy");
        assert_eq!(last.result, ErrorCode::HealthCheckFailed.result().as_str());
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].phase, "idle");
    }

    #[test]
    fn a_refusal_is_the_last_upgrade_until_an_upgrade_ends_after_it() {
        let mut s = DeviceState::factory(semver::Version::new(1, 2, 3));
        s.begin("up-1".into(), "src".into(), false);
        s.fail(ErrorCode::DownloadFailed, "gone".into());
        let finished = i64::try_from(s.last.as_ref().unwrap().finished).unwrap();
        let last =
            heartbeat_request(&info(), &s, None, v1::Resources::default(), vec![], 1, None).last_upgrade;
        let mut refusal = Event::refused("up-2", "busy", "up-1 is in flight");

        refusal.time_unix_ms = (finished + 5) * 1000;
        let got = newest_end(last.clone(), Some(&refusal)).unwrap();
        assert_eq!(
            (
                got.upgrade_id.as_str(),
                got.result.as_str(),
                got.error_code.as_str()
            ),
            ("up-2", "rejected", "busy")
        );
        assert_eq!(got.finished_unix, finished + 5);

        refusal.time_unix_ms = (finished - 5) * 1000;
        assert_eq!(
            newest_end(last.clone(), Some(&refusal)).unwrap().upgrade_id,
            "up-1"
        );
        assert_eq!(newest_end(last, None).unwrap().upgrade_id, "up-1");
        assert_eq!(newest_end(None, Some(&refusal)).unwrap().upgrade_id, "up-2");
    }

    #[tokio::test]
    async fn setup_errors_name_the_file_or_endpoint() {
        let e = channel(&cfg("ftp://hub"), &Tls::default()).unwrap_err();
        assert!(e.to_string().contains("ftp://hub"), "{e}");
        let e = channel(&cfg("https://hub:1"), &Tls::default()).unwrap_err();
        assert!(matches!(e, HubLinkError::MissingCa { .. }), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();
        let tls = Tls {
            ca: Some(junk.clone()),
            ..Tls::default()
        };
        let e = channel(&cfg("https://hub:1"), &tls).unwrap_err();
        assert!(
            e.to_string().contains("junk.pem") && e.to_string().contains("CA"),
            "{e}"
        );

        let missing = dir.path().join("missing.pem");
        let tls = Tls {
            ca: Some(missing),
            ..Tls::default()
        };
        let e = channel(&cfg("https://hub:1"), &tls).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");

        assert!(channel(&cfg("http://127.0.0.1:1"), &Tls::default()).is_ok());
    }
}
