//! The embedded MQTT broker (`serve --embedded-broker`): rumqttd on one address, plain TCP, no
//! authentication — so a laptop or the demo runs the whole system with nothing installed. A fleet
//! uses a real broker (mosquitto with TLS and per-device ACLs; see `systemd/mosquitto.conf.example`).

use std::collections::HashMap;
use std::net::SocketAddr;

/// Starts the broker on its own threads; it runs until the process exits.
pub fn start(listen: SocketAddr) -> std::io::Result<()> {
    // Fail here, with the address in the message, rather than in the broker's thread.
    drop(std::net::TcpListener::bind(listen)?);
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Commands are capped at 16 KiB by the agent; status reports are small.
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-mqtt".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(%listen, "embedded MQTT broker stopped: {}", flightnode_proto::error::Chain(&e));
            }
        })?;
    tracing::warn!(%listen, "embedded MQTT broker listening: plain TCP, no authentication — for laptops and demos only");
    Ok(())
}
