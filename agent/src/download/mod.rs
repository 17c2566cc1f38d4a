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
//! - A bounded range (`Range: bytes=N-M`) is never asked past the end of the bundle once its
//!   length is known; a `206` whose `Content-Range` ends at the bundle's last byte, before the
//!   range asked for, is the whole remainder (HTTP answers a range past the end that way).
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
use flightnode_proto::ErrorCode;
use reqwest::StatusCode;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

mod file;
mod http;

use file::{FileReader, open_file};
use http::HttpReader;

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
    /// A `Range` request for part of the bundle was answered with the whole bundle (`200`).
    #[error(
        "GET {url}: the server ignored Range bytes={start}-{last} and sent the whole bundle; chunked bundles need a server with Range support"
    )]
    RangeIgnored {
        /// Bundle URL.
        url: String,
        /// First byte asked for.
        start: u64,
        /// Last byte asked for.
        last: u64,
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
    /// An https:// bundle (or a redirect to one), but the system has no usable CA root
    /// certificates to verify the server with. Plain http:// keeps working: the bundle's
    /// signature, not the transport, is what the agent trusts.
    #[error(
        "GET {url}: cannot verify an https:// server without CA root certificates ({reason}); install the ca-certificates package (or set SSL_CERT_FILE to a PEM bundle) and restart the agent, or serve the bundle over http://"
    )]
    NoCaRoots {
        /// The https:// URL.
        url: String,
        /// Why the system's roots are unusable.
        reason: String,
    },
    /// The link policy holds the download (a metered link, outside the window): it stopped at
    /// `offset`, keeping what it has; the engine waits and resumes it.
    #[error("GET {url}: paused at byte {offset}: {why}")]
    Held {
        /// Bundle URL.
        url: String,
        /// Bundle position where it stopped.
        offset: u64,
        /// The wait reason.
        reason: flightnode_proto::WaitReason,
        /// What the policy saw (the interface, the local time).
        why: String,
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
    /// The protocol error code: [`ErrorCode::RangeUnsupported`] for a server that ignores a
    /// bounded `Range`, else [`ErrorCode::DownloadFailed`].
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::RangeIgnored { .. } => ErrorCode::RangeUnsupported,
            _ => ErrorCode::DownloadFailed,
        }
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
    /// Why https:// cannot be verified (the system has no usable CA roots); `None` when it can.
    no_roots: Option<Arc<str>>,
    rt: tokio::runtime::Handle,
    cfg: DownloadConfig,
    received: Arc<AtomicU64>,
    stop: Option<StopCheck>,
    /// `[download]` link policy, when it can hold or slow anything.
    link: Option<Arc<crate::netpolicy::LinkPolicy>>,
    /// Set when the link policy stopped a download ([`DownloadError::Held`]).
    held: Arc<AtomicBool>,
    /// The rate cap's token bucket, shared by every download of this fetcher.
    pace: http::Pace,
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
        let builder = || {
            let mut builder = reqwest::Client::builder()
                .user_agent(concat!("flightnode-agent/", env!("CARGO_PKG_VERSION")));
            if !cfg.connect_timeout.is_zero() {
                builder = builder.connect_timeout(cfg.connect_timeout);
            }
            builder
        };
        // Building the client loads the system's CA roots (rustls-platform-verifier) and fails
        // when there are none, e.g. on a board image without ca-certificates. That must not stop
        // the agent: http:// bundles need no roots, so only https:// downloads fail, each with
        // an error that says what to install.
        let (client, no_roots) = match builder()
            .redirect(reqwest::redirect::Policy::limited(REDIRECT_LIMIT))
            .build()
        {
            Ok(client) => (client, None),
            Err(e) => {
                let reason: Arc<str> = error_chain(&e).into();
                let client = builder()
                    .redirect(no_roots_redirects(reason.clone()))
                    .tls_certs_only(std::iter::empty())
                    .build()
                    .map_err(|e| DownloadError::Setup(error_chain(&e)))?;
                tracing::warn!(reason = %reason,
                    "no usable CA root certificates: https:// bundle downloads will fail until ca-certificates is installed; http:// works");
                (client, Some(reason))
            }
        };
        Ok(Self {
            client,
            no_roots,
            rt,
            cfg: cfg.clone(),
            received: Arc::new(AtomicU64::new(0)),
            stop: None,
            link: Some(Arc::new(crate::netpolicy::LinkPolicy::new(cfg))).filter(|l| l.is_active()),
            held: Arc::new(AtomicBool::new(false)),
            pace: http::Pace::default(),
        })
    }

    /// The HTTP client downloads use (TUF metadata is fetched with it too).
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// The runtime the downloads run on.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.rt.clone()
    }

    /// Opens `source` (a local path, or an http:// / https:// URL) at byte `offset`.
    ///
    /// The returned reader yields bundle bytes `[offset..EOF]`. Read errors carry the
    /// [`DownloadError`] as `std::io::Error::other(DownloadError)`; see [`DownloadError::from_io`].
    /// For HTTP this blocks until the server's first answer was accepted (including retries).
    pub fn open(&self, source: &str, offset: u64) -> Result<BundleReader, DownloadError> {
        match classify(source)? {
            Source::File(path) => open_file(path, offset),
            Source::Http(url) => self.open_http(url, offset, None, false),
        }
    }

    /// Like [`open`](Self::open) at offset 0, but over HTTP the first request asks only for
    /// `head` bytes, and each next part (doubling, up to 8 MiB, then the rest) only once the
    /// reader has taken the previous one: a caller that stops after the bundle header (a chunked
    /// bundle) leaves little in flight. A server that ignores `Range` here is read as a plain
    /// stream.
    pub fn open_head(&self, source: &str, head: u64) -> Result<BundleReader, DownloadError> {
        match classify(source)? {
            Source::File(path) => open_file(path, 0),
            Source::Http(url) => self.open_http(url, 0, Some(head), true),
        }
    }

    /// Opens bundle bytes `[start, start + len)` only: over HTTP one `Range: bytes=start-end`
    /// request (resumed from where it broke, like [`open`](Self::open)); a server that answers
    /// with the whole bundle fails with [`DownloadError::RangeIgnored`] instead of being read.
    /// The reader ends after `len` bytes.
    pub fn open_range(&self, source: &str, start: u64, len: u64) -> Result<BundleReader, DownloadError> {
        let mut reader = match classify(source)? {
            Source::File(path) => open_file(path, start)?,
            Source::Http(url) => self.open_http(url, start, Some(start.saturating_add(len)), false)?,
        };
        reader.remaining = Some(len);
        Ok(reader)
    }

    /// The link policy, when `[download]` sets one.
    pub fn link_policy(&self) -> Option<&crate::netpolicy::LinkPolicy> {
        self.link.as_deref()
    }

    /// Whether the link policy stopped a download since [`clear_held`](Self::clear_held): the
    /// error that follows is a pause, not a failure.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Forgets an earlier hold (the engine waited it out).
    pub fn clear_held(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Network body bytes received by this fetcher (including bytes skipped after a `200`).
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// reqwest's default redirect policy, except that a redirect to https:// fails with
/// [`NoCaRootsRedirect`] (the client has no roots to verify it with).
fn no_roots_redirects(reason: Arc<str>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.url().scheme() == "https" {
            let error = NoCaRootsRedirect {
                url: attempt.url().to_string(),
                reason: reason.to_string(),
            };
            attempt.error(error)
        } else if attempt.previous().len() > REDIRECT_LIMIT {
            attempt.error(format!("more than {REDIRECT_LIMIT} redirects"))
        } else {
            attempt.follow()
        }
    })
}

/// A redirect to an https:// URL without CA roots; becomes [`DownloadError::NoCaRoots`].
#[derive(Debug, thiserror::Error)]
#[error("redirected to {url}, which needs CA root certificates: {reason}")]
pub(crate) struct NoCaRootsRedirect {
    pub(crate) url: String,
    pub(crate) reason: String,
}

/// The bundle bytes from the offset given to [`Fetcher::open`] to the end.
pub struct BundleReader {
    total: Option<u64>,
    /// [`Fetcher::open_range`]: bytes left to hand out.
    remaining: Option<u64>,
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
            .finish_non_exhaustive()
    }
}

impl Read for BundleReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = match self.remaining {
            Some(0) => return Ok(0),
            Some(left) => buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = match &mut self.inner {
            Inner::File(r) => r.read(&mut buf[..want]),
            Inner::Http(r) => r.read(&mut buf[..want]),
        }?;
        if let Some(left) = self.remaining.as_mut() {
            *left -= n as u64;
        }
        Ok(n)
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

/// Backoff before retry number `n` (1-based): `base * 2^(n-1)`, capped, with "equal jitter"
/// (uniform in `[d/2, d]`), so a fleet that lost its server does not come back in lockstep.
fn backoff_delay(base: Duration, n: u32) -> Duration {
    let d = flightnode_proto::backoff::exponential(base, n, MAX_BACKOFF.max(base));
    flightnode_proto::backoff::equal_jitter(d, rand::random())
}

/// `e` and its sources, each said once (one home: `flightnode_proto::error::chain`).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    flightnode_proto::error::chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

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
