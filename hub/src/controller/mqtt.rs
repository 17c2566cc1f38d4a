//! MQTT commands out, on `firmware/<id>/upgrade` (QoS 1, not retained): the controllers' long-lived
//! [`MqttPublisher`] behind [`CommandSink`], and [`publish`], one command that waits for the
//! broker's PUBACK (`flightnode-hub upgrade` / `cancel`).

use crate::{Error, Result};
use flightnode_proto::mqtt::{Command, upgrade_topic};
use futures_util::future::BoxFuture;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct MqttTarget {
    /// `mqtt://host:port` or `mqtts://host:port` (default ports 1883 / 8883).
    pub url: String,
    /// CA bundle (PEM) for `mqtts`.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
    /// MQTT client id.
    pub client_id: String,
    /// Give up after this long.
    pub timeout: Duration,
    /// Signs every command for its drone; `None` publishes unsigned commands.
    pub signer: Option<crate::signing::CommandSigner>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Parses `mqtt://host:port` / `mqtts://host:port` into (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16)> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(Error::Invalid(format!(
            "MQTT URL {url:?} must start with mqtt:// or mqtts://"
        )));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            let port = port
                .parse::<u16>()
                .map_err(|e| Error::Invalid(format!("MQTT URL {url:?}: port: {e}")))?;
            (
                host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
            )
        }
        _ => (rest.to_owned(), default_port),
    };
    if host.is_empty() {
        return Err(Error::Invalid(format!("MQTT URL {url:?} has no host")));
    }
    Ok((tls, host, port))
}

/// rumqttc options for `target`.
fn mqtt_options(target: &MqttTarget) -> Result<MqttOptions> {
    let (tls, host, port) = parse_url(&target.url)?;
    let mut options = MqttOptions::new(target.client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    if tls {
        let ca = match &target.ca {
            Some(ca) => read(ca)?,
            None => return Err(Error::Invalid("mqtts:// needs --mqtt-ca".into())),
        };
        let client_auth = match (&target.cert, &target.key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => return Err(Error::Invalid("--mqtt-cert and --mqtt-key go together".into())),
        };
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(options)
}

/// Publishes `cmd` for `device_id` and waits for the PUBACK.
pub async fn publish(target: &MqttTarget, device_id: &str, cmd: &Command) -> Result<()> {
    flightnode_proto::device::validate_device_id(device_id).map_err(Error::Invalid)?;
    let options = mqtt_options(target)?;
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let topic = upgrade_topic(device_id);
    let payload = crate::signing::payload(target.signer.as_ref(), device_id, cmd);
    let run = async {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.into_bytes())
            .await
            .map_err(|e| Error::Mqtt {
                url: target.url.clone(),
                source: e.into(),
            })?;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::Mqtt {
                        url: target.url.clone(),
                        source: e.into(),
                    });
                }
            }
        }
        let _ = client.disconnect().await;
        // Drive the loop until the DISCONNECT is out (bounded by the outer timeout).
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(target.timeout, run)
        .await
        .map_err(|_| Error::MqttTimeout {
            url: target.url.clone(),
            timeout: target.timeout,
        })??;
    tracing::info!(device_id, %topic, upgrade_id = cmd.upgrade_id(), "command published");
    Ok(())
}

/// Where the controllers send commands.
pub trait CommandSink: Send + Sync + 'static {
    /// Sends `cmd` to `device_id` (QoS 1). `Ok` means the broker has it (its PUBACK arrived);
    /// an error means it may not, and the caller sends it again.
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, Result<()>>;
}

/// One long-lived MQTT connection for the controllers (QoS 1, not retained). [`CommandSink::send`]
/// returns once the broker acknowledged the command: rumqttc's clean session drops what was
/// queued or in flight when the connection breaks (its new session clears them), so "queued" is
/// no delivery. It never waits for a broker that is away: without a connection a send fails at
/// once, and one that gets no PUBACK within the timeout fails and marks the connection stalled
/// until the broker answers again, so the reconcile loop is never held up by it.
///
/// PUBACKs are matched to sends by packet id: the event loop reports each outgoing publish's id
/// in the order the sends queued them. A new event loop is made for each connection, so nothing
/// of an old session is ever sent again under a new id.
pub struct MqttPublisher {
    url: String,
    timeout: Duration,
    signer: Option<crate::signing::CommandSigner>,
    shared: Arc<Mutex<Link>>,
}

/// The connection as the sends and the event loop task share it.
#[derive(Default)]
struct Link {
    /// The current connection's client, once the broker accepted it; `None` while away or
    /// stalled.
    client: Option<AsyncClient>,
    /// Sends queued on `client` whose packet id is not known yet, in queue order.
    queued: VecDeque<Waiter>,
    /// Sends by packet id, waiting for their PUBACK.
    in_flight: HashMap<u16, Waiter>,
}

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

impl Link {
    /// The connection is gone: every waiting send fails (it is sent again by its caller).
    fn fail_all(&mut self, why: &str) {
        self.client = None;
        for w in self
            .queued
            .drain(..)
            .chain(self.in_flight.drain().map(|(_, w)| w))
        {
            let _ = w.send(Err(why.to_owned()));
        }
    }
}

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MqttPublisher {
    /// Connects (in the background) to `target`.
    pub fn start(target: &MqttTarget) -> Result<Self> {
        let options = mqtt_options(target)?;
        let shared = Arc::new(Mutex::new(Link::default()));
        let link = Arc::clone(&shared);
        let url = target.url.clone();
        tokio::spawn(async move {
            loop {
                let (client, mut eventloop) = AsyncClient::new(options.clone(), 256);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            tracing::info!(%url, "controller MQTT connection up");
                            lock(&link).client = Some(client.clone());
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            let mut l = lock(&link);
                            if let Some(w) = l.queued.pop_front() {
                                l.in_flight.insert(pkid, w);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            let mut l = lock(&link);
                            if let Some(w) = l.in_flight.remove(&ack.pkid) {
                                let _ = w.send(Ok(()));
                            }
                            // An answer: a connection marked stalled is usable again.
                            if l.client.is_none() {
                                l.client = Some(client.clone());
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let why =
                                format!("connection to {url} lost: {}", flightnode_proto::error::Chain(&e));
                            tracing::warn!(%url, error = %flightnode_proto::error::Chain(&e), "controller MQTT connection lost; reconnecting");
                            lock(&link).fail_all(&why);
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(MqttPublisher {
            url: target.url.clone(),
            timeout: target.timeout,
            signer: target.signer.clone(),
            shared,
        })
    }

    /// Waits up to `timeout` until the broker has accepted the connection; false if it has not.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while lock(&self.shared).client.is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    fn error(&self, why: impl Into<String>) -> Error {
        Error::Mqtt {
            url: self.url.clone(),
            source: why.into().into(),
        }
    }
}

impl CommandSink for MqttPublisher {
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            flightnode_proto::device::validate_device_id(device_id).map_err(Error::Invalid)?;
            let payload = crate::signing::payload(self.signer.as_ref(), device_id, cmd);
            let (tx, rx) = oneshot::channel();
            {
                // NB: queued under the lock, so the queue order is the order the event loop
                // sees the publishes in.
                let mut l = lock(&self.shared);
                let Some(client) = l.client.clone() else {
                    return Err(self.error("not connected to the broker (or it stopped answering)"));
                };
                client
                    .try_publish(
                        upgrade_topic(device_id),
                        QoS::AtLeastOnce,
                        false,
                        payload.into_bytes(),
                    )
                    .map_err(|e| self.error(format!("cannot queue the command: {e}")))?;
                l.queued.push_back(tx);
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(Ok(()))) => {
                    tracing::info!(
                        device_id,
                        upgrade_id = cmd.upgrade_id(),
                        "controller command acknowledged by the broker"
                    );
                    Ok(())
                }
                Ok(Ok(Err(why))) => Err(self.error(why)),
                Ok(Err(_)) => Err(self.error("the connection went away before the PUBACK")),
                Err(_) => {
                    // Stalled: later sends fail at once until the broker answers again.
                    lock(&self.shared).client = None;
                    Err(Error::MqttTimeout {
                        url: self.url.clone(),
                        timeout: self.timeout,
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() -> Result<()> {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884")?,
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(parse_url("mqtts://broker")?, (true, "broker".into(), 8883));
        assert!(parse_url("http://x").is_err());
        Ok(())
    }
}
