//! Bundle sources: a local file, or HTTP(S) with `Range` resume, bounded retries and idle timeouts.
//!
//! The upgrade engine runs synchronously on a blocking thread and reads the bundle through
//! [`std::io::Read`]; the network side runs as a task on the agent's tokio runtime. Between the two
//! sits a bounded channel of [`Bytes`] chunks (at most [`CHANNEL_CHUNKS`] × [`MAX_CHUNK`] bytes in
//! flight), so a slow consumer (flash writes) applies back-pressure to the download.
//!
//! HTTP behaviour of one [`Fetcher::open`]:
//! - `GET` with `Range: bytes=N-` when the offset `N` is not zero. A `200` answer to a `Range`
//!   request is accepted and its first `N` bytes are skipped; a `206` whose `Content-Range` does
//!   not start at `N` is an error; a `416` whose `Content-Range: bytes */N` says the bundle is
//!   exactly `N` bytes long is an empty remainder.
//! - Every wait for response headers or for the next body chunk is bounded by `idle_timeout`;
//!   connecting by `connect_timeout`. Redirects follow reqwest's default policy (at most 10).
//! - A dropped connection, an idle timeout, a `5xx`, `408` or `429`, or a body that ends before the
//!   announced total length is retried transparently with `Range` from the current position, after
//!   a jittered exponential backoff (`backoff`, doubling, capped at [`MAX_BACKOFF`]). Other `4xx`
//!   and protocol violations fail at once.
//! - At most `retries` failed attempts are retried in a row; an attempt that delivered at least
//!   [`PROGRESS_RESET`] new bytes resets that count (and the backoff), so a long download over a
//!   flaky link is not killed by drops spread over hours, while a server that never makes progress
//!   fails after `retries + 1` attempts.
//! - Dropping the [`BundleReader`] stops the background task and closes its connection.
//!
//! [`Fetcher::open`] blocks until the first response was accepted (or the source failed), so a
//! `404` is reported by `open` itself. `open` and [`BundleReader::read`](std::io::Read::read) block
//! the calling thread: call them from a plain thread or `spawn_blocking`, never from async code.

use crate::config::DownloadConfig;
use bytes::{Buf, Bytes};
use flightnode_proto::ErrorCode;
use flightnode_proto::backoff;
use flightnode_proto::error::Chain;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Largest chunk handed through the channel; bigger network chunks are split (cheaply).
pub const MAX_CHUNK: usize = 64 * 1024;
/// Capacity of the channel in chunks: at most `CHANNEL_CHUNKS * MAX_CHUNK` (2 MiB) in flight.
pub const CHANNEL_CHUNKS: usize = 32;
/// Upper bound of one backoff delay (unless `backoff` itself is larger).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An attempt that delivered at least this many new bytes resets the failed-attempt count.
pub const PROGRESS_RESET: u64 = 1024 * 1024;
/// reqwest's default redirect policy follows at most this many redirects.
pub const REDIRECT_LIMIT: usize = 10;

/// Why a bundle cannot be fetched. Every message names the URL or path.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The source is neither a path nor a usable http(s) URL.
    #[error("bundle source {source_str:?} is not a local path or an http(s) URL: {reason}")]
    InvalidSource {
        /// The source as given.
        source_str: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client cannot be built (TLS setup, bad config).
    #[error("cannot set up the bundle downloader: {0}")]
    Setup(String),
    /// A local bundle cannot be opened or positioned.
    #[error("cannot open bundle {path}")]
    OpenFile {
        /// Bundle path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A local bundle cannot be read.
    #[error("cannot read bundle {path} at byte {offset}")]
    ReadFile {
        /// Bundle path.
        path: PathBuf,
        /// Position of the failed read.
        offset: u64,
        /// Why.
        source: io::Error,
    },
    /// The server answered with an error status.
    #[error("GET {url}: HTTP {status}{}", if *.retryable { "" } else { " (not retried)" })]
    Status {
        /// Bundle URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// Whether this status is retried (5xx, 408, 429).
        retryable: bool,
    },
    /// No response headers or no body bytes for `idle_timeout`.
    #[error("GET {url}: no data for {} at byte {offset}", humantime::format_duration(*.timeout))]
    Idle {
        /// Bundle URL.
        url: String,
        /// The idle timeout.
        timeout: Duration,
        /// Bundle position when the wait started.
        offset: u64,
    },
    /// Connecting or sending the request failed (DNS, refused, TLS, connect timeout).
    #[error("GET {url}: request failed at byte {offset}: {reason}")]
    Request {
        /// Bundle URL.
        url: String,
        /// Bundle position of the request.
        offset: u64,
        /// Error chain.
        reason: String,
    },
    /// The connection broke while the body was streaming.
    #[error("GET {url}: connection lost at byte {offset}: {reason}")]
    Transfer {
        /// Bundle URL.
        url: String,
        /// Bundle position when it broke.
        offset: u64,
        /// Error chain.
        reason: String,
    },
    /// The body ended before the length the server announced.
    #[error("GET {url}: body ended at byte {offset} of {total}")]
    Truncated {
        /// Bundle URL.
        url: String,
        /// Bytes received so far.
        offset: u64,
        /// Announced total length.
        total: u64,
    },
    /// Too many redirects (reqwest's default limit, [`REDIRECT_LIMIT`]).
    #[error("GET {url}: too many redirects (limit {REDIRECT_LIMIT}): {reason}")]
    Redirect {
        /// Bundle URL.
        url: String,
        /// Error chain.
        reason: String,
    },
    /// The server broke the HTTP contract (wrong `Content-Range`, size changed between attempts…).
    #[error("GET {url}: {reason}")]
    Protocol {
        /// Bundle URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// Retryable failures exhausted the retry budget.
    #[error("GET {url}: gave up after {attempts} attempts: {}", .last.detail())]
    GaveUp {
        /// Bundle URL.
        url: String,
        /// Attempts made by this `open`.
        attempts: u32,
        /// The last attempt's failure.
        last: Box<DownloadError>,
    },
    /// The download task is gone (runtime shut down) or the reader already failed.
    #[error("GET {url}: download stopped: {reason}")]
    Stopped {
        /// Bundle URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl DownloadError {
    /// The protocol error code: always [`ErrorCode::DownloadFailed`].
    pub fn code(&self) -> ErrorCode {
        ErrorCode::DownloadFailed
    }

    /// The message without its `GET {url}: ` prefix (for nesting under a message that has it).
    fn detail(&self) -> String {
        let s = self.to_string();
        // URLs contain no spaces, so the first ": " after "GET <url>" ends the prefix.
        match s.strip_prefix("GET ").and_then(|rest| rest.split_once(": ")) {
            Some((_, detail)) => detail.to_owned(),
            None => s,
        }
    }

    /// Extracts a `DownloadError` carried by an I/O error from [`BundleReader`], if it is one.
    pub fn from_io(err: &io::Error) -> Option<&DownloadError> {
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<DownloadError>())
    }
}

/// Opens bundle sources. One per agent; cheap to share by reference across threads.
pub struct Fetcher {
    client: reqwest::Client,
    rt: tokio::runtime::Handle,
    cfg: DownloadConfig,
    received: Arc<AtomicU64>,
    stop: Option<StopCheck>,
}

/// Asked every [`STOP_POLL`] while a download runs; `true` ends it at once (cancel, shutdown),
/// even while the connection is stalled and no byte would reach the reader.
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often a running download asks its [`StopCheck`].
const STOP_POLL: Duration = Duration::from_millis(100);

impl Fetcher {
    /// Makes every later download end as soon as `stop` returns true.
    pub fn set_stop(&mut self, stop: StopCheck) {
        self.stop = Some(stop);
    }

    /// Builds the HTTP client (rustls with the ring provider, installed here if nothing was).
    pub fn new(cfg: &DownloadConfig, rt: tokio::runtime::Handle) -> Result<Self, DownloadError> {
        if cfg.idle_timeout.is_zero() {
            return Err(DownloadError::Setup(
                "download.idle_timeout must not be zero".into(),
            ));
        }
        // reqwest is built with `rustls-no-provider`: without a process-wide provider, building a
        // client panics. Installing fails harmlessly when main already installed one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(REDIRECT_LIMIT))
            .user_agent(concat!("flightnode-agent/", env!("CARGO_PKG_VERSION")));
        if !cfg.connect_timeout.is_zero() {
            builder = builder.connect_timeout(cfg.connect_timeout);
        }
        let client = builder
            .build()
            .map_err(|e| DownloadError::Setup(flightnode_proto::error::chain(&e)))?;
        Ok(Self {
            client,
            rt,
            cfg: cfg.clone(),
            received: Arc::new(AtomicU64::new(0)),
            stop: None,
        })
    }

    /// Opens `source` (a local path, or an http:// / https:// URL) at byte `offset`.
    ///
    /// The returned reader yields bundle bytes `[offset..EOF]`. Read errors carry the
    /// [`DownloadError`] as `std::io::Error::other(DownloadError)`; see [`DownloadError::from_io`].
    /// For HTTP this blocks until the server's first answer was accepted (including retries).
    pub fn open(&self, source: &str, offset: u64) -> Result<BundleReader, DownloadError> {
        match classify(source)? {
            Source::File(path) => open_file(path, offset),
            Source::Http(url) => self.open_http(url, offset),
        }
    }

    /// Network body bytes received by this fetcher (including bytes skipped after a `200`).
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn open_http(&self, url: reqwest::Url, offset: u64) -> Result<BundleReader, DownloadError> {
        let url_str = url.to_string();
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let task = HttpTask {
            client: self.client.clone(),
            url,
            url_str: url_str.clone(),
            idle: self.cfg.idle_timeout,
            retries: self.cfg.retries,
            backoff: self.cfg.backoff,
            received: self.received.clone(),
            tx: tx.clone(),
        };
        let log_url = url_str.clone();
        let stop = self.stop.clone();
        let stopped = async move {
            match stop {
                Some(stop) => loop {
                    if stop() {
                        break;
                    }
                    tokio::time::sleep(STOP_POLL).await;
                },
                None => std::future::pending().await,
            }
        };
        let task_handle = self.rt.spawn(async move {
            tokio::select! {
                () = tx.closed() => debug!(url = %log_url, "bundle reader dropped; download stopped"),
                () = stopped => debug!(url = %log_url, "download stopped (cancel or shutdown)"),
                () = task.run(offset) => {}
            }
        });
        let mut reader = HttpReader {
            url: url_str,
            rx,
            cur: Bytes::new(),
            state: ReadState::Open,
            task: task_handle,
        };
        // Wait for the first accepted response (or the final error).
        loop {
            match reader.rx.blocking_recv() {
                Some(Msg::Started { total }) => {
                    return Ok(BundleReader {
                        total,
                        inner: Inner::Http(reader),
                    });
                }
                Some(Msg::Err(e)) => return Err(e),
                Some(Msg::Data(b)) => reader.cur = b,
                Some(Msg::End) => reader.state = ReadState::Done,
                None => {
                    return Err(DownloadError::Stopped {
                        url: reader.url.clone(),
                        reason: "the download task ended before the server answered (runtime shut down?)"
                            .into(),
                    });
                }
            }
        }
    }
}

/// The bundle bytes from the offset given to [`Fetcher::open`] to the end.
pub struct BundleReader {
    total: Option<u64>,
    inner: Inner,
}

impl BundleReader {
    /// Length of the whole bundle (not of the remainder), when the source knows it.
    pub fn total_len(&self) -> Option<u64> {
        self.total
    }
}

impl std::fmt::Debug for BundleReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.inner {
            Inner::File(r) => r.path.display().to_string(),
            Inner::Http(r) => r.url.clone(),
        };
        f.debug_struct("BundleReader")
            .field("source", &source)
            .field("total", &self.total)
            .finish()
    }
}

impl Read for BundleReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::File(r) => r.read(buf),
            Inner::Http(r) => r.read(buf),
        }
    }
}

enum Inner {
    File(FileReader),
    Http(HttpReader),
}

enum Source {
    File(PathBuf),
    Http(reqwest::Url),
}

fn classify(source: &str) -> Result<Source, DownloadError> {
    let invalid = |reason: String| DownloadError::InvalidSource {
        source_str: source.to_owned(),
        reason,
    };
    if source.is_empty() {
        return Err(invalid("empty".into()));
    }
    let Some((scheme, rest)) = source.split_once("://") else {
        return Ok(Source::File(PathBuf::from(source)));
    };
    let looks_like_scheme = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !looks_like_scheme {
        return Ok(Source::File(PathBuf::from(source)));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "https" => reqwest::Url::parse(source)
            .map(Source::Http)
            .map_err(|e| invalid(e.to_string())),
        "file" => Ok(Source::File(PathBuf::from(rest))),
        other => Err(invalid(format!("unsupported scheme {other:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Local files

struct FileReader {
    file: File,
    path: PathBuf,
    pos: u64,
}

fn open_file(path: PathBuf, offset: u64) -> Result<BundleReader, DownloadError> {
    let fail = |path: &PathBuf, source: io::Error| DownloadError::OpenFile {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(|e| fail(&path, e))?;
    let meta = file.metadata().map_err(|e| fail(&path, e))?;
    if meta.is_dir() {
        return Err(fail(
            &path,
            io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
        ));
    }
    // Block devices report 0 here; only check regular files.
    let total = meta.is_file().then_some(meta.len());
    if let Some(len) = total
        && offset > len
    {
        return Err(fail(
            &path,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is past the end of the {len}-byte file"),
            ),
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| fail(&path, e))?;
    Ok(BundleReader {
        total,
        inner: Inner::File(FileReader {
            file,
            path,
            pos: offset,
        }),
    })
}

impl FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.file.read(buf) {
            Ok(n) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(source) => Err(io::Error::other(DownloadError::ReadFile {
                path: self.path.clone(),
                offset: self.pos,
                source,
            })),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: blocking side

enum Msg {
    /// The first response was accepted; `total` is the whole bundle's length if known.
    Started {
        total: Option<u64>,
    },
    Data(Bytes),
    End,
    Err(DownloadError),
}

enum ReadState {
    Open,
    Done,
    Failed(String),
}

struct HttpReader {
    url: String,
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    state: ReadState,
    task: JoinHandle<()>,
}

impl HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.cur.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Ok(n);
            }
            match &self.state {
                ReadState::Open => {}
                ReadState::Done => return Ok(0),
                ReadState::Failed(reason) => {
                    return Err(io::Error::other(DownloadError::Stopped {
                        url: self.url.clone(),
                        reason: format!("already failed: {reason}"),
                    }));
                }
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.cur = b,
                Some(Msg::Started { .. }) => {}
                Some(Msg::End) => self.state = ReadState::Done,
                Some(Msg::Err(e)) => {
                    self.state = ReadState::Failed(flightnode_proto::error::chain(&e));
                    return Err(io::Error::other(e));
                }
                None => {
                    let e = DownloadError::Stopped {
                        url: self.url.clone(),
                        reason: "the download task ended unexpectedly (runtime shut down?)".into(),
                    };
                    self.state = ReadState::Failed(flightnode_proto::error::chain(&e));
                    return Err(io::Error::other(e));
                }
            }
        }
    }
}

impl Drop for HttpReader {
    fn drop(&mut self) {
        // Dropping `rx` also wakes the task's `tx.closed()`; aborting stops it even mid-connect.
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: async side

struct HttpTask {
    client: reqwest::Client,
    url: reqwest::Url,
    url_str: String,
    idle: Duration,
    retries: u32,
    backoff: Duration,
    received: Arc<AtomicU64>,
    tx: mpsc::Sender<Msg>,
}

/// Download state carried across attempts.
struct Progress {
    pos: u64,
    total: Option<u64>,
    started: bool,
}

enum Outcome {
    Done,
    ReaderGone,
}

enum Failure {
    Retry(DownloadError),
    Fatal(DownloadError),
}

impl HttpTask {
    async fn run(self, offset: u64) {
        let mut p = Progress {
            pos: offset,
            total: None,
            started: false,
        };
        let mut attempt: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            info!(url = %self.url_str, offset = p.pos, attempt, "downloading bundle");
            let before = p.pos;
            let err = match self.attempt(&mut p).await {
                Ok(Outcome::Done) => {
                    info!(url = %self.url_str, offset = p.pos, attempt, "bundle download complete");
                    let _ = self.tx.send(Msg::End).await;
                    return;
                }
                Ok(Outcome::ReaderGone) => {
                    debug!(url = %self.url_str, offset = p.pos, attempt, "bundle reader dropped");
                    return;
                }
                Err(Failure::Fatal(e)) => {
                    warn!(url = %self.url_str, offset = p.pos, attempt, error = %Chain(&e), "bundle download failed");
                    let _ = self.tx.send(Msg::Err(e)).await;
                    return;
                }
                Err(Failure::Retry(e)) => e,
            };
            if p.pos.saturating_sub(before) >= PROGRESS_RESET {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            if failures > self.retries {
                let e = DownloadError::GaveUp {
                    url: self.url_str.clone(),
                    attempts: attempt,
                    last: Box::new(err),
                };
                warn!(url = %self.url_str, offset = p.pos, attempt, error = %Chain(&e), "bundle download failed");
                let _ = self.tx.send(Msg::Err(e)).await;
                return;
            }
            let delay = backoff_delay(self.backoff, failures);
            warn!(url = %self.url_str, offset = p.pos, attempt, error = %Chain(&err),
                retry_in = ?delay, "bundle download attempt failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, p: &mut Progress) -> Result<Outcome, Failure> {
        let url = &self.url_str;
        let mut req = self.client.get(self.url.clone());
        if p.pos > 0 {
            req = req.header(RANGE, format!("bytes={}-", p.pos));
        }
        let resp = match tokio::time::timeout(self.idle, req.send()).await {
            Err(_) => {
                return Err(Failure::Retry(DownloadError::Idle {
                    url: url.clone(),
                    timeout: self.idle,
                    offset: p.pos,
                }));
            }
            Ok(Err(e)) if e.is_redirect() => {
                return Err(Failure::Fatal(DownloadError::Redirect {
                    url: url.clone(),
                    reason: flightnode_proto::error::chain(&e.without_url()),
                }));
            }
            Ok(Err(e)) => {
                return Err(Failure::Retry(DownloadError::Request {
                    url: url.clone(),
                    offset: p.pos,
                    reason: flightnode_proto::error::chain(&e.without_url()),
                }));
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        let protocol = |reason: String| {
            Failure::Fatal(DownloadError::Protocol {
                url: url.clone(),
                reason,
            })
        };
        let mut skip: u64 = 0;
        match status {
            StatusCode::OK => {
                let len = resp.content_length();
                self.check_total(p, len)?;
                if p.pos > 0 {
                    if let Some(len) = len
                        && len < p.pos
                    {
                        return Err(protocol(format!(
                            "server ignored Range bytes={}- and sent all {len} bytes of the bundle",
                            p.pos
                        )));
                    }
                    warn!(url = %url, offset = p.pos, "server ignored Range (200); skipping the first {} bytes", p.pos);
                    skip = p.pos;
                }
            }
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(&resp, CONTENT_RANGE);
                let (start, total) = cr.as_deref().and_then(parse_content_range).ok_or_else(|| {
                    protocol(format!(
                        "206 with unusable Content-Range {cr:?} for Range bytes={}-",
                        p.pos
                    ))
                })?;
                if start != p.pos {
                    return Err(protocol(format!(
                        "206 with Content-Range {:?} for Range bytes={}-",
                        cr.unwrap_or_default(),
                        p.pos
                    )));
                }
                self.check_total(p, total)?;
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let cr = header_str(&resp, CONTENT_RANGE);
                let size = cr.as_deref().and_then(parse_unsatisfied_range);
                if size == Some(p.pos) && p.pos > 0 {
                    // The bundle is exactly `pos` bytes long: nothing left to read.
                    self.check_total(p, size)?;
                    if !self.start(p).await {
                        return Ok(Outcome::ReaderGone);
                    }
                    return Ok(Outcome::Done);
                }
                return Err(Failure::Fatal(DownloadError::Status {
                    url: url.clone(),
                    status,
                    retryable: false,
                }));
            }
            s if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS =>
            {
                return Err(Failure::Retry(DownloadError::Status {
                    url: url.clone(),
                    status,
                    retryable: true,
                }));
            }
            _ => {
                return Err(Failure::Fatal(DownloadError::Status {
                    url: url.clone(),
                    status,
                    retryable: false,
                }));
            }
        }
        if resp.url() != &self.url {
            debug!(url = %url, final_url = %resp.url(), "bundle request was redirected");
        }
        if !self.start(p).await {
            return Ok(Outcome::ReaderGone);
        }

        let mut stream = resp.bytes_stream();
        loop {
            let Ok(next) = tokio::time::timeout(self.idle, stream.next()).await else {
                return Err(Failure::Retry(DownloadError::Idle {
                    url: url.clone(),
                    timeout: self.idle,
                    offset: p.pos,
                }));
            };
            let mut chunk = match next {
                None => {
                    if let Some(total) = p.total
                        && p.pos < total
                    {
                        return Err(Failure::Retry(DownloadError::Truncated {
                            url: url.clone(),
                            offset: p.pos,
                            total,
                        }));
                    }
                    return Ok(Outcome::Done);
                }
                Some(Err(e)) => {
                    return Err(Failure::Retry(DownloadError::Transfer {
                        url: url.clone(),
                        offset: p.pos,
                        reason: flightnode_proto::error::chain(&e.without_url()),
                    }));
                }
                Some(Ok(chunk)) => chunk,
            };
            self.received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if skip > 0 {
                let n = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                chunk.advance(n);
                skip -= n as u64;
            }
            if let Some(total) = p.total
                && p.pos + chunk.len() as u64 > total
            {
                return Err(protocol(format!(
                    "server sent more than the {total} bytes it announced"
                )));
            }
            while !chunk.is_empty() {
                let part = chunk.split_to(chunk.len().min(MAX_CHUNK));
                p.pos += part.len() as u64;
                if self.tx.send(Msg::Data(part)).await.is_err() {
                    return Ok(Outcome::ReaderGone);
                }
            }
        }
    }

    /// Tells the reader the first response was accepted. False when the reader is gone.
    async fn start(&self, p: &mut Progress) -> bool {
        if p.started {
            return true;
        }
        p.started = true;
        self.tx.send(Msg::Started { total: p.total }).await.is_ok()
    }

    /// Records the bundle's total length; a length that changes between attempts is fatal.
    fn check_total(&self, p: &mut Progress, total: Option<u64>) -> Result<(), Failure> {
        match (p.total, total) {
            (Some(old), Some(new)) if old != new => Err(Failure::Fatal(DownloadError::Protocol {
                url: self.url_str.clone(),
                reason: format!("bundle size changed from {old} to {new} bytes between attempts"),
            })),
            (None, Some(new)) => {
                p.total = Some(new);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn header_str(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `bytes START-END/TOTAL` or `bytes START-END/*` → (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, total))
}

/// `bytes */TOTAL` (the `Content-Range` of a 416) → TOTAL.
fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes")?
        .trim_start()
        .strip_prefix("*/")?
        .trim()
        .parse()
        .ok()
}

/// Backoff before retry number `n` (1-based): `base * 2^(n-1)`, capped, with "equal jitter"
/// (uniform in `[d/2, d]`), so a fleet that lost its server does not come back in lockstep.
fn backoff_delay(base: Duration, n: u32) -> Duration {
    let d = backoff::exponential(base, n, MAX_BACKOFF.max(base));
    backoff::equal_jitter(d, rand::random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_unsatisfied_range("bytes */10"), Some(10));
        assert_eq!(parse_unsatisfied_range("bytes 0-1/10"), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let d1 = backoff_delay(base, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d3 = backoff_delay(base, 3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let big = backoff_delay(base, 40);
            assert!(big >= MAX_BACKOFF / 2 && big <= MAX_BACKOFF, "{big:?}");
        }
        assert_eq!(backoff_delay(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn sources_are_classified() {
        assert!(matches!(classify("/data/x.fnb"), Ok(Source::File(_))));
        assert!(matches!(classify("rel/x.fnb"), Ok(Source::File(_))));
        assert!(
            matches!(classify("file:///data/x.fnb"), Ok(Source::File(p)) if p == std::path::Path::new("/data/x.fnb"))
        );
        assert!(matches!(classify("https://h.example/x.fnb"), Ok(Source::Http(_))));
        assert!(matches!(classify("HTTP://h.example/x"), Ok(Source::Http(_))));
        let err = classify("ftp://h.example/x").err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("ftp")), "{err:?}");
        assert!(classify("").is_err());
    }

    #[test]
    fn messages_name_the_url_and_say_whether_retried() {
        let e = DownloadError::Status {
            url: "http://h/b.fnb".into(),
            status: StatusCode::NOT_FOUND,
            retryable: false,
        };
        assert_eq!(
            e.to_string(),
            "GET http://h/b.fnb: HTTP 404 Not Found (not retried)"
        );
        let e = DownloadError::Idle {
            url: "http://h/b.fnb".into(),
            timeout: Duration::from_secs(30),
            offset: 7,
        };
        assert_eq!(e.to_string(), "GET http://h/b.fnb: no data for 30s at byte 7");
        assert_eq!(e.code(), ErrorCode::DownloadFailed);
        let e = DownloadError::GaveUp {
            url: "http://h:8/b.fnb".into(),
            attempts: 6,
            last: Box::new(e),
        };
        assert_eq!(
            e.to_string(),
            "GET http://h:8/b.fnb: gave up after 6 attempts: no data for 30s at byte 7"
        );
    }
}
