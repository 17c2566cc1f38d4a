//! A gRPC load generator for the hub: N simulated drones heartbeating through a small pool of
//! tonic channels (many concurrent requests per HTTP/2 connection), a burst of upgrade phase
//! changes, and a closed-loop "as fast as possible" phase; plus a no-op `HubService` that answers
//! at once, the transport's ceiling. `flightnode-bench hub` drives it.

use anyhow::Result;
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use flightnode_proto::v1::hub_service_server::{HubService, HubServiceServer};
use flightnode_proto::v1::{self, HeartbeatRequest, HeartbeatResponse};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Phases a changing drone walks through (agent snake_case names), ending idle and committed.
pub const PHASES: [&str; 5] = ["downloading", "staged", "switching", "testing", "idle"];

/// The hub's name for a phase (`downloading` → `Downloading`).
pub fn status_phase(phase: &str) -> String {
    let mut c = phase.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// Device id of simulated drone `i`.
pub fn drone_id(i: usize) -> String {
    format!("sim-{i}")
}

/// The heartbeat of drone `i` idle on `version`.
pub fn idle_heartbeat(i: usize, version: &str, seq: u64) -> HeartbeatRequest {
    let mut hb = flightnode_proto::sample::idle_heartbeat(&drone_id(i), version);
    hb.boot_id = format!("boot-{i}");
    hb.hardware_id = "cc-sim-v1".into();
    hb.seq = seq;
    hb
}

/// A no-op `HubService`: answers every heartbeat at once and stores nothing.
#[derive(Default, Clone)]
pub struct NoopHub {
    /// Heartbeats answered.
    pub count: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl HubService for NoopHub {
    async fn heartbeat(
        &self,
        request: tonic::Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let hb = request.into_inner();
        Ok(tonic::Response::new(HeartbeatResponse {
            acked_seq: hb.events.iter().map(|e| e.seq).max().unwrap_or(0),
            heartbeat_interval_seconds: 0,
            time: None,
        }))
    }
}

/// Starts the no-op service on a free loopback port (in this process); returns its address.
pub async fn start_noop() -> Result<(SocketAddr, NoopHub)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hub = NoopHub::default();
    let svc = HubServiceServer::new(hub.clone());
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((addr, hub))
}

/// `channels` HTTP/2 connections to `addr` (plain gRPC).
pub async fn pool(addr: SocketAddr, channels: usize) -> Result<Vec<HubServiceClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..channels.max(1) {
        let ch = Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(HubServiceClient::new(ch));
    }
    Ok(out)
}

/// Latency percentiles and counts of a run.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Heartbeats answered OK.
    pub ok: u64,
    /// Heartbeats answered with an error.
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// RPC latencies (µs), sorted.
    pub latencies_us: Vec<u64>,
    /// (device id, status phase, when the heartbeat carrying it was sent) for every phase change.
    pub phase_sends: Vec<(String, String, Instant)>,
}

impl Outcome {
    /// Heartbeats per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Latency percentile in ms.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// Percentile `p` (0..=100) of a sorted slice; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let last = sorted.len() - 1;
    // The rank is in 0..=last once `p` is clamped; `as` saturates a NaN to 0.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "see above"
    )]
    let i = ((p.clamp(0.0, 100.0) / 100.0) * last as f64).round() as usize;
    sorted[i.min(last)]
}

#[derive(Default)]
struct Collect {
    ok: u64,
    errors: u64,
    lat: Vec<u64>,
    phases: Vec<(String, String, Instant)>,
}

async fn send(client: &mut HubServiceClient<Channel>, hb: HeartbeatRequest, c: &mut Collect) -> Instant {
    let t = Instant::now();
    let r = client.heartbeat(hb).await;
    c.lat
        .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
    match r {
        Ok(_) => c.ok += 1,
        Err(_) => c.errors += 1,
    }
    t
}

/// An upgrade wave: `drones` of the fleet (evenly picked) start upgrading, their starts spread
/// evenly over `spread` from `start_at` into the run, each walking [`PHASES`] `step` apart.
#[derive(Debug, Clone, Copy)]
pub struct Wave {
    /// Drones that upgrade.
    pub drones: usize,
    /// When the first one starts, from the start of the run.
    pub start_at: Duration,
    /// Over how long the starts are spread.
    pub spread: Duration,
    /// Time between two phases of one drone.
    pub step: Duration,
}

impl Wave {
    /// Phase changes per second while the wave runs (before the hub coalesces any).
    pub fn changes_per_sec(&self) -> f64 {
        let walk = self.step.as_secs_f64() * PHASES.len() as f64;
        self.drones as f64 * PHASES.len() as f64 / (self.spread.as_secs_f64() + walk).max(1e-9)
    }
}

/// Paced fleet: every drone heartbeats every `interval` (start offsets spread evenly, ±10 %
/// jitter) for `duration`; the drones of `wave` walk [`PHASES`] with one immediate heartbeat per
/// phase, like an agent does on each phase change.
pub async fn paced(
    clients: &[HubServiceClient<Channel>],
    drones: usize,
    interval: Duration,
    duration: Duration,
    wave: Wave,
) -> Outcome {
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let every = drones / wave.drones.clamp(1, drones.max(1));
    let step = wave.step;
    let mut tasks = Vec::with_capacity(drones);
    for i in 0..drones {
        let mut client = clients[i % clients.len()].clone();
        let offset = interval.mul_f64(i as f64 / drones as f64);
        let change_index = i / every.max(1);
        let will_change = wave.drones > 0 && i % every.max(1) == 0 && change_index < wave.drones;
        tasks.push(tokio::spawn(async move {
            let mut c = Collect::default();
            let mut seq = 1u64;
            let mut next = start + offset;
            let change_at = start
                + wave.start_at
                + wave
                    .spread
                    .mul_f64(change_index as f64 / wave.drones.max(1) as f64);
            let mut changed = !will_change;
            loop {
                if !changed && next >= change_at {
                    tokio::time::sleep_until(change_at).await;
                    let mut events = Vec::new();
                    for (n, phase) in PHASES.into_iter().enumerate() {
                        seq += 1;
                        let event_seq = n as u64 + 1;
                        let done = phase == "idle";
                        let mut hb = idle_heartbeat(i, if done { "2.0.0" } else { "1.0.0" }, seq);
                        if done {
                            hb.last_upgrade = Some(v1::LastUpgrade {
                                upgrade_id: format!("up-{i}"),
                                version: "2.0.0".into(),
                                result: "committed".into(),
                                finished_unix: 1_700_000_000,
                                ..Default::default()
                            });
                        } else {
                            hb.upgrade = Some(v1::CurrentUpgrade {
                                upgrade_id: format!("up-{i}"),
                                phase: phase.into(),
                                bytes: 0,
                                total: 0,
                                version: "2.0.0".into(),
                                wait_reason: String::new(),
                            });
                        }
                        events.push(v1::Event {
                            seq: event_seq,
                            time_unix_ms: 1_700_000_000_000,
                            upgrade_id: format!("up-{i}"),
                            phase: phase.into(),
                            result: if done { "committed".into() } else { String::new() },
                            ..Default::default()
                        });
                        hb.events = events.clone();
                        let sent = send(&mut client, hb, &mut c).await;
                        c.phases.push((drone_id(i), status_phase(phase), sent));
                        tokio::time::sleep(step).await;
                    }
                    changed = true;
                    next = tokio::time::Instant::now() + interval;
                    continue;
                }
                if next >= end {
                    break;
                }
                tokio::time::sleep_until(next).await;
                seq += 1;
                let version = if will_change && changed { "2.0.0" } else { "1.0.0" };
                send(&mut client, idle_heartbeat(i, version, seq), &mut c).await;
                let jitter = rand::rng().random_range(0.9..1.1);
                next += interval.mul_f64(jitter);
            }
            c
        }));
    }
    let mut out = Outcome::default();
    for t in tasks {
        if let Ok(c) = t.await {
            out.ok += c.ok;
            out.errors += c.errors;
            out.latencies_us.extend(c.lat);
            out.phase_sends.extend(c.phases);
        }
    }
    out.elapsed = start.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Closed loop as fast as possible: `concurrency` workers each send the next drone's idle
/// heartbeat as soon as the previous answer arrived, for `duration`.
pub async fn flood(
    clients: &[HubServiceClient<Channel>],
    drones: usize,
    concurrency: usize,
    duration: Duration,
) -> Outcome {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = clients[w % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Collect::default();
            let mut i = w;
            while start.elapsed() < duration {
                send(&mut client, idle_heartbeat(i % drones.max(1), "1.0.0", 1), &mut c).await;
                i += concurrency;
            }
            c
        }));
    }
    let mut out = Outcome::default();
    for t in tasks {
        if let Ok(c) = t.await {
            out.ok += c.ok;
            out.errors += c.errors;
            out.latencies_us.extend(c.lat);
        }
    }
    out.elapsed = start.elapsed();
    out.latencies_us.sort_unstable();
    out
}

/// Most events in any window of `window` over sorted timestamps.
pub fn max_in_window(sorted: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi].duration_since(sorted[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}
