//! Shared test helpers: heartbeats, a scripted in-memory sink, hub construction.
#![allow(dead_code, reason = "each test binary uses a different part of it")]

pub mod cluster;

/// Connects an MQTT client with `options`, subscribes it to `topic` (QoS 1) and hands every
/// message it receives to `on_publish`; returns once the broker acknowledged the subscription.
/// The returned task runs the connection: aborting it drops the link without a word.
pub async fn subscribe(
    options: rumqttc::MqttOptions,
    topic: &str,
    mut on_publish: impl FnMut(rumqttc::Publish) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await?;
    let (subscribed, suback) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => on_publish(p),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), suback).await??;
    Ok(task)
}

use flightnode_hub::heartbeat::hub::{Hub, HubConfig};
use flightnode_hub::heartbeat::scheduler::SchedulerConfig;
use flightnode_hub::heartbeat::session::{SessionConfig, SpecCache};
use flightnode_hub::store::sink::{StatusSink, WriteError, WriteRequest};
use flightnode_proto::v1;
use futures_util::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A heartbeat of an idle drone on `version`.
pub fn heartbeat(device: &str, version: &str) -> v1::HeartbeatRequest {
    flightnode_proto::sample::idle_heartbeat(device, version)
}

/// Sets the upgrade phase (snake_case) and adds an event for it.
pub fn with_phase(mut hb: v1::HeartbeatRequest, phase: &str, event_seq: u64) -> v1::HeartbeatRequest {
    hb.upgrade = Some(v1::CurrentUpgrade {
        upgrade_id: "up-1".into(),
        phase: phase.into(),
        bytes: 0,
        total: 0,
        version: "2.0.0".into(),
        wait_reason: String::new(),
    });
    hb.events.push(v1::Event {
        seq: event_seq,
        time_unix_ms: 1_700_000_000_000,
        upgrade_id: "up-1".into(),
        phase: phase.into(),
        ..Default::default()
    });
    hb
}

/// One write the sink saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub req: WriteRequest,
    pub answered_ok: bool,
}

/// An in-memory sink answering from a script (then Ok), recording every call.
#[derive(Default)]
pub struct ScriptedSink {
    pub script: Mutex<VecDeque<Result<(), WriteError>>>,
    pub seen: Mutex<Vec<Seen>>,
    pub stores_events: bool,
}

impl ScriptedSink {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn ok_writes(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.answered_ok).collect()
    }
    pub fn push(&self, r: Result<(), WriteError>) {
        self.script.lock().unwrap().push_back(r);
    }
}

impl StatusSink for ScriptedSink {
    fn write_status<'a>(&'a self, req: &'a WriteRequest) -> BoxFuture<'a, Result<(), WriteError>> {
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Ok(()));
        self.seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            req: req.clone(),
            answered_ok: answer.is_ok(),
        });
        Box::pin(async move { answer })
    }
    fn create<'a>(&'a self, _name: &'a str, _hw: &'a str) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async { Ok(()) })
    }
    fn kind(&self) -> &'static str {
        "scripted"
    }
}

pub fn config(qps: f64, burst: u32) -> HubConfig {
    HubConfig {
        session: SessionConfig {
            refresh: Duration::from_mins(1),
            grace: Duration::from_secs(35),
            sink_stores_events: false,
        },
        scheduler: SchedulerConfig {
            qps,
            burst,
            ..SchedulerConfig::default()
        },
        ack_wait: Duration::from_secs(2),
        advertise_interval_secs: 0,
        signer: None,
    }
}

pub fn hub_with(sink: Arc<dyn StatusSink>, config: HubConfig) -> Arc<Hub> {
    let hub = Hub::new(config, sink, None, Arc::new(SpecCache::default()));
    hub.start();
    hub
}

/// Lets spawned tasks run without moving the (paused) clock.
pub async fn settle() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// The status of a condition type in a status.
pub fn cond(status: &flightnode_hub::api::flightnode::FlightNodeStatus, type_: &str) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| format!("{}/{}", c.status, c.reason))
        .unwrap_or_default()
}
