//! The MQTT link: commands in on `firmware/<id>/upgrade`, reports out on `firmware/<id>/status`.
//!
//! [`run`] owns one MQTT 3.1.1 connection (rumqttc) and keeps it up until `shutdown`:
//!
//! - client id = device id, **clean session off**: QoS 1 commands published while the drone was
//!   offline are delivered when it reconnects (as long as the broker kept the session);
//! - the upgrade topic is subscribed (QoS 1) again after every `ConnAck` (rumqttc does not
//!   resubscribe, and a broker that lost its state answers `session_present = false`);
//! - `mqtts://` uses rustls with the ring provider and only the configured CA (`mqtt.ca`, which may
//!   be a bundle such as `/etc/ssl/certs/ca-certificates.crt`); `cert` + `key` add mutual TLS;
//! - failed attempts are retried with jittered exponential backoff (200 ms, doubling, capped at
//!   `max_backoff`); each failure is logged once;
//! - every publish on the upgrade topic is parsed with [`parse_envelope`] and sent on `inbound` as
//!   [`Inbound::Command`] or [`Inbound::Malformed`] (with the upgrade id the payload still names,
//!   so the refusal is reported against it). Packets up to [`MAX_INCOMING_PACKET`] are read
//!   (so oversized commands are refused by the parser, not by the transport). A packet above that
//!   makes rumqttc drop the connection; the link then reports it as malformed and reconnects once
//!   with a clean session so the broker forgets the poison message instead of redelivering it for
//!   ever (commands queued for the device at that moment are lost with it);
//! - status reports are published QoS 1, retained, one at a time (the next after the previous one
//!   was acknowledged). While offline they wait in a backlog of [`STATUS_BACKLOG`] reports; when
//!   it is full the oldest progress report (no `result`, no `error`) is dropped first. The report
//!   in flight at a disconnect is sent again after the reconnect if the broker lost the session;
//! - `connected` is `true` once the broker acknowledged the connection and the subscription, and
//!   `false` from the moment the connection is lost.

use crate::config::MqttConfig;
use flightnode_proto::backoff;
use flightnode_proto::mqtt::{
    Envelope, StatusMessage, named_upgrade_id, parse_envelope, status_topic, upgrade_topic,
};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, StateError,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Largest MQTT packet read from the broker; bigger ones cost a reconnect (see the module docs).
pub const MAX_INCOMING_PACKET: usize = 256 * 1024;
/// Largest MQTT packet sent (a status report is well below 4 KiB).
pub const MAX_OUTGOING_PACKET: usize = 64 * 1024;
/// Status reports kept while the broker is unreachable.
pub const STATUS_BACKLOG: usize = 64;
/// Commands kept for the daemon while it is not reading `inbound`.
pub const INBOUND_BACKLOG: usize = 64;
/// First reconnect delay.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// A connection that lasted this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How long `shutdown` waits for queued reports to be acknowledged and for the DISCONNECT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What arrived on the upgrade topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A well-formed command, with the hub's signature if it carried one (checked by the
    /// daemon's [`crate::daemon::authority`]).
    Command(Envelope),
    /// A payload that is not a command.
    Malformed {
        /// Why.
        reason: String,
        /// The upgrade id the payload still names, if any ([`named_upgrade_id`]).
        upgrade_id: Option<String>,
    },
}

/// Why the link cannot start. Once running, [`run`] only returns at `shutdown`.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `mqtt.url` is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("mqtt.url {url:?}: {reason}")]
    Url {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The device id cannot be an MQTT client id.
    #[error("device id {0:?} cannot be used as MQTT client id and topic segment")]
    DeviceId(String),
    /// A CA, certificate or key file cannot be read or holds nothing usable.
    #[error("mqtt TLS file {path}: {reason}")]
    TlsFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings do not make a valid rustls client configuration.
    #[error("mqtt TLS setup: {0}")]
    Tls(String),
    /// Settings that do not go together.
    #[error("mqtt settings: {0}")]
    Settings(String),
}

/// Broker address from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Endpoint, MqttError> {
    let bad = |reason: &str| MqttError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "only host and port are allowed (credentials go in mqtt.username/password)",
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("port must be 1 to 65535"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() || host.contains([':', '[', ']']) || host.contains(char::is_whitespace) {
        return Err(bad("needs a host name or IPv4 address"));
    }
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        tls,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|e| MqttError::TlsFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// rustls client config: ring provider, only the configured CA(s), optional client identity.
fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let file_err = |path: &Path, reason: String| MqttError::TlsFile {
        path: path.display().to_string(),
        reason,
    };
    let ca_path = cfg
        .ca
        .as_deref()
        .ok_or_else(|| MqttError::Tls("mqtts:// needs mqtt.ca (the broker's CA, PEM)".into()))?;
    let ca_pem = read_file(ca_path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| file_err(ca_path, format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| file_err(ca_path, format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(file_err(ca_path, "no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&cfg.cert, &cfg.key) {
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = read_file(cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(cert_path, format!("bad PEM: {e}")))?;
            if chain.is_empty() {
                return Err(file_err(cert_path, "no certificate in it".into()));
            }
            let key_pem = read_file(key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| file_err(key_path, format!("no usable private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| MqttError::Tls(format!("client certificate and key: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(MqttError::Settings("mqtt.cert and mqtt.key go together".into())),
    }
}

fn mqtt_options(cfg: &MqttConfig, device_id: &str) -> Result<MqttOptions, MqttError> {
    if device_id.is_empty()
        || device_id.len() > 64
        || device_id.contains(['+', '#', '/'])
        || device_id.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(MqttError::DeviceId(device_id.to_owned()));
    }
    let ep = parse_url(&cfg.url)?;
    let mut opts = MqttOptions::new(device_id, ep.host, ep.port);
    // rumqttc refuses keep-alives below a second; 0 disables keep-alive, which we never want.
    opts.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)));
    opts.set_clean_session(false);
    opts.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    // We publish one report at a time; a small request channel is plenty (always `try_*`).
    opts.set_inflight(16);
    if let Some(user) = &cfg.username {
        opts.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    } else if cfg.password.is_some() {
        return Err(MqttError::Settings("mqtt.password without mqtt.username".into()));
    }
    if ep.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(
            tls_config(cfg)?,
        ))));
    } else if cfg.cert.is_some() || cfg.key.is_some() {
        warn!(url = %cfg.url, "mqtt.cert/mqtt.key are ignored for a plain mqtt:// URL");
    }
    Ok(opts)
}

/// Reconnect delay before attempt `n` (1-based): 200 ms doubling up to `max`, "equal jitter".
fn backoff_delay(max: Duration, n: u32) -> Duration {
    let d = backoff::exponential(INITIAL_BACKOFF, n, max.max(INITIAL_BACKOFF));
    backoff::equal_jitter(d, rand::random())
}

/// What the connection task tells the link.
#[derive(Debug)]
enum LinkEvent {
    ConnAck {
        session_present: bool,
    },
    Mqtt(Event),
    /// The connection is down (or never came up); the driver is backing off.
    Down,
    /// A packet above [`MAX_INCOMING_PACKET`] arrived and cost the connection.
    Oversize(usize),
}

fn oversize(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// Polls the event loop for ever: reconnects with backoff, purges a poisoned session.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<LinkEvent>,
    device_id: String,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut up_since: Option<Instant> = None;
    let mut purging = false;
    loop {
        let event = eventloop.poll().await;
        let forward = match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                if purging {
                    // This clean session made the broker drop the poisoned one; now go back to
                    // a persistent session right away.
                    info!(%device_id, "mqtt: dropped the session holding an oversized message");
                    purging = false;
                    eventloop.mqtt_options.set_clean_session(false);
                    eventloop.clean();
                    continue;
                }
                up_since = Some(Instant::now());
                LinkEvent::ConnAck {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                // Only sent by the link at shutdown.
                let _ = events
                    .send(LinkEvent::Mqtt(Event::Outgoing(Outgoing::Disconnect)))
                    .await;
                return;
            }
            Ok(ev) => LinkEvent::Mqtt(ev),
            Err(e) => {
                if shutdown.is_cancelled() {
                    return;
                }
                if up_since.is_some_and(|t| t.elapsed() >= STABLE_CONNECTION) {
                    failures = 0;
                }
                up_since = None;
                failures = failures.saturating_add(1);
                let retry_in = backoff_delay(max_backoff, failures);
                if let Some(n) = oversize(&e) {
                    warn!(%device_id, bytes = n, limit = MAX_INCOMING_PACKET,
                        "mqtt: broker sent an oversized packet; reconnecting with a clean session to discard it");
                    purging = true;
                    eventloop.mqtt_options.set_clean_session(true);
                    if events.send(LinkEvent::Oversize(n)).await.is_err() {
                        return;
                    }
                } else {
                    warn!(%device_id, attempt = failures, retry_in = ?retry_in, error = %e,
                        "mqtt: connection failed");
                }
                if events.send(LinkEvent::Down).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(retry_in) => {}
                }
                continue;
            }
        };
        if events.send(forward).await.is_err() {
            return;
        }
    }
}

/// The report being published, and its packet id once rumqttc assigned one.
struct InFlight {
    msg: StatusMessage,
    pkid: Option<u16>,
}

struct Link {
    device_id: String,
    upgrade_topic: String,
    status_topic: String,
    client: AsyncClient,
    connected: watch::Sender<bool>,
    /// Broker answered ConnAck (the subscription may still be pending).
    session_up: bool,
    backlog: VecDeque<StatusMessage>,
    in_flight: Option<InFlight>,
    to_daemon: VecDeque<Inbound>,
}

impl Link {
    fn set_connected(&self, up: bool) {
        self.connected.send_if_modified(|v| {
            let changed = *v != up;
            *v = up;
            changed
        });
    }

    fn queue_status(&mut self, msg: StatusMessage) {
        if self.backlog.len() >= STATUS_BACKLOG {
            let victim = self
                .backlog
                .iter()
                .position(|m| m.result.is_none() && m.error.is_none())
                .unwrap_or(0);
            if let Some(dropped) = self.backlog.remove(victim) {
                debug!(device_id = %self.device_id, seq = dropped.seq, "mqtt: status backlog full, dropped a report");
            }
        }
        self.backlog.push_back(msg);
    }

    fn queue_inbound(&mut self, item: Inbound) {
        if self.to_daemon.len() >= INBOUND_BACKLOG {
            let victim = self
                .to_daemon
                .iter()
                .position(|i| matches!(i, Inbound::Malformed { .. }))
                .unwrap_or(0);
            self.to_daemon.remove(victim);
            warn!(device_id = %self.device_id, "mqtt: daemon is not reading commands; dropped one");
        }
        self.to_daemon.push_back(item);
    }

    /// Hands the next report to rumqttc when connected and nothing is awaiting its PubAck.
    fn pump_status(&mut self) {
        if !self.session_up || self.in_flight.is_some() {
            return;
        }
        let Some(msg) = self.backlog.pop_front() else {
            return;
        };
        self.publish(InFlight { msg, pkid: None });
    }

    fn publish(&mut self, mut flight: InFlight) {
        let payload = match serde_json::to_vec(&flight.msg) {
            Ok(p) => p,
            Err(e) => {
                error!(device_id = %self.device_id, error = %e, "mqtt: cannot serialise a status report");
                return;
            }
        };
        flight.pkid = None;
        match self
            .client
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, payload)
        {
            Ok(()) => self.in_flight = Some(flight),
            Err(e) => {
                // Request channel full or closed: keep the report, retry on the next event.
                debug!(device_id = %self.device_id, error = %e, "mqtt: publish request deferred");
                self.backlog.push_front(flight.msg);
            }
        }
    }

    fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::ConnAck { session_present } => {
                info!(device_id = %self.device_id, session_present, "mqtt: connected");
                self.session_up = true;
                if let Err(e) = self.client.try_subscribe(&self.upgrade_topic, QoS::AtLeastOnce) {
                    warn!(device_id = %self.device_id, error = %e, "mqtt: cannot request the subscription");
                }
                if !session_present {
                    // rumqttc dropped its unacknowledged publishes with the old session.
                    if let Some(flight) = self.in_flight.take() {
                        self.publish(flight);
                    }
                }
                self.pump_status();
            }
            LinkEvent::Down => {
                self.session_up = false;
                self.set_connected(false);
            }
            LinkEvent::Oversize(n) => self.queue_inbound(Inbound::Malformed {
                reason: format!(
                    "payload of about {n} bytes is over the {MAX_INCOMING_PACKET}-byte MQTT packet limit"
                ),
                upgrade_id: None,
            }),
            LinkEvent::Mqtt(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    debug!(device_id = %self.device_id, topic = %self.upgrade_topic, "mqtt: subscribed");
                    self.set_connected(true);
                } else {
                    error!(device_id = %self.device_id, topic = %self.upgrade_topic,
                        "mqtt: the broker refused the subscription (check its ACL); no commands can arrive");
                }
            }
            LinkEvent::Mqtt(Event::Incoming(Incoming::Publish(p))) => {
                if p.topic != self.upgrade_topic {
                    debug!(device_id = %self.device_id, topic = %p.topic, "mqtt: ignoring a publish on another topic");
                    return;
                }
                let item = match parse_envelope(&p.payload, &self.device_id) {
                    Ok(cmd) => Inbound::Command(cmd),
                    Err(m) => Inbound::Malformed {
                        reason: m.0,
                        upgrade_id: named_upgrade_id(&p.payload),
                    },
                };
                self.queue_inbound(item);
            }
            LinkEvent::Mqtt(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(f) = self.in_flight.as_mut() {
                    f.pkid = Some(pkid);
                }
            }
            LinkEvent::Mqtt(Event::Incoming(Incoming::PubAck(ack))) => {
                if self.in_flight.as_ref().is_some_and(|f| f.pkid == Some(ack.pkid)) {
                    self.in_flight = None;
                    self.pump_status();
                }
            }
            LinkEvent::Mqtt(_) => {}
        }
        // A deferred publish (request channel was full) gets another chance on every event.
        self.pump_status();
    }

    fn drained(&self) -> bool {
        self.in_flight.is_none() && self.backlog.is_empty()
    }
}

/// Runs the link until `shutdown`; returns an error only for unusable settings, before connecting.
///
/// Never blocks on `inbound`: commands wait in a small queue while the daemon is busy. The event
/// loop is polled all the time, also while nobody reads `inbound` or writes `outbound`.
pub async fn run(
    cfg: MqttConfig,
    device_id: String,
    inbound: mpsc::Sender<Inbound>,
    mut outbound: mpsc::Receiver<StatusMessage>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<(), MqttError> {
    let opts = mqtt_options(&cfg, &device_id)?;
    connected.send_replace(false);
    let (client, eventloop) = AsyncClient::new(opts, 16);
    let (events_tx, mut events) = mpsc::channel(64);
    let driver_stop = CancellationToken::new();
    let mut driver = tokio::spawn(drive(
        eventloop,
        events_tx,
        device_id.clone(),
        cfg.max_backoff,
        driver_stop.clone(),
    ));
    info!(%device_id, url = %cfg.url, "mqtt: link started");

    let mut link = Link {
        upgrade_topic: upgrade_topic(&device_id),
        status_topic: status_topic(&device_id),
        device_id,
        client,
        connected,
        session_up: false,
        backlog: VecDeque::new(),
        in_flight: None,
        to_daemon: VecDeque::new(),
    };
    let mut outbound_open = true;
    let mut inbound_open = true;

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            ev = events.recv() => if let Some(ev) = ev { link.on_event(ev) } else {
                // The driver never ends before shutdown; if it did, stop instead of spinning.
                error!(device_id = %link.device_id, "mqtt: connection task ended unexpectedly");
                break;
            },
            msg = outbound.recv(), if outbound_open => match msg {
                Some(msg) => {
                    link.queue_status(msg);
                    link.pump_status();
                }
                None => outbound_open = false,
            },
            permit = inbound.reserve(), if inbound_open && !link.to_daemon.is_empty() => if let Ok(permit) = permit {
                if let Some(item) = link.to_daemon.pop_front() {
                    permit.send(item);
                }
            } else {
                warn!(device_id = %link.device_id, "mqtt: nobody receives commands any more");
                inbound_open = false;
                link.to_daemon.clear();
            },
        }
        if !inbound_open {
            link.to_daemon.clear();
        }
    }

    // Shutdown: take what is still queued, give the broker a moment to acknowledge it, disconnect.
    while let Ok(msg) = outbound.try_recv() {
        link.queue_status(msg);
    }
    link.pump_status();
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    if link.session_up {
        while !link.drained() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => link.on_event(ev),
                _ => break,
            }
        }
    }
    if !link.drained() {
        warn!(device_id = %link.device_id, unsent = link.backlog.len() + usize::from(link.in_flight.is_some()),
            "mqtt: shutting down with status reports not acknowledged by the broker");
    }
    link.set_connected(false);
    driver_stop.cancel();
    if link.session_up && link.client.try_disconnect().is_ok() {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
            if matches!(ev, LinkEvent::Mqtt(Event::Outgoing(Outgoing::Disconnect))) {
                break;
            }
        }
    }
    drop(events);
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut driver).await.is_err() {
        driver.abort();
    }
    info!(device_id = %link.device_id, "mqtt: link stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ep = parse_url("mqtt://broker.local").unwrap();
        assert_eq!((ep.host.as_str(), ep.port, ep.tls), ("broker.local", 1883, false));
        let ep = parse_url("mqtts://10.0.0.1/").unwrap();
        assert_eq!((ep.host.as_str(), ep.port, ep.tls), ("10.0.0.1", 8883, true));
        let ep = parse_url("mqtts://h:1234").unwrap();
        assert_eq!(ep.port, 1234);
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/topic",
            "mqtt://[::1]:1883",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let max = Duration::from_secs(5);
        for n in 1..40 {
            let full = INITIAL_BACKOFF.saturating_mul(1 << (n - 1).min(20)).min(max);
            let d = backoff_delay(max, n);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
        assert!(backoff_delay(Duration::ZERO, 3) >= INITIAL_BACKOFF / 2);
    }

    #[test]
    fn backlog_drops_oldest_progress_first() {
        use flightnode_proto::codes::UpgradeResult;
        let (client, _el) = AsyncClient::new(MqttOptions::new("d", "localhost", 1883), 4);
        let (tx, _rx) = watch::channel(false);
        let mut link = Link {
            device_id: "d".into(),
            upgrade_topic: upgrade_topic("d"),
            status_topic: status_topic("d"),
            client,
            connected: tx,
            session_up: false,
            backlog: VecDeque::new(),
            in_flight: None,
            to_daemon: VecDeque::new(),
        };
        let sample: StatusMessage = serde_json::from_value(serde_json::json!({
            "device_id": "d", "seq": 0, "timestamp": 0, "upgrade_id": "u", "phase": "idle",
            "progress": null, "result": null, "error": null,
            "running": {"version": "1.0.0", "slot": "a"}
        }))
        .unwrap();
        let mut final_msg = sample.clone();
        final_msg.seq = 1;
        final_msg.result = Some(UpgradeResult::Committed);
        link.queue_status(final_msg);
        for seq in 2..(STATUS_BACKLOG as u64 + 10) {
            let mut m = sample.clone();
            m.seq = seq;
            link.queue_status(m);
        }
        assert_eq!(link.backlog.len(), STATUS_BACKLOG);
        assert_eq!(link.backlog[0].seq, 1, "the final report survives");
        assert_eq!(link.backlog.back().unwrap().seq, STATUS_BACKLOG as u64 + 9);
    }
}
