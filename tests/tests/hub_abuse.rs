//! The hub under abuse: a real `flightnode-hub serve` with mutual TLS takes 10,000 bad requests
//! (garbage and mutated protobuf, lying gRPC frames, oversized messages, invalid fields,
//! impersonation, TLS handshakes with foreign, expired or missing client certificates) while good
//! drones keep heartbeating. Every bad request is refused with the error of its kind, the good
//! drones never see an error, nobody else gets a `FlightNode`, no good drone's status changes,
//! and the hub's resident memory stays flat between the warm-up and the end.

use flightnode_proto::error::chain;
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use flightnode_proto::v1::{self, HeartbeatRequest};
use flightnode_tests::fleet::{Hub, condition, http_get, rss_kib};
use flightnode_tests::pki::{ClientCert, Pki};
use http_body_util::{BodyExt, Full};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::codegen::{Bytes, Service, http};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Bad requests in all.
const TOTAL: usize = 10_000;
/// Bad requests before the first memory reading.
const WARMUP: usize = 1_000;
/// Bad requests in flight at once.
const WORKERS: usize = 16;
/// Allowed growth of the hub's RSS from the warm-up to the end.
const MAX_GROWTH_KIB: u64 = 16 * 1024;
/// The hub's decoding cap (`flightnode_hub::heartbeat::grpc::MAX_MESSAGE_BYTES`).
const HUB_MAX_MESSAGE: usize = 64 * 1024;
/// What the hub keeps of a free-text message (`flightnode_hub::heartbeat::grpc::MAX_MESSAGE_TEXT_BYTES`).
const HUB_MAX_TEXT: usize = 1024;
/// Drones with their own certificates that heartbeat all along.
const GOOD: [&str; 3] = ["drone-1", "drone-2", "drone-3"];
/// A valid certificate of the fleet CA whose holder speaks for nobody else.
const MALLORY: &str = "mallory";
const HEARTBEAT_PATH: &str = "/flightnode.v1.HubService/Heartbeat";

/// What a bad request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Random bytes that are not protobuf (a truncated length-delimited field first).
    Garbage,
    /// A good heartbeat with random edits, sent with mallory's certificate.
    Mutated,
    /// A zero-length message: a heartbeat with every field empty.
    EmptyMessage,
    /// A request body without any gRPC message.
    NoMessage,
    /// Device ids against the rule: `a/b`, `+`, `#`, 65 characters, `..`, …
    BadDeviceId,
    /// More than 256 events.
    TooManyEvents,
    /// A short field over 1 KiB (still under the message cap).
    LongField,
    /// Control characters in a short field.
    ControlChars,
    /// A valid heartbeat for another device: mallory for the good drones and ghosts, drone-1 for drone-2.
    Impersonation,
    /// A message of 64 KiB + 1 to 256 KiB.
    Oversized,
    /// A message over 4 MiB.
    Huge,
    /// A gRPC frame header claiming 4 GiB.
    LyingLength,
    /// A gRPC frame header claiming more bytes than the stream carries.
    Truncated,
    /// The compressed flag without a `grpc-encoding`.
    CompressedFlag,
    /// A `grpc-encoding` the hub does not support.
    UnknownEncoding,
    /// TLS with a client certificate from another CA (CN drone-1).
    ForeignCa,
    /// TLS without a client certificate.
    NoClientCert,
    /// TLS with an expired client certificate of the fleet CA (CN drone-1).
    ExpiredCert,
}

impl Kind {
    /// The TLS alert the hub answers a bad client certificate with.
    fn alert(self) -> Option<&'static str> {
        match self {
            Kind::ForeignCa => Some("UnknownCA"),
            Kind::NoClientCert => Some("CertificateRequired"),
            Kind::ExpiredCert => Some("CertificateExpired"),
            _ => None,
        }
    }
}

/// Out of every 200 bad requests, how many of each kind.
const MIX: [(Kind, usize); 18] = [
    (Kind::Garbage, 26),
    (Kind::Mutated, 26),
    (Kind::EmptyMessage, 4),
    (Kind::NoMessage, 4),
    (Kind::BadDeviceId, 20),
    (Kind::TooManyEvents, 6),
    (Kind::LongField, 14),
    (Kind::ControlChars, 10),
    (Kind::Impersonation, 30),
    (Kind::Oversized, 12),
    (Kind::Huge, 1),
    (Kind::LyingLength, 6),
    (Kind::Truncated, 6),
    (Kind::CompressedFlag, 6),
    (Kind::UnknownEncoding, 5),
    (Kind::ForeignCa, 8),
    (Kind::NoClientCert, 8),
    (Kind::ExpiredCert, 8),
];

fn kind_of(i: usize) -> Kind {
    let cycle: usize = MIX.iter().map(|(_, n)| n).sum();
    let mut slot = (i.wrapping_mul(7919)) % cycle; // spread the kinds over the run
    for (kind, n) in MIX {
        if slot < n {
            return kind;
        }
        slot -= n;
    }
    unreachable!("slot within the cycle")
}

/// How the hub answered.
#[derive(Debug, Clone)]
enum Outcome {
    /// A gRPC status (also `Ok`).
    Status(Code, String),
    /// A TLS handshake that only reads: the hub's fatal alert (error chain), or that it accepted.
    Handshake(String),
    /// No gRPC answer: the connection failed (error chain).
    Transport(String),
}

/// How a gRPC client sees a connection the hub ended during or right after the handshake.
const CLOSED: [&str; 4] = [
    "broken pipe",
    "connection closed",
    "connection reset",
    "connection was not ready",
];

/// Which answers are right for a request; `None` when it is fine.
fn wrong_answer(kind: Kind, request: &Request, outcome: &Outcome) -> Option<String> {
    let ok = match (kind.alert(), outcome) {
        // The alert itself, exactly.
        (Some(alert), Outcome::Handshake(e)) => e.contains(&format!("received fatal alert: {alert}")),
        // A gRPC client writes at once, so it may see its connection reset before the alert, or
        // (hyper: "connection was not ready") closed before its request went out; what matters
        // is that no heartbeat gets an answer.
        (Some(alert), Outcome::Transport(e)) => {
            let e = e.to_lowercase();
            e.contains(&alert.to_lowercase()) || CLOSED.iter().any(|s| e.contains(s))
        }
        (_, Outcome::Handshake(_) | Outcome::Transport(_)) => false,
        (_, Outcome::Status(code, message)) => match kind {
            Kind::Garbage | Kind::Truncated | Kind::CompressedFlag => *code == Code::Internal,
            Kind::NoMessage => *code == Code::Internal && message.contains("Missing request message"),
            Kind::Mutated => match &request.decoded {
                None => *code == Code::Internal,
                Some(hb) if hb.device_id == MALLORY => false, // (a mutation cannot make this up)
                Some(hb) if flightnode_proto::device::validate_device_id(&hb.device_id).is_err() => {
                    *code == Code::InvalidArgument
                }
                Some(_) => matches!(code, Code::InvalidArgument | Code::PermissionDenied),
            },
            Kind::EmptyMessage | Kind::BadDeviceId => {
                *code == Code::InvalidArgument && message.contains("device id")
            }
            Kind::TooManyEvents => *code == Code::InvalidArgument && message.contains("events"),
            Kind::LongField => *code == Code::InvalidArgument && message.contains("longer than"),
            Kind::ControlChars => *code == Code::InvalidArgument && message.contains("control characters"),
            Kind::Impersonation => *code == Code::PermissionDenied && message.contains("does not speak for"),
            Kind::Oversized | Kind::Huge | Kind::LyingLength => {
                *code == Code::OutOfRange && message.contains("message length too large")
            }
            Kind::UnknownEncoding => *code == Code::Unimplemented,
            Kind::ForeignCa | Kind::NoClientCert | Kind::ExpiredCert => false,
        },
    };
    (!ok).then(|| format!("{kind:?}: unexpected answer {outcome:?}"))
}

/// A short label of an answer for the summary.
fn label(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Status(code, _) => format!("{code:?}"),
        Outcome::Handshake(e) => format!("handshake: {e}"),
        Outcome::Transport(e) => {
            let lower = e.to_lowercase();
            let alert = ["UnknownCA", "CertificateRequired", "CertificateExpired"]
                .into_iter()
                .find(|a| e.contains(a))
                .map(|a| format!("alert {a}"));
            let closed = CLOSED
                .iter()
                .find(|s| lower.contains(*s))
                .map(|s| (*s).to_owned());
            format!("gRPC call: {}", alert.or(closed).unwrap_or_else(|| e.clone()))
        }
    }
}

/// The heartbeat of a good drone (also the base of the bad ones).
fn heartbeat(device: &str, seq: u64) -> HeartbeatRequest {
    let mut hb = flightnode_proto::sample::idle_heartbeat(device, "1.0.0");
    hb.boot_id = format!("boot-{device}");
    hb.hardware_id = "cc-sim-v1".into();
    hb.seq = seq;
    if let Some(r) = hb.resources.as_mut() {
        r.uptime_seconds = seq;
    }
    hb
}

/// What an impostor would like the hub to believe: another version, an upgrade under way, an event.
fn forged(device: &str) -> HeartbeatRequest {
    let mut hb = heartbeat(device, 1_000_000);
    hb.boot_id = "forged".into();
    if let Some(f) = hb.firmware.as_mut() {
        f.committed_version = "6.6.6".into();
    }
    hb.upgrade = Some(v1::CurrentUpgrade {
        upgrade_id: "evil".into(),
        phase: "downloading".into(),
        version: "6.6.6".into(),
        ..Default::default()
    });
    hb.events.push(v1::Event {
        seq: 999,
        upgrade_id: "evil".into(),
        phase: "downloading".into(),
        ..Default::default()
    });
    hb
}

/// A gRPC frame: flag, big-endian length, message.
fn frame(compressed: bool, len: u32, message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(u8::from(compressed));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

fn message_frame(message: &[u8]) -> Bytes {
    frame(
        false,
        u32::try_from(message.len()).expect("message under 4 GiB"),
        message,
    )
}

/// A bad request: its HTTP/2 body (and headers), and for mutations what it decodes to.
struct Request {
    body: Bytes,
    encoding: Option<&'static str>,
    decoded: Option<HeartbeatRequest>,
    /// Sent with drone-1's certificate instead of mallory's.
    as_drone: bool,
}

impl Request {
    fn new(body: Bytes) -> Request {
        Request {
            body,
            encoding: None,
            decoded: None,
            as_drone: false,
        }
    }
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    flightnode_tests::fuzz::mutate(rng, seed)
}

/// Request `i` of kind `kind` (TLS kinds use only the body).
fn build(kind: Kind, i: usize, huge: &Bytes) -> Request {
    let mut rng = StdRng::seed_from_u64(i as u64);
    let encode = |hb: &HeartbeatRequest| message_frame(&hb.encode_to_vec());
    match kind {
        Kind::Garbage => {
            // Field 1 (device_id) announcing more bytes than follow, then noise: never decodes.
            let mut m = vec![0x0a, 0xff, 0xff, 0x03];
            let n = rng.random_range(0..200);
            m.extend((0..n).map(|_| rng.random::<u8>()));
            Request::new(message_frame(&m))
        }
        Kind::Mutated => {
            let seed = forged(GOOD[i % GOOD.len()]).encode_to_vec();
            let mut m = mutate(&mut rng, &seed);
            m.truncate(HUB_MAX_MESSAGE);
            let mut r = Request::new(message_frame(&m));
            r.decoded = HeartbeatRequest::decode(m.as_slice()).ok();
            r
        }
        Kind::EmptyMessage => Request::new(message_frame(&[])),
        Kind::NoMessage => Request::new(Bytes::new()),
        Kind::BadDeviceId => {
            let long = "x".repeat(65);
            let ids = [
                "a/b",
                "+",
                "#",
                long.as_str(),
                "",
                ".",
                "..",
                "a..b",
                "drone 1",
                "drone-ä",
                "d\n",
            ];
            let mut r = Request::new(encode(&forged(ids[i % ids.len()])));
            r.as_drone = i.is_multiple_of(2);
            r
        }
        Kind::TooManyEvents => {
            let mut hb = heartbeat(GOOD[0], 1);
            hb.events = (0..257 + i % 100)
                .map(|s| v1::Event {
                    seq: s as u64 + 1,
                    ..Default::default()
                })
                .collect();
            let mut r = Request::new(encode(&hb));
            r.as_drone = true;
            r
        }
        Kind::LongField => {
            let mut hb = heartbeat(GOOD[0], 1);
            let long = "v".repeat(1025 + rng.random_range(0..40_000));
            match i % 4 {
                0 => hb.agent_version = long,
                1 => hb.boot_id = long,
                2 => {
                    if let Some(f) = hb.firmware.as_mut() {
                        f.committed_version = long;
                    }
                }
                _ => hb.events.push(v1::Event {
                    seq: 1,
                    error_code: long,
                    ..Default::default()
                }),
            }
            let mut r = Request::new(encode(&hb));
            r.as_drone = true;
            r
        }
        Kind::ControlChars => {
            let mut hb = heartbeat(GOOD[0], 1);
            let bad = ["1.0\u{1b}[2J", "\0", "a\rb", "\u{7f}", "x\u{9b}y"][i % 5];
            match i % 3 {
                0 => hb.agent_version = bad.into(),
                1 => hb.hardware_id = bad.into(),
                _ => {
                    hb.last_upgrade = Some(v1::LastUpgrade {
                        upgrade_id: "up-1".into(),
                        result: bad.into(),
                        ..Default::default()
                    });
                }
            }
            let mut r = Request::new(encode(&hb));
            r.as_drone = true;
            r
        }
        Kind::Impersonation => match i % 3 {
            0 => {
                // A good drone speaking for another good drone.
                let mut r = Request::new(encode(&forged(GOOD[1])));
                r.as_drone = true;
                r
            }
            // Mallory speaking for a good drone, or for one that does not exist.
            1 => Request::new(encode(&forged(GOOD[i % GOOD.len()]))),
            _ => Request::new(encode(&forged(&format!("ghost-{i}")))),
        },
        Kind::Oversized => {
            let mut hb = forged(MALLORY);
            hb.agent_version = "o".repeat(HUB_MAX_MESSAGE + rng.random_range(0..192 * 1024));
            Request::new(encode(&hb))
        }
        Kind::Huge => Request::new(huge.clone()),
        Kind::LyingLength => Request::new(frame(false, u32::MAX, &heartbeat(MALLORY, 1).encode_to_vec())),
        Kind::Truncated => {
            let m = heartbeat(MALLORY, 1).encode_to_vec();
            let claimed = u32::try_from(m.len() + 1 + rng.random_range(0..1000)).expect("small");
            Request::new(frame(false, claimed, &m))
        }
        Kind::CompressedFlag => {
            let m = heartbeat(MALLORY, 1).encode_to_vec();
            Request::new(frame(true, u32::try_from(m.len()).expect("small"), &m))
        }
        Kind::UnknownEncoding => {
            let mut r = Request::new(encode(&heartbeat(MALLORY, 1)));
            r.encoding = Some(["gzip", "zstd", "br", "x-evil"][i % 4]);
            r
        }
        Kind::ForeignCa | Kind::NoClientCert | Kind::ExpiredCert => Request::new(encode(&forged(GOOD[0]))),
    }
}

/// One raw HTTP/2 gRPC call on `channel`: the body is sent as is.
async fn raw_call(channel: &mut Channel, body: Bytes, encoding: Option<&str>) -> Outcome {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(HEARTBEAT_PATH)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(e) = encoding {
        req = req.header("grpc-encoding", e);
    }
    let req = req
        .body(tonic::body::Body::new(Full::new(body)))
        .expect("a valid request");
    if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
        return Outcome::Transport(chain(&e));
    }
    let resp = match channel.call(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::Transport(chain(&e)),
    };
    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
        return Outcome::Status(s.code(), s.message().to_owned());
    }
    match resp.into_body().collect().await {
        Ok(collected) => match collected.trailers().and_then(tonic::Status::from_header_map) {
            Some(s) => Outcome::Status(s.code(), s.message().to_owned()),
            None => Outcome::Transport("no grpc-status in the response".into()),
        },
        Err(e) => Outcome::Transport(chain(&e)),
    }
}

/// The client TLS config for the hub, with `client` as identity.
fn tls(ca: &str, client: Option<&ClientCert>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(c) = client {
        let cert = std::fs::read(&c.cert).expect("client certificate");
        let key = std::fs::read(&c.key).expect("client key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}

fn endpoint(port: u16, tls: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect_timeout(Duration::from_secs(10))
}

/// A rustls client config for the hub, with `client` as identity.
fn rustls_config(ca: &Path, client: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA certificate");
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(&c.cert)
                .expect("client certificate")
                .collect::<Result<_, _>>()
                .expect("client certificate");
            let key = PrivateKeyDer::from_pem_file(&c.key).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS connection that writes nothing after the handshake and reads the hub's first bytes: a
/// fatal alert when it refuses the client certificate (in TLS 1.3 the client's side of the
/// handshake completes before the server has checked its certificate), HTTP/2 `SETTINGS` when it
/// accepted it.
async fn handshake(port: u16, config: Arc<rustls::ClientConfig>) -> Outcome {
    let tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => return Outcome::Transport(chain(&e)),
    };
    let name = ServerName::try_from("localhost").expect("server name");
    let mut tls = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return Outcome::Handshake(chain(&e)),
    };
    let mut first = [0u8; 64];
    match tls.read(&mut first).await {
        Ok(0) => Outcome::Handshake("closed without an alert".into()),
        Ok(n) => Outcome::Handshake(format!("accepted: the hub sent {n} bytes")),
        Err(e) => Outcome::Handshake(chain(&e)),
    }
}

/// A heartbeat on a fresh gRPC connection: the handshake is what is tested.
async fn tls_call(port: u16, tls: ClientTlsConfig, body: Bytes) -> Outcome {
    match endpoint(port, tls).connect().await {
        Ok(mut channel) => raw_call(&mut channel, body, None).await,
        Err(e) => Outcome::Transport(chain(&e)),
    }
}

/// What every bad request did.
#[derive(Default)]
struct Tally {
    by_kind: BTreeMap<Kind, BTreeMap<String, usize>>,
    wrong: Vec<String>,
    invalid: usize,
    denied: usize,
}

struct Abuse {
    port: u16,
    mallory: Vec<Channel>,
    drone: Channel,
    /// Per TLS kind: a tonic config for heartbeats, a rustls config for read-only handshakes.
    tls: BTreeMap<Kind, (ClientTlsConfig, Arc<rustls::ClientConfig>)>,
    huge: Bytes,
    tally: Mutex<Tally>,
}

impl Abuse {
    async fn one(&self, i: usize) {
        let kind = kind_of(i);
        let request = build(kind, i, &self.huge);
        let call = async {
            match self.tls.get(&kind) {
                Some((_, rustls)) if i.is_multiple_of(2) => handshake(self.port, Arc::clone(rustls)).await,
                Some((tonic, _)) => tls_call(self.port, tonic.clone(), request.body.clone()).await,
                None => {
                    let mut channel = if request.as_drone {
                        self.drone.clone()
                    } else {
                        self.mallory[i % self.mallory.len()].clone()
                    };
                    raw_call(&mut channel, request.body.clone(), request.encoding).await
                }
            }
        };
        // Not a timing assertion: a hung request must fail the test instead of hanging it.
        let outcome = tokio::time::timeout(Duration::from_mins(1), call)
            .await
            .unwrap_or_else(|_| Outcome::Transport("no answer within 60 s".into()));
        let wrong = wrong_answer(kind, &request, &outcome);
        let mut t = self.tally.lock().expect("tally");
        *t.by_kind
            .entry(kind)
            .or_default()
            .entry(label(&outcome))
            .or_default() += 1;
        match outcome {
            Outcome::Status(Code::InvalidArgument, _) => t.invalid += 1,
            Outcome::Status(Code::PermissionDenied, _) => t.denied += 1,
            _ => {}
        }
        if let Some(w) = wrong
            && t.wrong.len() < 20
        {
            t.wrong.push(w);
        }
    }

    /// Bad requests `range`, `WORKERS` at a time.
    async fn run(self: &Arc<Self>, range: std::ops::Range<usize>) {
        let next = Arc::new(AtomicUsize::new(range.start));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..WORKERS {
            let (me, next, end) = (Arc::clone(self), Arc::clone(&next), range.end);
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    me.one(i).await;
                }
            });
        }
        while let Some(r) = workers.join_next().await {
            r.expect("abuse worker");
        }
    }
}

/// A good drone: heartbeats until `stop`, and at least 5 times once `started` (the abuse began);
/// every heartbeat must be answered. drone-3 reports a failed upgrade with over-long messages once.
async fn good_drone(
    id: &'static str,
    channel: Channel,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> Result<u64, String> {
    let mut client = HubServiceClient::new(channel);
    let mut during_abuse = 0u64;
    let mut acked = 0;
    for seq in 1u64.. {
        let mut hb = heartbeat(id, seq);
        if id == "drone-3" {
            let long = "é".repeat(3 * HUB_MAX_TEXT);
            hb.last_upgrade = Some(v1::LastUpgrade {
                upgrade_id: "up-0".into(),
                version: "0.9.0".into(),
                result: "rolled_back".into(),
                error_code: "health_check_failed".into(),
                error_message: format!("health check: {long}"),
                finished_unix: 1_700_000_000,
            });
            if acked < 1 {
                hb.events.push(v1::Event {
                    seq: 1,
                    time_unix_ms: 1_700_000_000_000,
                    upgrade_id: "up-0".into(),
                    phase: "idle".into(),
                    result: "rolled_back".into(),
                    error_code: "health_check_failed".into(),
                    message: format!("rolled back: {long}"),
                });
            }
        }
        let abusing = started.load(Ordering::SeqCst);
        match client.heartbeat(hb).await {
            Ok(r) => {
                acked = acked.max(r.into_inner().acked_seq);
                ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => return Err(format!("{id}: good heartbeat {seq} refused: {e:?}")),
        }
        if abusing {
            during_abuse += 1;
        }
        if stop.load(Ordering::SeqCst) && during_abuse >= 5 {
            return Ok(during_abuse);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!("the loop ends by returning")
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hub_refuses_10k_bad_requests_and_keeps_serving_good_drones_without_memory_growth() {
    let dir = tempfile::Builder::new()
        .prefix("flightnode-abuse-")
        .tempdir()
        .unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), "flightnode test fleet CA").unwrap();
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let mut hub = Hub::new(
        dir.path(),
        vec![
            "--tls-cert".into(),
            pki.server_cert.display().to_string(),
            "--tls-key".into(),
            pki.server_key.display().to_string(),
            "--client-ca".into(),
            pki.ca.display().to_string(),
        ],
    )
    .unwrap();
    hub.insecure = false;
    hub.start().unwrap();
    let pid = hub.pid().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = hub.grpc_port;
    let connect = |client: &ClientCert| {
        let tls = tls(&ca, Some(client));
        rt.block_on(async { endpoint(port, tls).connect().await })
            .unwrap_or_else(|e| panic!("{}: {}\nhub log:\n{}", client.id, chain(&e), hub.log()))
    };

    // The good drones start and keep heartbeating until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let good_ok = Arc::new(AtomicU64::new(0));
    let drones: Vec<_> = GOOD
        .iter()
        .map(|id| {
            let channel = connect(&pki.client(id).unwrap());
            rt.spawn(good_drone(
                id,
                channel,
                Arc::clone(&stop),
                Arc::clone(&started),
                Arc::clone(&good_ok),
            ))
        })
        .collect();
    for id in GOOD {
        hub_flightnode_or_panic(&hub, id);
    }

    let mallory = pki.client(MALLORY).unwrap();
    // The read-only handshake tells an accepted certificate from a refused one.
    let accepted = rt.block_on(handshake(port, rustls_config(&pki.ca, Some(&mallory))));
    assert!(
        matches!(&accepted, Outcome::Handshake(h) if h.starts_with("accepted")),
        "{accepted:?}"
    );
    let foreign = pki.foreign_client(GOOD[0]).unwrap();
    let expired = pki.expired_client(GOOD[0]).unwrap();
    let tls_kinds = [
        (Kind::ForeignCa, Some(&foreign)),
        (Kind::NoClientCert, None),
        (Kind::ExpiredCert, Some(&expired)),
    ];
    let abuse = Arc::new(Abuse {
        port,
        mallory: (0..4).map(|_| connect(&mallory)).collect(),
        drone: connect(&pki.client(GOOD[0]).unwrap()),
        tls: tls_kinds
            .into_iter()
            .map(|(kind, cert)| (kind, (tls(&ca, cert), rustls_config(&pki.ca, cert))))
            .collect(),
        huge: {
            let mut hb = forged(MALLORY);
            hb.agent_version = "h".repeat(5 << 20);
            message_frame(&hb.encode_to_vec())
        },
        tally: Mutex::new(Tally::default()),
    });

    started.store(true, Ordering::SeqCst);
    rt.block_on(abuse.run(0..WARMUP));
    let (rss_warm, _) = rss_kib(pid).unwrap();
    rt.block_on(abuse.run(WARMUP..TOTAL));
    let (rss_end, hwm) = rss_kib(pid).unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut beats_during_abuse = Vec::new();
    for d in drones {
        match rt.block_on(d).unwrap() {
            Ok(n) => beats_during_abuse.push(n),
            Err(e) => panic!("{e}\nhub log tail:\n{}", tail(&hub.log())),
        }
    }

    let tally = abuse.tally.lock().unwrap();
    eprintln!("bad requests by kind and answer:");
    for (kind, answers) in &tally.by_kind {
        eprintln!("  {kind:?}: {answers:?}");
    }
    eprintln!(
        "hub RSS: {rss_warm} KiB after {WARMUP} bad requests, {rss_end} KiB after {TOTAL} (peak {hwm} KiB); \
         good heartbeats during the abuse per drone: {beats_during_abuse:?}"
    );
    assert!(
        tally.wrong.is_empty(),
        "wrong answers:\n{}",
        tally.wrong.join("\n")
    );
    let counted: usize = tally.by_kind.values().flat_map(|a| a.values()).sum();
    assert_eq!(counted, TOTAL);
    assert_eq!(tally.by_kind.len(), MIX.len(), "every kind was sent");
    assert!(
        rss_end <= rss_warm + MAX_GROWTH_KIB,
        "hub RSS grew from {rss_warm} KiB to {rss_end} KiB over {} bad requests",
        TOTAL - WARMUP
    );

    // A fresh good drone connection is still served.
    let last = connect(&pki.client(GOOD[1]).unwrap());
    rt.block_on(async {
        HubServiceClient::new(last)
            .heartbeat(heartbeat(GOOD[1], 1_000))
            .await
            .expect("a good heartbeat after the abuse")
    });
    let good_total = good_ok.load(Ordering::SeqCst) + 1;

    // Only the good drones have FlightNodes, and what they reported is what the hub shows.
    let mut names: Vec<String> = hub
        .flightnodes()
        .unwrap()
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, GOOD);
    for id in GOOD {
        let node = hub_flightnode_or_panic(&hub, id);
        let status = &node["status"];
        assert_eq!(status["phase"], "Idle", "{id}: {node:#}");
        assert_eq!(status["firmware"]["committedVersion"], "1.0.0", "{id}: {node:#}");
        assert_eq!(status["agent"]["bootId"], format!("boot-{id}"), "{id}: {node:#}");
        assert_eq!(node["spec"]["hardwareId"], "cc-sim-v1", "{id}: {node:#}");
        assert_eq!(
            condition(&node, "Online").map(|c| c["status"].clone()),
            Some("True".into()),
            "{id}: {node:#}"
        );
        let events = hub.events(id).unwrap();
        if id == "drone-3" {
            assert_eq!(events.len(), 1, "{events:#?}");
            let message = events[0]["message"].as_str().unwrap_or("");
            assert!(
                message.starts_with("rolled back: é") && message.ends_with('…'),
                "{message}"
            );
            assert!(
                message.len() <= HUB_MAX_TEXT,
                "event message of {} bytes",
                message.len()
            );
            let error = status["lastUpgrade"]["errorMessage"].as_str().unwrap_or("");
            assert!(
                error.starts_with("health check: é") && error.ends_with('…'),
                "{error}"
            );
            assert!(
                error.len() <= HUB_MAX_TEXT,
                "error message of {} bytes",
                error.len()
            );
        } else {
            assert!(events.is_empty(), "{id}: {events:#?}");
        }
    }

    // The hub counted exactly the refusals its service made, and every good heartbeat.
    let metrics = http_get(hub.http_port, "/metrics").unwrap();
    let count = |result: &str| {
        metric(
            &metrics,
            &format!("flightnode_hub_heartbeats_received_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("ok"), good_total, "{metrics}");
    assert_eq!(count("invalid"), tally.invalid as u64, "{metrics}");
    assert_eq!(count("denied"), tally.denied as u64, "{metrics}");

    let log = hub.log();
    assert!(!log.contains("panicked"), "the hub panicked:\n{}", tail(&log));
    assert!(hub.running(), "the hub died:\n{}", tail(&log));
    hub.stop();
}

fn hub_flightnode_or_panic(hub: &Hub, id: &str) -> serde_json::Value {
    let mut found = None;
    flightnode_tests::fleet::wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        found = hub.flightnode(id).filter(|n| n["status"]["phase"].is_string());
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no FlightNode {id}; hub log:\n{}", tail(&hub.log())))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
