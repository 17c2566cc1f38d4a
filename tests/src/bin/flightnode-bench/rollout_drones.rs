//! `rollout`'s simulated drones: no agent processes, only what a drone shows the hub from outside.
//! Each heartbeats over gRPC (the load generator's channels and heartbeats), and one MQTT client
//! subscribed to `firmware/+/upgrade` stands in for every drone's subscription: an upgrade
//! command is answered at once by its drone with a heartbeat reporting the new version committed.

use anyhow::{Context, Result, bail};
use flightnode_proto::mqtt::{Command, parse_command};
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use flightnode_proto::v1::{self, HeartbeatRequest};
use flightnode_tests::load;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// One upgrade command as a simulated drone received it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// Index of the drone ([`load::drone_id`]).
    pub(crate) drone: usize,
    /// Its upgrade id.
    pub(crate) upgrade_id: String,
    /// When the MQTT client had it.
    pub(crate) at: Instant,
}

/// What the simulated fleet saw and sent.
#[derive(Default)]
pub(crate) struct Tally {
    /// Every upgrade command, in arrival order.
    pub(crate) upgrades: Mutex<Vec<Received>>,
    /// Cancel commands received.
    pub(crate) cancels: AtomicU64,
    /// Payloads on the topic that are no command, or for a drone that is not simulated.
    pub(crate) foreign: AtomicU64,
    /// Heartbeats answered OK.
    pub(crate) heartbeats: AtomicU64,
    /// Heartbeats answered with an error.
    pub(crate) errors: AtomicU64,
}

/// N simulated drones and their MQTT subscription; stopped on drop.
pub(crate) struct Fleet {
    /// What they saw.
    pub(crate) tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// Subscribes to `firmware/+/upgrade` on `broker_port` (returns once the broker acknowledged
    /// the subscription), then starts `n` drones on `version`, heartbeating every `interval`
    /// through `clients`, their first heartbeats spread evenly over `interval`.
    pub(crate) async fn start(
        broker_port: u16,
        clients: &[HubServiceClient<Channel>],
        n: usize,
        version: &str,
        interval: Duration,
    ) -> Result<Fleet> {
        let tally = Arc::new(Tally::default());
        let mut senders = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n + 1);
        let start = tokio::time::Instant::now();
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let drone = Drone {
                index: i,
                version: version.to_owned(),
                last: None,
                pending: Vec::new(),
                seq: 0,
                event_seq: 0,
            };
            let client = clients[i % clients.len()].clone();
            let first = start + interval.mul_f64(i as f64 / n.max(1) as f64);
            tasks.push(tokio::spawn(drone.run(
                client,
                rx,
                first,
                interval,
                Arc::clone(&tally),
            )));
        }
        let mqtt = subscribe(broker_port, senders, Arc::clone(&tally)).await?;
        tasks.push(mqtt);
        Ok(Fleet { tally, tasks })
    }
}

/// An upgrade for drone `drone`'s task.
struct Upgrade {
    id: String,
    version: String,
}

/// One simulated drone's state.
struct Drone {
    index: usize,
    version: String,
    last: Option<v1::LastUpgrade>,
    /// Events not yet acknowledged by the hub (sent again with every heartbeat, as the agent does).
    pending: Vec<v1::Event>,
    seq: u64,
    event_seq: u64,
}

impl Drone {
    async fn run(
        mut self,
        mut client: HubServiceClient<Channel>,
        mut commands: mpsc::UnboundedReceiver<Upgrade>,
        first: tokio::time::Instant,
        interval: Duration,
        tally: Arc<Tally>,
    ) {
        let mut next = first;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {
                    let jitter = rand::random_range(0.95..1.05);
                    next += interval.mul_f64(jitter);
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.commit(&cmd);
                }
            }
            let hb = self.heartbeat();
            match client.heartbeat(hb).await {
                Ok(resp) => {
                    tally.heartbeats.fetch_add(1, Ordering::Relaxed);
                    let acked = resp.into_inner().acked_seq;
                    self.pending.retain(|e| e.seq > acked);
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Installs and commits `cmd` at once (a redelivery of the committed id changes nothing).
    fn commit(&mut self, cmd: &Upgrade) {
        if self.last.as_ref().is_some_and(|l| l.upgrade_id == cmd.id) {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.version.clone_from(&cmd.version);
        self.last = Some(v1::LastUpgrade {
            upgrade_id: cmd.id.clone(),
            version: cmd.version.clone(),
            result: "committed".into(),
            finished_unix: now.as_secs().cast_signed(),
            ..Default::default()
        });
        self.event_seq += 1;
        self.pending.push(v1::Event {
            seq: self.event_seq,
            time_unix_ms: i64::try_from(now.as_millis()).unwrap_or(i64::MAX),
            upgrade_id: cmd.id.clone(),
            phase: "idle".into(),
            result: "committed".into(),
            ..Default::default()
        });
    }

    fn heartbeat(&mut self) -> HeartbeatRequest {
        self.seq += 1;
        let mut hb = load::idle_heartbeat(self.index, &self.version, self.seq);
        hb.last_upgrade.clone_from(&self.last);
        hb.events.clone_from(&self.pending);
        hb
    }
}

/// The index of a simulated drone's upgrade topic, `firmware/sim-<i>/upgrade`.
fn drone_of(topic: &str) -> Option<usize> {
    topic
        .strip_prefix("firmware/")?
        .strip_suffix("/upgrade")?
        .strip_prefix("sim-")?
        .parse()
        .ok()
}

/// One MQTT client for every drone's command topic; hands each upgrade to its drone's task.
async fn subscribe(
    port: u16,
    drones: Vec<mpsc::UnboundedSender<Upgrade>>,
    tally: Arc<Tally>,
) -> Result<tokio::task::JoinHandle<()>> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new("flightnode-bench-drones", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 1024);
    client
        .subscribe("firmware/+/upgrade", QoS::AtLeastOnce)
        .await
        .context("subscribe to firmware/+/upgrade")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if Instant::now() > deadline => bail!("MQTT subscription: {e}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => bail!("no SUBACK from the broker in 5 s"),
        }
        if Instant::now() > deadline {
            bail!("no SUBACK from the broker in 20 s");
        }
    }
    Ok(tokio::spawn(async move {
        // Owned here so the connection lives as long as the loop.
        let _client = client;
        loop {
            let p = match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let at = Instant::now();
            let Some(i) = drone_of(&p.topic).filter(|i| *i < drones.len()) else {
                tally.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match parse_command(&p.payload, &load::drone_id(i)) {
                Ok(Command::Upgrade(u)) => {
                    let version = u.version.map(|v| v.to_string()).unwrap_or_default();
                    tally
                        .upgrades
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(Received {
                            drone: i,
                            upgrade_id: u.upgrade_id.clone(),
                            at,
                        });
                    let _ = drones[i].send(Upgrade {
                        id: u.upgrade_id,
                        version,
                    });
                }
                Ok(Command::Cancel { .. }) => {
                    tally.cancels.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }))
}
