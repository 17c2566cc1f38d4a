//! MQTT commands out, on `firmware/<id>/upgrade` (QoS 1, not retained): the controllers' long-lived
//! [`MqttPublisher`] behind [`CommandSink`], and [`publish`], one command that waits for the
//! broker's PUBACK (`flightnode-hub upgrade` / `cancel`).

use crate::{Error, Result};
use flightnode_proto::mqtt::{Command, upgrade_topic};
use futures_util::future::BoxFuture;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    let payload = cmd.to_json(Some(device_id));
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
    /// Sends `cmd` to `device_id` (QoS 1; queued once this returns).
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, Result<()>>;
}

/// One long-lived MQTT connection for the controllers (QoS 1, not retained). The event loop
/// runs in its own task and reconnects; a command queued while the broker is away goes out when
/// it is back, and the node reconciler re-publishes the same upgrade id when one was lost.
pub struct MqttPublisher {
    client: AsyncClient,
    url: String,
}

impl MqttPublisher {
    /// Connects (in the background) to `target`.
    pub fn start(target: &MqttTarget) -> Result<Self> {
        let options = mqtt_options(target)?;
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let url = target.url.clone();
        let log_url = url.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    tracing::warn!(url = %log_url, error = %flightnode_proto::error::Chain(&e), "controller MQTT connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(MqttPublisher { client, url })
    }
}

impl CommandSink for MqttPublisher {
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            flightnode_proto::device::validate_device_id(device_id).map_err(Error::Invalid)?;
            let payload = cmd.to_json(Some(device_id));
            self.client
                .publish(
                    upgrade_topic(device_id),
                    QoS::AtLeastOnce,
                    false,
                    payload.into_bytes(),
                )
                .await
                .map_err(|e| Error::Mqtt {
                    url: self.url.clone(),
                    source: e.into(),
                })?;
            tracing::info!(
                device_id,
                upgrade_id = cmd.upgrade_id(),
                "controller command queued"
            );
            Ok(())
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
