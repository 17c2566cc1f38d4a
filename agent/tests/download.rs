//! `download::Fetcher` against the real fault-injecting bundle server of `flightnode-tests`.
//!
//! Timing: small timeouts (hundreds of ms) keep the suite fast; every test that waits for a
//! failure runs under a generous outer bound, so a hang fails the test instead of the CI job, and
//! no test asserts a tight wall-clock figure.

use flightnode_agent::config::DownloadConfig;
use flightnode_agent::download::{BundleReader, DownloadError, Fetcher};
use flightnode_agent::proto::ErrorCode;
use flightnode_tests::http_server::{BundleServer, Fault};
use std::io::Read;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// Far above any expected duration; only there to turn a hang into a failure.
const OUTER: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn cfg(idle_ms: u64, retries: u32, backoff_ms: u64) -> DownloadConfig {
    DownloadConfig {
        checkpoint_bytes: 1 << 20,
        idle_timeout: Duration::from_millis(idle_ms),
        connect_timeout: Duration::from_secs(2),
        retries,
        backoff: Duration::from_millis(backoff_ms),
        ..DownloadConfig::default()
    }
}

/// Deterministic bytes where every offset matters (an off-by-one resume shows).
fn blob(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

struct Env {
    rt: tokio::runtime::Runtime,
    srv: BundleServer,
    fetcher: Arc<Fetcher>,
}

fn env(cfg: &DownloadConfig) -> Env {
    let rt = runtime();
    let srv = BundleServer::start_blocking().unwrap();
    let fetcher = Arc::new(Fetcher::new(cfg, rt.handle().clone()).unwrap());
    Env { rt, srv, fetcher }
}

/// Runs `f` on a thread; panics if it does not finish within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn read_all(mut r: BundleReader) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

/// Opens and reads everything, bounded by [`OUTER`]; `Err` is the `DownloadError` from open or read.
fn fetch(e: &Env, url: &str, offset: u64) -> Result<Vec<u8>, String> {
    let fetcher = e.fetcher.clone();
    let url = url.to_owned();
    within(OUTER, move || {
        let r = fetcher.open(&url, offset).map_err(|e| e.to_string())?;
        read_all(r).map_err(|io| {
            let d = DownloadError::from_io(&io)
                .unwrap_or_else(|| panic!("read error without a DownloadError: {io}"));
            assert_eq!(d.code(), ErrorCode::DownloadFailed);
            d.to_string()
        })
    })
}

fn ranges(srv: &BundleServer, path: &str) -> Vec<Option<String>> {
    srv.requests_for(path).into_iter().map(|r| r.range).collect()
}

#[test]
fn full_download_equals_the_blob() {
    let e = env(&cfg(2000, 2, 50));
    let data = blob(3 * 1024 * 1024 + 17);
    e.srv.put("/b.fnb", data.clone());
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
    assert_eq!(ranges(&e.srv, "/b.fnb"), vec![None]);
    assert_eq!(e.fetcher.bytes_received(), data.len() as u64);
    let r = e.fetcher.open(&e.srv.url("/b.fnb"), 0).unwrap();
    assert_eq!(r.total_len(), Some(data.len() as u64));
}

#[test]
fn starts_at_an_offset_with_a_range_request() {
    let e = env(&cfg(2000, 2, 50));
    let data = blob(200_000);
    e.srv.put("/b.fnb", data.clone());
    let got = fetch(&e, &e.srv.url("/b.fnb"), 12_345).unwrap();
    assert!(got == data[12_345..], "content differs");
    assert_eq!(ranges(&e.srv, "/b.fnb"), vec![Some("bytes=12345-".to_owned())]);
    // The server counts a chunk once its write returned, which can be after the client read
    // it: wait for the count to settle, then it must be exactly the rest (no more, no less).
    let rest = (200_000 - 12_345) as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e.srv.bytes_sent_for("/b.fnb") < rest && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(e.srv.bytes_sent_for("/b.fnb"), rest);

    // At exactly the end: nothing left (the server answers 416 bytes */LEN).
    let got = fetch(&e, &e.srv.url("/b.fnb"), 200_000).unwrap();
    assert!(got.is_empty());
    // Past the end: an error, not retried.
    let before = e.srv.requests_for("/b.fnb").len();
    let err = fetch(&e, &e.srv.url("/b.fnb"), 200_001).unwrap_err();
    assert!(err.contains("416") && err.contains("/b.fnb"), "{err}");
    assert_eq!(e.srv.requests_for("/b.fnb").len(), before + 1);
}

#[test]
fn cut_connection_resumes_with_range_from_the_cut() {
    let e = env(&cfg(2000, 3, 50));
    let data = blob(1_000_000);
    e.srv.put("/b.fnb", data.clone());
    e.srv.set_fault(
        "/b.fnb",
        Fault::CutAt {
            offset: 400_000,
            times: 1,
        },
    );
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
    assert_eq!(
        ranges(&e.srv, "/b.fnb"),
        vec![None, Some("bytes=400001-".to_owned())]
    );
    let sent = e.srv.bytes_sent_for("/b.fnb");
    assert!(sent < data.len() as u64 * 3 / 2, "sent {sent}");
    assert_eq!(e.fetcher.bytes_received(), data.len() as u64);
}

#[test]
fn several_cuts_and_a_5xx_mid_way_are_retried_transparently() {
    let e = env(&cfg(2000, 5, 20));
    let data = blob(600_000);
    e.srv.put("/b.fnb", data.clone());
    e.srv.set_fault_sequence(
        "/b.fnb",
        [
            Fault::CutAt {
                offset: 99_999,
                times: 1,
            },
            Fault::Status(503),
            Fault::CutAt {
                offset: 299_999,
                times: 1,
            },
            Fault::Status(500),
        ],
    );
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
    assert_eq!(
        ranges(&e.srv, "/b.fnb"),
        vec![
            None,
            Some("bytes=100000-".to_owned()),
            Some("bytes=100000-".to_owned()),
            Some("bytes=300000-".to_owned()),
            Some("bytes=300000-".to_owned()),
        ]
    );
}

#[test]
fn not_found_fails_at_once_without_retries() {
    let e = env(&cfg(2000, 5, 2000));
    e.srv.put("/b.fnb", blob(10));
    e.srv.set_fault("/b.fnb", Fault::Status(404));
    let url = e.srv.url("/b.fnb");
    let err = e.fetcher.open(&url, 0).unwrap_err();
    assert_eq!(err.code(), ErrorCode::DownloadFailed);
    assert_eq!(
        err.to_string(),
        format!("GET {url}: HTTP 404 Not Found (not retried)")
    );
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 1);

    // A path the server does not have at all, and a 403: the same.
    let err = e.fetcher.open(&e.srv.url("/missing.fnb"), 0).unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    e.srv.set_fault("/b.fnb", Fault::Status(403));
    let err = e.fetcher.open(&url, 0).unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 2);
}

#[test]
fn server_error_forever_gives_up_after_retries_plus_one_attempts() {
    let e = env(&cfg(2000, 3, 20));
    e.srv.put("/b.fnb", blob(10));
    e.srv.set_fault("/b.fnb", Fault::Status(500));
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(
        err.contains("gave up after 4 attempts") && err.contains("500"),
        "{err}"
    );
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 4);

    // 429 and 408 are retried too; transient ones recover.
    e.srv.reset_counters();
    e.srv.clear_fault("/b.fnb");
    e.srv
        .set_fault_sequence("/b.fnb", [Fault::Status(429), Fault::Status(408)]);
    assert_eq!(fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap(), blob(10));
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 3);
}

#[test]
fn stalled_body_times_out_and_gives_up() {
    let (idle, retries, backoff) = (300, 2, 50);
    let e = env(&cfg(idle, retries, backoff));
    e.srv.put("/b.fnb", blob(100_000));
    e.srv.set_fault("/b.fnb", Fault::Stall { after: 0 });
    let t0 = Instant::now();
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    let took = t0.elapsed();
    assert!(
        err.contains("gave up after 3 attempts") && err.contains("no data for 300ms at byte 0"),
        "{err}"
    );
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 3);
    // Expected ~ idle*(retries+1) + backoffs ≈ 1.1 s; at least the idle timeouts must have passed.
    assert!(took >= Duration::from_millis(idle * 3), "{took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn stall_mid_way_then_recovery_resumes_at_the_stall() {
    let e = env(&cfg(300, 2, 50));
    let data = blob(300_000);
    e.srv.put("/b.fnb", data.clone());
    e.srv
        .set_fault_times("/b.fnb", Fault::Stall { after: 123_456 }, 1);
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
    assert_eq!(
        ranges(&e.srv, "/b.fnb"),
        vec![None, Some("bytes=123456-".to_owned())]
    );
}

#[test]
fn no_response_headers_times_out() {
    let e = env(&cfg(300, 1, 50));
    e.srv.put("/b.fnb", blob(10));
    e.srv.set_fault("/b.fnb", Fault::NoResponse);
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(
        err.contains("gave up after 2 attempts") && err.contains("no data"),
        "{err}"
    );
}

#[test]
fn range_ignored_200_is_skipped_to_the_offset() {
    let e = env(&cfg(2000, 2, 50));
    let data = blob(500_000);
    e.srv.put("/b.fnb", data.clone());
    e.srv.set_fault("/b.fnb", Fault::IgnoreRange);
    let got = fetch(&e, &e.srv.url("/b.fnb"), 250_001).unwrap();
    assert!(got == data[250_001..], "content differs");
    assert_eq!(e.fetcher.bytes_received(), data.len() as u64);

    // Cut, then the resume is answered with 200: still the right bytes.
    e.srv.clear_fault("/b.fnb");
    e.srv.set_fault_sequence(
        "/b.fnb",
        [
            Fault::CutAt {
                offset: 199_999,
                times: 1,
            },
            Fault::IgnoreRange,
        ],
    );
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
}

#[test]
fn wrong_content_range_start_is_an_error() {
    let e = env(&cfg(2000, 3, 20));
    e.srv.put("/b.fnb", blob(1000));
    e.srv.set_fault("/b.fnb", Fault::ShiftedRange(7));
    let err = fetch(&e, &e.srv.url("/b.fnb"), 100).unwrap_err();
    assert!(
        err.contains("Content-Range") && err.contains("bytes 107-999/1000"),
        "{err}"
    );
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 1, "not retried");
}

#[test]
fn endless_body_reads_a_capped_amount_and_dropping_the_reader_ends_the_task() {
    let e = env(&cfg(2000, 2, 50));
    let data = blob(100_000);
    e.srv.put("/b.fnb", data.clone());
    e.srv.set_fault("/b.fnb", Fault::Endless);
    let r = e.fetcher.open(&e.srv.url("/b.fnb"), 0).unwrap();
    assert_eq!(r.total_len(), None);
    let cap = data.len() + 4 * 1024 * 1024;
    let got = within(OUTER, move || {
        let mut got = Vec::new();
        let n = r.take(cap as u64).read_to_end(&mut got).unwrap();
        assert_eq!(n, cap);
        got
    });
    assert!(got[..data.len()] == data[..], "content differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0xEE));
    // The reader was dropped inside `within`: its task must close the connection.
    assert!(
        e.srv.wait_connections_at_most(0, Duration::from_secs(10)),
        "connection still open after the reader was dropped"
    );
    let sent = e.srv.bytes_sent_for("/b.fnb");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.srv.bytes_sent_for("/b.fnb"), sent, "server still sending");
    // Bounded buffering: the task did not run far ahead of the reader.
    assert!(
        e.fetcher.bytes_received() < cap as u64 + 16 * 1024 * 1024,
        "{}",
        e.fetcher.bytes_received()
    );
    drop(e.rt);
}

#[test]
fn dropping_a_reader_on_a_stalled_download_ends_the_task() {
    let e = env(&cfg(60_000, 5, 50));
    e.srv.put("/b.fnb", blob(100_000));
    e.srv.set_fault("/b.fnb", Fault::Stall { after: 1000 });
    let mut r = e.fetcher.open(&e.srv.url("/b.fnb"), 0).unwrap();
    let mut buf = [0u8; 1000];
    r.read_exact(&mut buf).unwrap();
    drop(r);
    assert!(
        e.srv.wait_connections_at_most(0, Duration::from_secs(10)),
        "connection still open after the reader was dropped"
    );
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 1);
}

#[test]
fn redirect_loop_is_an_error_and_a_redirect_is_followed() {
    let e = env(&cfg(2000, 3, 20));
    e.srv.put("/b.fnb", blob(10));
    e.srv.put("/real.fnb", blob(5000));
    e.srv.set_fault("/b.fnb", Fault::RedirectLoop);
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(err.contains("redirect"), "{err}");
    let n = e.srv.requests_for("/b.fnb").len();
    assert!((2..=12).contains(&n), "{n} requests: not retried");

    e.srv.set_fault("/b.fnb", Fault::RedirectTo("/real.fnb".into()));
    let got = fetch(&e, &e.srv.url("/b.fnb"), 1000).unwrap();
    assert!(got == blob(5000)[1000..], "content differs");
    assert_eq!(ranges(&e.srv, "/real.fnb"), vec![Some("bytes=1000-".to_owned())]);
}

#[test]
fn wrong_content_length_fails_instead_of_hanging() {
    let e = env(&cfg(500, 2, 20));
    e.srv.put("/b.fnb", blob(1000));
    e.srv
        .set_fault("/b.fnb", Fault::WrongContentLength { claimed: 5000 });
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(err.contains("/b.fnb"), "{err}");
}

#[test]
fn slow_loris_is_fine_while_bytes_keep_coming_and_bounded_when_they_do_not() {
    let e = env(&cfg(1000, 2, 20));
    let data = blob(12);
    e.srv.put("/b.fnb", data.clone());
    e.srv.set_fault(
        "/b.fnb",
        Fault::SlowLoris {
            interval: Duration::from_millis(30),
        },
    );
    assert_eq!(fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap(), data);

    // One byte per second against a 300 ms idle timeout: each attempt gets a byte, then fails.
    let e = env(&cfg(300, 2, 20));
    e.srv.put("/b.fnb", blob(1000));
    e.srv.set_fault("/b.fnb", Fault::slow_loris());
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert_eq!(
        ranges(&e.srv, "/b.fnb"),
        vec![None, Some("bytes=1-".to_owned()), Some("bytes=2-".to_owned())]
    );
}

#[test]
fn connection_refused_is_retried_then_reported() {
    let e = env(&cfg(500, 1, 20));
    let url = e.srv.url("/b.fnb");
    drop(e.srv);
    let fetcher = e.fetcher.clone();
    let err = within(OUTER, move || fetcher.open(&url, 0).map(|_| ()).unwrap_err());
    let msg = err.to_string();
    assert!(
        msg.contains("gave up after 2 attempts") && msg.contains("/b.fnb"),
        "{msg}"
    );
}

#[test]
fn local_files_are_read_from_the_offset_and_errors_name_the_path() {
    let e = env(&cfg(2000, 2, 50));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.fnb");
    let data = blob(70_000);
    std::fs::write(&path, &data).unwrap();
    let p = path.to_str().unwrap();
    let r = e.fetcher.open(p, 5).unwrap();
    assert_eq!(r.total_len(), Some(70_000));
    assert!(read_all(r).unwrap() == data[5..]);
    let r = e.fetcher.open(&format!("file://{p}"), 69_999).unwrap();
    assert_eq!(read_all(r).unwrap(), data[69_999..]);

    let missing = dir.path().join("missing.fnb");
    let err = e.fetcher.open(missing.to_str().unwrap(), 0).unwrap_err();
    assert_eq!(err.code(), ErrorCode::DownloadFailed);
    assert!(
        err.to_string().starts_with("cannot open bundle ") && err.to_string().contains("missing.fnb"),
        "{err}"
    );
    let err = e.fetcher.open(p, 70_001).unwrap_err();
    // The cause is the error's source; reports print the chain.
    let text = flightnode_agent::proto::error::chain(&err);
    assert!(text.contains("past the end") && text.contains(p), "{text}");
    let err = e.fetcher.open("ftp://example.invalid/b.fnb", 0).unwrap_err();
    assert!(err.to_string().contains("ftp"), "{err}");
    assert_eq!(e.fetcher.bytes_received(), 0);
}

#[test]
fn attempts_with_real_progress_reset_the_retry_budget() {
    let e = env(&cfg(2000, 1, 20));
    let data = blob(3_500_000);
    e.srv.put("/b.fnb", data.clone());
    let cut = |offset| Fault::CutAt { offset, times: 1 };
    // Each attempt delivers > 1 MiB before its cut: three drops with retries = 1 still succeed.
    e.srv
        .set_fault_sequence("/b.fnb", [cut(1_100_000), cut(2_200_000), cut(3_300_000)]);
    let got = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap();
    assert!(got == data, "content differs");
    assert_eq!(e.srv.requests_for("/b.fnb").len(), 4);

    // Drops after little progress count: the second one exhausts retries = 1.
    e.srv.reset_counters();
    e.srv.set_fault_sequence("/b.fnb", [cut(100), cut(200), cut(300)]);
    let err = fetch(&e, &e.srv.url("/b.fnb"), 0).unwrap_err();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(
        ranges(&e.srv, "/b.fnb"),
        vec![None, Some("bytes=101-".to_owned())]
    );
}
