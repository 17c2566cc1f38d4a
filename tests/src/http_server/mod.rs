//! A small fault-injecting HTTP/1.1 server for bundles, bound to `127.0.0.1:0`.
//!
//! It serves byte blobs at paths, honours `Range: bytes=N-` (and `bytes=N-M`) with
//! `206` + `Content-Range` + `Content-Length` (`416` past the end), answers every request with
//! `Connection: close`, and injects [`Fault`]s configured per path, changeable while it runs.
//! It counts body bytes sent (total and per path), the requests seen with their `Range` header,
//! and the connections currently open.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use flightnode_tests::http_server::{BundleServer, Fault};
//! let srv = BundleServer::start().await?;          // or BundleServer::start_blocking()? in sync code
//! srv.put("/b.fnb", vec![7u8; 1 << 20]);
//! srv.set_fault("/b.fnb", Fault::CutAt { offset: 1000, times: 1 });
//! let url = srv.url("/b.fnb");                      // http://127.0.0.1:PORT/b.fnb
//! // ... download ...
//! assert!(srv.requests_for("/b.fnb").iter().any(|r| r.range.as_deref() == Some("bytes=1001-")));
//! assert!(srv.bytes_sent_for("/b.fnb") < 3 * (1 << 20) / 2);
//! # Ok(()) }
//! ```
//!
//! The server stops (and closes every connection) when the [`BundleServer`] is dropped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

mod fault;

pub use fault::Fault;
use fault::{After, FaultSlot, Plan, plan};

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, …
    pub method: String,
    /// Request target as sent, query included.
    pub target: String,
    /// Path without the query (the key for `put`/`set_fault`).
    pub path: String,
    /// The `Range` header, verbatim.
    pub range: Option<String>,
    /// Status answered (0 when no answer was sent).
    pub status: u16,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Arc<Vec<u8>>>,
    faults: HashMap<String, FaultSlot>,
    sequences: HashMap<String, std::collections::VecDeque<Fault>>,
    sent_per_path: HashMap<String, u64>,
    requests: Vec<RequestRecord>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    bytes_sent: AtomicU64,
    open_connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count(&self, path: &str, n: u64) {
        self.bytes_sent.fetch_add(n, Ordering::Relaxed);
        *self.lock().sent_per_path.entry(path.to_owned()).or_default() += n;
    }
}

/// The running server. Dropping it stops it.
pub struct BundleServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BundleServer {
    /// Starts the server as a task on the current tokio runtime.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(serve(listener, shared.clone(), rx));
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            thread: None,
        })
    }

    /// Starts the server on its own runtime thread, for synchronous tests.
    pub fn start_blocking() -> io::Result<Self> {
        Self::start_blocking_on(([127, 0, 0, 1], 0).into())
    }

    /// [`start_blocking`](Self::start_blocking) listening on `bind` instead of loopback. The
    /// socket is made on the calling thread, so a thread that entered another network namespace
    /// serves from there (the link tests' server namespace).
    pub fn start_blocking_on(bind: SocketAddr) -> io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(bind)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bundle-server")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = oneshot::channel();
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bundle-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => serve(listener, task_shared, rx).await,
                        Err(e) => eprintln!("bundle server: {e}"),
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, normalize(path))
    }

    /// Serves `bytes` at `path` (replacing what was there).
    pub fn put(&self, path: &str, bytes: impl Into<Vec<u8>>) {
        self.shared
            .lock()
            .files
            .insert(normalize(path), Arc::new(bytes.into()));
    }

    /// Serves the contents of `file` at `path`.
    pub fn put_file(&self, path: &str, file: impl AsRef<Path>) -> io::Result<()> {
        let bytes = std::fs::read(file)?;
        self.put(path, bytes);
        Ok(())
    }

    /// Stops serving `path` (404 from now on).
    pub fn remove(&self, path: &str) {
        self.shared.lock().files.remove(&normalize(path));
    }

    /// Sets the fault for `path` until changed (`CutAt` still clears itself after `times` cuts).
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.set_slot(path, fault, None);
    }

    /// Sets the fault for the next `requests` requests to `path`, then serves normally.
    pub fn set_fault_times(&self, path: &str, fault: Fault, requests: u32) {
        self.set_slot(path, fault, Some(requests));
    }

    /// Gives the next requests to `path` one fault each, in order (`Fault::None` serves one
    /// request normally); when the sequence is used up, the fault set by
    /// [`set_fault`](Self::set_fault) applies again (normally: none). A `CutAt` in a sequence
    /// is used up by its request whether or not its range covered the offset.
    pub fn set_fault_sequence(&self, path: &str, faults: impl IntoIterator<Item = Fault>) {
        self.shared
            .lock()
            .sequences
            .insert(normalize(path), faults.into_iter().collect());
    }

    /// Serves `path` normally again (clears the fault and any sequence).
    pub fn clear_fault(&self, path: &str) {
        let mut st = self.shared.lock();
        st.faults.remove(&normalize(path));
        st.sequences.remove(&normalize(path));
    }

    fn set_slot(&self, path: &str, fault: Fault, remaining: Option<u32>) {
        self.shared
            .lock()
            .faults
            .insert(normalize(path), FaultSlot { fault, remaining });
    }

    /// Body bytes written to clients, all paths.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::Relaxed)
    }

    /// Body bytes written to clients for `path`.
    pub fn bytes_sent_for(&self, path: &str) -> u64 {
        self.shared
            .lock()
            .sent_per_path
            .get(&normalize(path))
            .copied()
            .unwrap_or(0)
    }

    /// Every request seen, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// The requests for `path` (query ignored).
    pub fn requests_for(&self, path: &str) -> Vec<RequestRecord> {
        let path = normalize(path);
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests and byte counts.
    pub fn reset_counters(&self) {
        let mut st = self.shared.lock();
        st.requests.clear();
        st.sent_per_path.clear();
        self.shared.bytes_sent.store(0, Ordering::Relaxed);
    }

    /// Client connections currently open.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Polls (blocking the thread) until at most `n` connections are open; false on timeout.
    /// For synchronous tests; in async code poll [`open_connections`](Self::open_connections).
    pub fn wait_connections_at_most(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.open_connections() <= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn normalize(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    shared.open_connections.fetch_add(1, Ordering::Relaxed);
                    let guard = ConnGuard(shared.clone());
                    conns.spawn(async move {
                        let _ = handle(stream, &guard.0).await;
                        drop(guard);
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
        while conns.try_join_next().is_some() {}
    }
    // Dropping the JoinSet aborts every connection task.
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Request {
    method: String,
    target: String,
    path: String,
    range: Option<String>,
}

async fn read_request(stream: &mut TcpStream) -> io::Result<Option<Request>> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 {
            return Ok(None);
        }
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let range = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("range")
            .then(|| value.trim().to_owned())
    });
    Ok(Some(Request {
        method,
        target,
        path,
        range,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn head(status: u16, headers: &[(String, String)], with_length: bool) -> Vec<u8> {
    let mut s = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        let _ = write!(s, "{k}: {v}\r\n");
    }
    if with_length {
        s.push_str("Content-Length: 0\r\n");
    }
    s.push_str("Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
    s.into_bytes()
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let Some(req) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let plan = {
        let mut st = shared.lock();
        let plan = plan(&mut st, &req);
        let status = match &plan {
            Plan::Bare { status, .. } | Plan::Body { status, .. } => *status,
            Plan::Hang => 0,
        };
        st.requests.push(RequestRecord {
            method: req.method.clone(),
            target: req.target.clone(),
            path: req.path.clone(),
            range: req.range.clone(),
            status,
        });
        plan
    };
    match plan {
        Plan::Hang => wait_for_close(&mut stream).await,
        Plan::Bare { status, headers } => {
            stream.write_all(&head(status, &headers, true)).await?;
            stream.shutdown().await
        }
        Plan::Body {
            status,
            headers,
            data,
            from,
            to,
            slow,
            after,
        } => {
            stream.write_all(&head(status, &headers, false)).await?;
            let body = data.get(from..to.max(from)).unwrap_or_default();
            match slow {
                Some(interval) => {
                    for b in body.chunks(1) {
                        stream.write_all(b).await?;
                        shared.count(&req.path, 1);
                        tokio::time::sleep(interval).await;
                    }
                }
                None => {
                    for chunk in body.chunks(16 * 1024) {
                        stream.write_all(chunk).await?;
                        shared.count(&req.path, chunk.len() as u64);
                    }
                }
            }
            match after {
                After::Close => stream.shutdown().await,
                After::Stall => wait_for_close(&mut stream).await,
                After::Endless => {
                    let filler = vec![0xEEu8; 16 * 1024];
                    loop {
                        stream.write_all(&filler).await?;
                        shared.count(&req.path, filler.len() as u64);
                    }
                }
            }
        }
    }
}

/// Holds the connection silently until the client closes it.
async fn wait_for_close(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 512];
    loop {
        if stream.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    async fn get(addr: SocketAddr, path: &str, range: Option<&str>) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
        if let Some(r) = range {
            let _ = write!(req, "Range: {r}\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_ranges_and_faults() {
        let srv = BundleServer::start().await.unwrap();
        srv.put("/b", b"0123456789".to_vec());
        let r = get(srv.addr(), "/b", None).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("\r\n\r\n0123456789"), "{r}");
        let r = get(srv.addr(), "/b", Some("bytes=4-")).await;
        assert!(r.starts_with("HTTP/1.1 206"), "{r}");
        assert!(r.contains("Content-Range: bytes 4-9/10\r\n"), "{r}");
        assert!(r.contains("Content-Length: 6\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n456789"), "{r}");
        let r = get(srv.addr(), "/b", Some("bytes=10-")).await;
        assert!(r.starts_with("HTTP/1.1 416"), "{r}");
        assert!(r.contains("Content-Range: bytes */10"), "{r}");
        assert!(get(srv.addr(), "/nope", None).await.starts_with("HTTP/1.1 404"));

        srv.set_fault("/b", Fault::CutAt { offset: 5, times: 1 });
        let r = get(srv.addr(), "/b", Some("bytes=2-")).await;
        assert!(r.ends_with("\r\n\r\n2345"), "{r}");
        let r = get(srv.addr(), "/b", Some("bytes=6-")).await;
        assert!(r.ends_with("\r\n\r\n6789"), "cut applies once: {r}");

        srv.set_fault_times("/b", Fault::Status(503), 1);
        assert!(get(srv.addr(), "/b", None).await.starts_with("HTTP/1.1 503"));
        assert!(get(srv.addr(), "/b", None).await.starts_with("HTTP/1.1 200"));

        srv.set_fault("/b", Fault::IgnoreRange);
        let r = get(srv.addr(), "/b", Some("bytes=3-")).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("0123456789"), "{r}");

        srv.set_fault("/b", Fault::RedirectLoop);
        let r = get(srv.addr(), "/b?loop=3", None).await;
        assert!(r.contains("Location: /b?loop=4\r\n"), "{r}");

        let reqs = srv.requests_for("/b");
        assert_eq!(reqs.len(), 9);
        assert_eq!(reqs[1].range.as_deref(), Some("bytes=4-"));
        assert_eq!(reqs[1].status, 206);
        assert_eq!(srv.bytes_sent_for("/b"), 10 + 6 + 4 + 4 + 10 + 10);
        assert_eq!(srv.bytes_sent(), srv.bytes_sent_for("/b"));
    }

    #[test]
    fn blocking_server_stops_when_dropped() {
        let srv = BundleServer::start_blocking().unwrap();
        srv.put("/b", vec![1u8; 100]);
        srv.set_fault("/b", Fault::Stall { after: 10 });
        let addr = srv.addr();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /b HTTP/1.1\r\n\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while srv.open_connections() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!srv.wait_connections_at_most(0, Duration::from_millis(200)));
        drop(srv);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
