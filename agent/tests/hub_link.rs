//! The hub link against an in-test gRPC hub on loopback: heartbeats at start and on change,
//! re-sending until acknowledged, outages, the outbox cap, and mutual TLS.
//!
//! Real sockets and real time (tonic's timeouts would fire under a paused clock while I/O is
//! pending); every wait is an "eventually" with a generous deadline.

use flightnode_agent::config::HubConfig;
use flightnode_agent::hub_link::{self, DeviceInfo, Tls};
use flightnode_agent::outbox::{Event, Outbox};
use flightnode_agent::state::DeviceState;
use flightnode_proto::Phase;
use flightnode_proto::status::Progress;
use flightnode_proto::v1;
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use flightnode_proto::v1::hub_service_server::{HubService, HubServiceServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

const EVENTUALLY: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The test hub.

#[derive(Default)]
struct Seen {
    requests: Vec<v1::HeartbeatRequest>,
    peer_certs: Vec<Option<Vec<u8>>>,
    /// Events "durably recorded" (only while acking).
    recorded: BTreeMap<u64, v1::Event>,
    /// Every event seq in arrival order, duplicates included.
    arrivals: Vec<u64>,
    fail: bool,
    ack: bool,
    /// Answer this late (a slow hub).
    delay: Duration,
    refused: usize,
}

#[derive(Clone)]
struct Hub(Arc<Mutex<Seen>>);

impl Hub {
    fn new() -> Self {
        Hub(Arc::new(Mutex::new(Seen {
            ack: true,
            ..Seen::default()
        })))
    }
    fn with<R>(&self, f: impl FnOnce(&mut Seen) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
    fn count(&self) -> usize {
        self.with(|s| s.requests.len())
    }
    fn set_fail(&self, fail: bool) {
        self.with(|s| s.fail = fail);
    }
    fn set_ack(&self, ack: bool) {
        self.with(|s| s.ack = ack);
    }
}

#[tonic::async_trait]
impl HubService for Hub {
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let peer = request.peer_certs().and_then(|c| c.first().map(|c| c.to_vec()));
        let req = request.into_inner();
        let delay = self.with(|s| s.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.0.lock().unwrap();
        if s.fail {
            s.refused += 1;
            return Err(Status::unavailable("hub is down for the test"));
        }
        s.arrivals.extend(req.events.iter().map(|e| e.seq));
        if s.ack {
            for e in &req.events {
                s.recorded.insert(e.seq, e.clone());
            }
        }
        let acked_seq = if s.ack {
            s.recorded.keys().next_back().copied().unwrap_or(0)
        } else {
            0
        };
        s.requests.push(req);
        s.peer_certs.push(peer);
        Ok(Response::new(v1::HeartbeatResponse {
            acked_seq,
            heartbeat_interval_seconds: 0,
            time: None,
        }))
    }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(hub: &Hub, addr: SocketAddr, tls: Option<ServerTlsConfig>) -> Running {
        // Rebinding the port of a server that just stopped: retry briefly.
        let deadline = Instant::now() + EVENTUALLY;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("bind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        let router = builder.add_service(HubServiceServer::new(hub.clone()));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Running {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The device side.

struct Device {
    _dir: tempfile::TempDir,
    outbox: Outbox,
    state: watch::Sender<DeviceState>,
    progress: watch::Sender<Option<Progress>>,
    connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
    link: tokio::task::JoinHandle<Result<(), hub_link::HubLinkError>>,
}

fn hub_config(endpoint: String, interval: Duration, cap: usize) -> HubConfig {
    HubConfig {
        endpoint,
        heartbeat_interval: interval,
        timeout: Duration::from_secs(3),
        ca: None,
        cert: None,
        key: None,
        outbox_cap: cap,
    }
}

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("flightnode_agent=debug")),
        )
        .with_test_writer()
        .try_init();
}

impl Device {
    fn start(cfg: HubConfig, tls: Tls) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let store = flightnode_agent::store::Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(&store.durable(), cfg.outbox_cap).unwrap();
        let (state, state_rx) = watch::channel(DeviceState::factory(semver::Version::new(1, 0, 0)));
        let (progress, progress_rx) = watch::channel(None);
        let (connected_tx, connected) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let info = DeviceInfo {
            booted: None,
            device_id: "drone-7".into(),
            hardware: "cc-test-v1".into(),
            agent_version: "0.1.0-test".into(),
            boot_id: "boot-1".into(),
            state_dir: dir.path().to_owned(),
            hub_keys: None,
            clock: None,
        };
        let link = tokio::spawn(hub_link::run(
            cfg,
            tls,
            info,
            state_rx,
            progress_rx,
            outbox.clone(),
            None,
            None,
            connected_tx,
            shutdown.clone(),
        ));
        Device {
            _dir: dir,
            outbox,
            state,
            progress,
            connected,
            shutdown,
            link,
        }
    }

    /// A transition the way the engine does it: event durable in the outbox, then the new state
    /// published. Returns the event's seq.
    fn transition(&self, f: impl FnOnce(&mut DeviceState)) -> u64 {
        let mut s = self.state.borrow().clone();
        f(&mut s);
        let event = Event::from_state(&s);
        self.outbox.push(&event).unwrap();
        self.state.send_replace(s);
        event.seq
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(EVENTUALLY, self.link)
            .await
            .expect("link stops on shutdown")
            .unwrap();
        r.unwrap();
        assert!(!*self.connected.borrow(), "connected is false after shutdown");
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has_event(r: &v1::HeartbeatRequest, seq: u64) -> bool {
    r.events.iter().any(|e| e.seq == seq)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_at_start_and_promptly_on_state_change() {
    init();
    let hub = Hub::new();
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), None).await;
    // A long interval: only the on-change path can deliver the change in time.
    let cfg = hub_config(format!("http://{}", server.addr), Duration::from_mins(1), 100);
    let dev = Device::start(cfg, Tls::default());

    eventually("first heartbeat", || hub.count() >= 1).await;
    let first = hub.with(|s| s.requests[0].clone());
    assert_eq!(first.device_id, "drone-7");
    assert_eq!(first.hardware_id, "cc-test-v1");
    assert_eq!(first.boot_id, "boot-1");
    let fw = first.firmware.clone().unwrap();
    assert_eq!(
        (fw.active_slot.as_str(), fw.committed_version.as_str()),
        ("a", "1.0.0")
    );
    assert_eq!(fw.slot_a.unwrap().state, "good");
    assert_eq!(fw.slot_b.unwrap().state, "empty");
    assert!(first.upgrade.is_none());
    assert!(first.events.is_empty());
    let res = first.resources.unwrap();
    assert!(res.memory_total_bytes > 0 && res.disk_free_bytes > 0, "{res:?}");
    eventually("connected", || *dev.connected.borrow()).await;

    let before = hub.count();
    let t0 = Instant::now();
    let seq = dev.transition(|s| s.begin("up-1".into(), "https://bundles/x".into(), false));
    eventually("heartbeat with the event", || {
        hub.with(|s| s.requests.iter().any(|r| has_event(r, seq)))
    })
    .await;
    let took = t0.elapsed();
    eprintln!("on-change heartbeat after {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "on-change heartbeat took {took:?}"
    );
    let r = hub.with(|s| s.requests.iter().find(|r| has_event(r, seq)).cloned().unwrap());
    let e = r.events.iter().find(|e| e.seq == seq).unwrap();
    assert_eq!((e.phase.as_str(), e.upgrade_id.as_str()), ("downloading", "up-1"));
    let u = r.upgrade.unwrap();
    assert_eq!((u.phase.as_str(), u.upgrade_id.as_str()), ("downloading", "up-1"));
    assert!(r.seq > first.seq, "heartbeat seq grows");
    eventually("outbox acknowledged", || dev.outbox.is_empty()).await;

    // A burst of transitions goes out coalesced, not as one heartbeat each.
    let after_first = hub.count();
    assert!(after_first > before);
    let mut last = 0;
    let t_burst = Instant::now();
    for phase in [
        Phase::Staged,
        Phase::Switching,
        Phase::Testing,
        Phase::RollingBack,
    ] {
        last = dev.transition(|s| s.enter(phase));
    }
    // Each transition flushes the outbox to disk; on a slow disk they can spread over more than
    // one coalescing window, and then one heartbeat each is right.
    let spread = t_burst.elapsed();
    eventually("burst delivered", || {
        hub.with(|s| s.requests.iter().any(|r| has_event(r, last)))
    })
    .await;
    eventually("outbox acknowledged", || dev.outbox.is_empty()).await;
    let burst = hub.count() - after_first;
    if spread < hub_link::COALESCE {
        assert!(burst <= 3, "4 quick transitions took {burst} heartbeats");
    } else {
        eprintln!("the 4 transitions took {spread:?}: coalescing not checked");
    }
    // Every transition arrived, in order.
    let arrivals = hub.with(|s| s.arrivals.clone());
    let want: Vec<u64> = (seq..=last).collect();
    let mut firsts = Vec::new();
    for a in arrivals {
        if !firsts.contains(&a) {
            firsts.push(a);
        }
    }
    assert_eq!(firsts, want);

    // Progress alone is throttled, but gets through.
    for i in 1..=50u64 {
        dev.progress.send_replace(Some(Progress {
            bytes: i * 1000,
            total: 50_000,
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let n = hub.count();
    eventually("progress heartbeat", || {
        hub.with(|s| {
            s.requests
                .iter()
                .any(|r| r.upgrade.as_ref().is_some_and(|u| u.bytes == 50_000))
        })
    })
    .await;
    assert!(
        hub.count() - n <= 3,
        "50 progress updates took {} heartbeats",
        hub.count() - n
    );

    dev.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_resent_until_acknowledged() {
    init();
    let hub = Hub::new();
    hub.set_ack(false);
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), None).await;
    let cfg = hub_config(format!("http://{}", server.addr), Duration::from_secs(1), 100);
    let dev = Device::start(cfg, Tls::default());
    eventually("first heartbeat", || hub.count() >= 1).await;

    let a = dev.transition(|s| s.begin("up-2".into(), "src".into(), false));
    let b = dev.transition(|s| s.enter(Phase::Staged));
    eventually("the same events three times", || {
        hub.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.events.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![a, b])
                .count()
                >= 3
        })
    })
    .await;
    assert_eq!(dev.outbox.len(), 2, "nothing acknowledged, nothing removed");

    hub.set_ack(true);
    eventually("outbox empties once the hub acks", || dev.outbox.is_empty()).await;
    assert_eq!(
        hub.with(|s| s.recorded.keys().copied().collect::<Vec<_>>()),
        vec![a, b]
    );

    dev.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_lose_nothing() {
    init();
    let hub = Hub::new();
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), None).await;
    let addr = server.addr;
    let cfg = hub_config(format!("http://{addr}"), Duration::from_secs(1), 100);
    let dev = Device::start(cfg, Tls::default());
    eventually("connected", || *dev.connected.borrow()).await;

    // Outage 1: the hub answers UNAVAILABLE.
    hub.set_fail(true);
    let first = dev.transition(|s| s.begin("up-3".into(), "src".into(), false));
    eventually("a refused heartbeat", || hub.with(|s| s.refused >= 1)).await;
    eventually("disconnected", || !*dev.connected.borrow()).await;
    dev.transition(|s| s.enter(Phase::Staged));
    dev.transition(|s| s.enter(Phase::Switching));
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.set_fail(false);
    eventually("reconnected", || *dev.connected.borrow()).await;
    eventually("outbox drained", || dev.outbox.is_empty()).await;

    // Outage 2: the hub process is gone, then back on the same port.
    server.stop().await;
    dev.transition(|s| s.enter(Phase::Testing));
    eventually("disconnected", || !*dev.connected.borrow()).await;
    dev.transition(|s| s.enter(Phase::RollingBack));
    let last = dev.transition(|s| {
        s.fail(flightnode_proto::ErrorCode::HealthCheckFailed, "unhealthy".into());
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dev.outbox.len(), 3, "events wait in the outbox during the outage");
    let server = Running::start(&hub, addr, None).await;
    eventually("outbox drained after restart", || dev.outbox.is_empty()).await;
    assert!(*dev.connected.borrow());

    let recorded = hub.with(|s| s.recorded.clone());
    assert_eq!(
        recorded.keys().copied().collect::<Vec<_>>(),
        (first..=last).collect::<Vec<_>>()
    );
    let phases: Vec<&str> = recorded.values().map(|e| e.phase.as_str()).collect();
    assert_eq!(
        phases,
        [
            "downloading",
            "staged",
            "switching",
            "testing",
            "rolling_back",
            "idle"
        ]
    );
    let end = &recorded[&last];
    assert_eq!(
        (end.error_code.as_str(), end.message.as_str()),
        ("health_check_failed", "unhealthy")
    );
    // Within every heartbeat, events are oldest first; across heartbeats, first arrivals in order.
    hub.with(|s| {
        for r in &s.requests {
            assert!(r.events.windows(2).all(|w| w[0].seq < w[1].seq), "{:?}", r.events);
        }
        let mut firsts = Vec::new();
        for a in &s.arrivals {
            if !firsts.contains(a) {
                firsts.push(*a);
            }
        }
        assert_eq!(firsts, (first..=last).collect::<Vec<_>>());
    });

    dev.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_cap_drops_the_oldest_and_counts_them() {
    init();
    let hub = Hub::new();
    hub.set_fail(true);
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), None).await;
    let cfg = hub_config(format!("http://{}", server.addr), Duration::from_secs(1), 3);
    let dev = Device::start(cfg, Tls::default());
    eventually("a refused heartbeat", || hub.with(|s| s.refused >= 1)).await;

    let mut seqs = vec![dev.transition(|s| s.begin("up-4".into(), "src".into(), false))];
    for phase in [Phase::Staged, Phase::Switching, Phase::Testing] {
        seqs.push(dev.transition(|s| s.enter(phase)));
    }
    seqs.push(dev.transition(|s| {
        s.fail(flightnode_proto::ErrorCode::Canceled, "canceled".into());
    }));
    assert_eq!(dev.outbox.len(), 3);
    assert_eq!(dev.outbox.dropped(), 2);

    hub.set_fail(false);
    eventually("outbox drained", || dev.outbox.is_empty()).await;
    let recorded: Vec<u64> = hub.with(|s| s.recorded.keys().copied().collect());
    assert_eq!(recorded, seqs[2..].to_vec(), "the two oldest were dropped");

    dev.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hub_times_out_and_never_blocks_shutdown() {
    init();
    let hub = Hub::new();
    hub.with(|s| s.delay = Duration::from_secs(30));
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), None).await;
    let mut cfg = hub_config(format!("http://{}", server.addr), Duration::from_secs(1), 100);
    cfg.timeout = Duration::from_millis(500);
    let dev = Device::start(cfg, Tls::default());
    // Publishing state and progress never waits for the link.
    for i in 0..100u64 {
        dev.transition(|s| {
            if s.upgrade.is_none() {
                s.begin("up-6".into(), "src".into(), false);
            } else {
                s.enter(Phase::Staged);
            }
        });
        dev.progress.send_replace(Some(Progress { bytes: i, total: 100 }));
    }
    assert_eq!(dev.outbox.len(), 100);
    // Let a few calls time out (each is cut at the 500 ms timeout), then stop mid-call.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!*dev.connected.borrow());
    assert_eq!(hub.count(), 0);
    let t0 = Instant::now();
    dev.stop().await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown waited for the hub"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS.

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_der: Vec<u8>,
    server_tls: ServerTlsConfig,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flightnode test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["drone-7".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "drone-7");
    let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert = write(dir.path(), "device.pem", &client_cert.pem());
    let key = write(dir.path(), "device.key", &client_key.serialize_pem());
    let server_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(server_cert.pem(), server_key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(ca.pem()));
    Pki {
        _dir: dir,
        ca: ca_path,
        cert,
        key,
        client_der: client_cert.der().to_vec(),
        server_tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_device_identity() {
    init();
    let pki = pki();
    let hub = Hub::new();
    let server = Running::start(&hub, "127.0.0.1:0".parse().unwrap(), Some(pki.server_tls.clone())).await;
    let endpoint = format!("https://127.0.0.1:{}", server.addr.port());

    // Without a client certificate the hub refuses the connection.
    let anonymous = Tls {
        ca: Some(pki.ca.clone()),
        ..Tls::default()
    };
    let cfg = hub_config(endpoint.clone(), Duration::from_mins(1), 100);
    let mut client = HubServiceClient::new(hub_link::channel(&cfg, &anonymous).unwrap());
    let refused = client.heartbeat(v1::HeartbeatRequest::default()).await;
    let refused = refused.expect_err("a client without a certificate got through");
    eprintln!("without a client certificate: {refused}");
    assert_eq!(hub.count(), 0);

    let tls = Tls {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.cert.clone()),
        key: Some(pki.key.clone()),
    };
    let dev = Device::start(cfg, tls);
    eventually("heartbeat over mTLS", || hub.count() >= 1).await;
    eventually("connected", || *dev.connected.borrow()).await;
    let (req, peer) = hub.with(|s| (s.requests[0].clone(), s.peer_certs[0].clone()));
    assert_eq!(req.device_id, "drone-7");
    assert_eq!(
        peer.as_deref(),
        Some(pki.client_der.as_slice()),
        "the hub sees the device certificate"
    );

    let seq = dev.transition(|s| s.begin("up-5".into(), "src".into(), false));
    eventually("event over mTLS", || hub.with(|s| s.recorded.contains_key(&seq))).await;
    eventually("outbox acknowledged", || dev.outbox.is_empty()).await;

    dev.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_fail_setup_with_the_path() {
    init();
    let pki = pki();
    let tls = Tls {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.cert.clone()),
        key: Some(pki.cert.clone()), // a certificate where the key should be
    };
    let cfg = hub_config("https://127.0.0.1:1".into(), Duration::from_mins(1), 100);
    let e = hub_link::channel(&cfg, &tls).unwrap_err();
    assert!(
        e.to_string().contains("device.pem") && e.to_string().contains("key"),
        "{e}"
    );

    let cfg = hub_config("https://".into(), Duration::from_mins(1), 100);
    let e = hub_link::channel(&cfg, &tls).unwrap_err();
    assert!(matches!(e, hub_link::HubLinkError::Endpoint { .. }), "{e}");
}
