//! HTTP(S) bundles: a blocking reader fed by an async task that resumes with `Range`.

use super::{
    BundleReader, CHANNEL_CHUNKS, DownloadError, Fetcher, Inner, MAX_CHUNK, PROGRESS_RESET, STOP_POLL,
    backoff_delay, error_chain,
};
use crate::netpolicy::bucket::TokenBucket;
use crate::netpolicy::{LinkPolicy, LinkVerdict, RECHECK};
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

impl Fetcher {
    /// `end`: exclusive end of a bounded range ([`Fetcher::open_range`]); `None` reads to the end.
    /// `probe`: the range is only the first part ([`Fetcher::open_head`]); the rest is fetched
    /// once the reader has taken all of it, and a `200` is read as the whole bundle.
    pub(super) fn open_http(
        &self,
        url: reqwest::Url,
        offset: u64,
        end: Option<u64>,
        probe: bool,
    ) -> Result<BundleReader, DownloadError> {
        let url_str = url.to_string();
        if let Some(reason) = self.no_roots.as_ref().filter(|_| url.scheme() == "https") {
            return Err(DownloadError::NoCaRoots {
                url: url_str,
                reason: reason.to_string(),
            });
        }
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
            end,
            probe,
            link: self.link.clone(),
            held: self.held.clone(),
            pace: self.pace.clone(),
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
                        remaining: None,
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

/// The [`NoCaRootsRedirect`](super::NoCaRootsRedirect) behind a redirect error, if that is
/// what stopped it.
fn no_roots_redirect(e: &reqwest::Error) -> Option<&super::NoCaRootsRedirect> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<super::NoCaRootsRedirect>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

/// A probe's doubling parts end here; the rest of the bundle is one request.
const PROBE_LIMIT: u64 = 8 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Blocking side

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

pub(super) struct HttpReader {
    pub(super) url: String,
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    state: ReadState,
    task: JoinHandle<()>,
}

impl HttpReader {
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
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
                    self.state = ReadState::Failed(e.to_string());
                    return Err(io::Error::other(e));
                }
                None => {
                    let e = DownloadError::Stopped {
                        url: self.url.clone(),
                        reason: "the download task ended unexpectedly (runtime shut down?)".into(),
                    };
                    self.state = ReadState::Failed(e.to_string());
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
// Async side

struct HttpTask {
    client: reqwest::Client,
    url: reqwest::Url,
    url_str: String,
    idle: Duration,
    retries: u32,
    backoff: Duration,
    received: Arc<AtomicU64>,
    tx: mpsc::Sender<Msg>,
    /// Exclusive end of a bounded range request.
    end: Option<u64>,
    /// `end` bounds only the first request (see `open_http`).
    probe: bool,
    /// The `[download]` link policy: asked before each request and every
    /// [`RECHECK`](crate::netpolicy::RECHECK) while the body streams.
    link: Option<Arc<LinkPolicy>>,
    /// Set when the policy stops the download.
    held: Arc<AtomicBool>,
    pace: Pace,
}

/// The fetcher's token bucket, shared by its downloads so that neither a new request (a probe's
/// next part, a retry, a resume) nor a second reader starts with a fresh burst; remade only when
/// the policy's cap changes (a route change).
pub(super) type Pace = Arc<std::sync::Mutex<Option<TokenBucket>>>;

fn set_rate(pace: &Pace, rate: Option<u64>) {
    let mut bucket = pace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match (rate, bucket.as_ref()) {
        (None, _) => *bucket = None,
        (Some(r), Some(b)) if b.rate() == r => {}
        (Some(r), _) => *bucket = Some(TokenBucket::new(r, Instant::now())),
    }
}

/// How long to hold `bytes` back under the current cap.
fn pace_wait(pace: &Pace, bytes: u64) -> Duration {
    pace.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .map_or(Duration::ZERO, |b| b.take(bytes, Instant::now()))
}

/// Download state carried across attempts.
struct Progress {
    /// Exclusive end of the range asked for (`None`: to the end of the bundle).
    end: Option<u64>,
    pos: u64,
    total: Option<u64>,
    started: bool,
}

impl Progress {
    /// Once the bundle's length is known, a range never ends past it: a server answers a range
    /// that does with a shorter `206` (as HTTP requires), whose end is the bundle's.
    fn clamp_end(&mut self) {
        if let (Some(end), Some(total)) = (self.end, self.total) {
            self.end = Some(end.min(total));
        }
    }
}

enum Outcome {
    Done,
    ReaderGone,
}

/// What an accepted response holds.
enum Accepted {
    /// Body bytes follow; the first `skip` are before the position (a `200` to a `Range`).
    Body { skip: u64 },
    /// The bundle ends exactly at the position (a `416` saying so).
    Empty,
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
            end: self.end,
        };
        let mut attempt: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            info!(url = %self.url_str, offset = p.pos, attempt, "downloading bundle");
            let before = p.pos;
            let err = match self.attempt(&mut p).await {
                Ok(Outcome::Done) if self.probe && p.end.is_some() && p.total.is_none_or(|t| p.pos < t) => {
                    // This part is read; ask for the next only once the reader took all of it,
                    // so a reader that stops after the header leaves little in flight. The
                    // parts double up to PROBE_LIMIT, then the rest comes in one request.
                    while self.tx.capacity() < self.tx.max_capacity() {
                        if self.tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    p.end = (p.pos < PROBE_LIMIT).then(|| p.pos.saturating_mul(2));
                    p.clamp_end();
                    failures = 0;
                    continue;
                }
                Ok(Outcome::Done) => {
                    info!(url = %self.url_str, offset = p.pos, attempt, "bundle download complete");
                    let _ = self.tx.send(Msg::End).await;
                    return;
                }
                Ok(Outcome::ReaderGone) => {
                    debug!(url = %self.url_str, offset = p.pos, attempt, "bundle reader dropped");
                    return;
                }
                Err(Failure::Fatal(e @ DownloadError::Held { .. })) => {
                    debug!(url = %self.url_str, offset = p.pos, "{e}");
                    let _ = self.tx.send(Msg::Err(e)).await;
                    return;
                }
                Err(Failure::Fatal(e)) => {
                    warn!(url = %self.url_str, offset = p.pos, attempt, error = %e, "bundle download failed");
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
                warn!(url = %self.url_str, offset = p.pos, attempt, error = %e, "bundle download failed");
                let _ = self.tx.send(Msg::Err(e)).await;
                return;
            }
            let delay = backoff_delay(self.backoff, failures);
            warn!(url = %self.url_str, offset = p.pos, attempt, error = %err,
                retry_in = ?delay, "bundle download attempt failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One request from the current position: send, accept the answer, stream its body.
    async fn attempt(&self, p: &mut Progress) -> Result<Outcome, Failure> {
        // Before connecting: a request over a metered link would start the body flowing.
        if let Some(link) = self.link.clone() {
            let source = self.url_str.clone();
            let verdict = tokio::task::spawn_blocking(move || link.check_source(&source)).await;
            set_rate(&self.pace, self.judged(verdict, p.pos)?);
        }
        let resp = self.send(p.pos, p.end).await?;
        let skip = match self.accept(&resp, p)? {
            Accepted::Body { skip } => skip,
            Accepted::Empty => {
                if !self.start(p).await {
                    return Ok(Outcome::ReaderGone);
                }
                return Ok(Outcome::Done);
            }
        };
        if resp.url() != &self.url {
            debug!(url = %self.url_str, final_url = %resp.url(), "bundle request was redirected");
        }
        if !self.start(p).await {
            return Ok(Outcome::ReaderGone);
        }
        self.stream_body(resp, p, skip).await
    }

    /// A policy verdict: the rate to pace at, or the hold that stops this download.
    fn judged(
        &self,
        verdict: Result<LinkVerdict, tokio::task::JoinError>,
        pos: u64,
    ) -> Result<Option<u64>, Failure> {
        match verdict {
            Ok(LinkVerdict::Go { rate }) => Ok(rate),
            Ok(LinkVerdict::Hold(reason, why, interface)) => {
                info!(url = %self.url_str, offset = pos, reason = %reason,
                    interface = interface.as_deref().unwrap_or("-"), "the link policy pauses the download");
                self.held.store(true, Ordering::SeqCst);
                Err(Failure::Fatal(DownloadError::Held {
                    url: self.url_str.clone(),
                    offset: pos,
                    reason,
                    why,
                }))
            }
            // The runtime is shutting down: the reader learns it from the closed channel.
            Err(_) => Ok(None),
        }
    }

    /// Sends `GET` (with `Range: bytes=pos-` past the start) and waits for the response headers.
    async fn send(&self, pos: u64, end: Option<u64>) -> Result<reqwest::Response, Failure> {
        let url = &self.url_str;
        let mut req = self.client.get(self.url.clone());
        if let Some(end) = end {
            req = req.header(RANGE, format!("bytes={pos}-{}", end.saturating_sub(1)));
        } else if pos > 0 {
            req = req.header(RANGE, format!("bytes={pos}-"));
        }
        match tokio::time::timeout(self.idle, req.send()).await {
            Err(_) => Err(Failure::Retry(DownloadError::Idle {
                url: url.clone(),
                timeout: self.idle,
                offset: pos,
            })),
            Ok(Err(e)) => Err(if let Some(r) = no_roots_redirect(&e) {
                Failure::Fatal(DownloadError::NoCaRoots {
                    url: r.url.clone(),
                    reason: r.reason.clone(),
                })
            } else if e.is_redirect() {
                Failure::Fatal(DownloadError::Redirect {
                    url: url.clone(),
                    reason: error_chain(&e.without_url()),
                })
            } else {
                Failure::Retry(DownloadError::Request {
                    url: url.clone(),
                    offset: pos,
                    reason: error_chain(&e.without_url()),
                })
            }),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Checks the status and headers against the position: how many body bytes to skip, or that
    /// nothing is left.
    fn accept(&self, resp: &reqwest::Response, p: &mut Progress) -> Result<Accepted, Failure> {
        let url = &self.url_str;
        let status = resp.status();
        let protocol = |reason: String| {
            Failure::Fatal(DownloadError::Protocol {
                url: url.clone(),
                reason,
            })
        };
        let mut skip: u64 = 0;
        match status {
            StatusCode::OK if p.end.is_some() && !(self.probe && p.pos == 0) => {
                return Err(Failure::Fatal(DownloadError::RangeIgnored {
                    url: url.clone(),
                    start: p.pos,
                    last: p.end.unwrap_or(0).saturating_sub(1),
                }));
            }
            StatusCode::OK => {
                // A probe answered with the whole bundle: read it as the plain stream.
                p.end = None;
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
                let cr = header_str(resp, CONTENT_RANGE);
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
                // A range asked past the end (before the length was known) is answered up to
                // the end: the body is complete there.
                p.clamp_end();
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let cr = header_str(resp, CONTENT_RANGE);
                let size = cr.as_deref().and_then(parse_unsatisfied_range);
                if size == Some(p.pos) && p.pos > 0 {
                    // The bundle is exactly `pos` bytes long: nothing left to read.
                    self.check_total(p, size)?;
                    return Ok(Accepted::Empty);
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
        Ok(Accepted::Body { skip })
    }

    /// Streams the body into the channel, skipping `skip` bytes first (a `200` to a `Range`).
    async fn stream_body(
        &self,
        resp: reqwest::Response,
        p: &mut Progress,
        mut skip: u64,
    ) -> Result<Outcome, Failure> {
        let mut checked = Instant::now();
        // The address really connected to: the route to it is the link the body comes over.
        let remote = resp.remote_addr().map(|a| a.ip());
        let url = &self.url_str;
        let protocol = |reason: String| {
            Failure::Fatal(DownloadError::Protocol {
                url: url.clone(),
                reason,
            })
        };
        let mut stream = resp.bytes_stream();
        loop {
            let waiting = Instant::now();
            let next = loop {
                // With a link policy the wait is sliced: a route change often stalls the
                // connection (the old source address leaves by the new link and is dropped), and
                // that must pause the download now, not after `idle_timeout` and a retry.
                let left = self.idle.saturating_sub(waiting.elapsed());
                let slice = if self.link.is_some() {
                    left.min(RECHECK)
                } else {
                    left
                };
                if let Ok(next) = tokio::time::timeout(slice, stream.next()).await {
                    break next;
                }
                if waiting.elapsed() >= self.idle {
                    return Err(Failure::Retry(DownloadError::Idle {
                        url: url.clone(),
                        timeout: self.idle,
                        offset: p.pos,
                    }));
                }
                if let (Some(link), Some(addr)) = (self.link.clone(), remote) {
                    checked = Instant::now();
                    let verdict = tokio::task::spawn_blocking(move || link.check_addr(addr)).await;
                    set_rate(&self.pace, self.judged(verdict, p.pos)?);
                }
            };
            let mut chunk = match next {
                None => {
                    if let Some(total) = p.end.or(p.total)
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
                        reason: error_chain(&e.without_url()),
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
            if let Some(total) = p.end.or(p.total)
                && p.pos + chunk.len() as u64 > total
            {
                return Err(protocol(format!(
                    "server sent more than the {total} bytes it announced"
                )));
            }
            if let (Some(link), Some(addr)) = (self.link.clone(), remote)
                && checked.elapsed() >= RECHECK
            {
                checked = Instant::now();
                let verdict = tokio::task::spawn_blocking(move || link.check_addr(addr)).await;
                set_rate(&self.pace, self.judged(verdict, p.pos)?);
            }
            let wait = pace_wait(&self.pace, chunk.len() as u64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
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
}
