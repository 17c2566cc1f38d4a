//! Tests of the write scheduler (a fake status source and sink, paused time).
use super::*;
use crate::api::flightnode::FlightNodeStatus;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use tokio::sync::mpsc;

/// Statuses by drone name: `build` hands out the current content number.
#[derive(Default)]
struct FakeSource {
    content: Mutex<HashMap<String, u64>>,
    done: Mutex<Vec<(String, u64)>>,
    missing: Mutex<Vec<String>>,
}

impl FakeSource {
    fn set(&self, name: &str, content: u64) {
        self.content.lock().unwrap().insert(name.to_owned(), content);
    }
}

impl StatusSource for FakeSource {
    fn build(&self, name: &str) -> Option<Built> {
        let content = *self.content.lock().unwrap().get(name)?;
        Some(Built {
            req: WriteRequest {
                name: name.to_owned(),
                device_id: name.to_owned(),
                hardware_id: "hw".into(),
                status: FlightNodeStatus::default(),
                events: Vec::new(),
            },
            content,
        })
    }

    fn write_done(&self, built: &Built, _now: Instant) {
        self.done
            .lock()
            .unwrap()
            .push((built.req.name.clone(), built.content));
    }

    fn mark_missing(&self, name: &str) -> bool {
        let mut missing = self.missing.lock().unwrap();
        let first = !missing.iter().any(|m| m == name);
        missing.push(name.to_owned());
        first
    }
}

/// Answers each drone's writes from a script (then `Ok`), and reports every write.
struct FakeSink {
    script: Mutex<HashMap<String, VecDeque<Result<(), WriteError>>>>,
    writes: mpsc::UnboundedSender<(String, Instant)>,
}

impl StatusSink for FakeSink {
    fn write_status<'a>(&'a self, req: &'a WriteRequest) -> BoxFuture<'a, Result<(), WriteError>> {
        let result = self
            .script
            .lock()
            .unwrap()
            .get_mut(&req.name)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Ok(()));
        self.writes.send((req.name.clone(), Instant::now())).unwrap();
        Box::pin(async move { result })
    }

    fn create<'a>(&'a self, _name: &'a str, _hardware_id: &'a str) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "fake"
    }
}

struct Rig {
    scheduler: Arc<Scheduler>,
    source: Arc<FakeSource>,
    writes: mpsc::UnboundedReceiver<(String, Instant)>,
}

fn rig(config: SchedulerConfig, script: &[(&str, Vec<Result<(), WriteError>>)]) -> Rig {
    let (tx, writes) = mpsc::unbounded_channel();
    let sink = Arc::new(FakeSink {
        script: Mutex::new(
            script
                .iter()
                .map(|(name, results)| ((*name).to_owned(), results.iter().cloned().collect()))
                .collect(),
        ),
        writes: tx,
    });
    let source = Arc::new(FakeSource::default());
    let scheduler = Scheduler::new(
        config,
        sink,
        Arc::clone(&source) as Arc<dyn StatusSource>,
        Arc::new(Metrics::new()),
    );
    Rig {
        scheduler,
        source,
        writes,
    }
}

fn one_worker() -> SchedulerConfig {
    SchedulerConfig {
        workers: 1,
        ..SchedulerConfig::default()
    }
}

fn want(s: &Scheduler, name: &str, priority: Priority) {
    s.enqueue(&Enqueue {
        name: name.into(),
        priority,
    });
}

async fn next_write(writes: &mut mpsc::UnboundedReceiver<(String, Instant)>) -> (String, Instant) {
    tokio::time::timeout(Duration::from_mins(10), writes.recv())
        .await
        .expect("a write")
        .unwrap()
}

/// Lets every timer run out (paused clock) and returns the writes that happened meanwhile.
async fn settle(writes: &mut mpsc::UnboundedReceiver<(String, Instant)>) -> Vec<String> {
    tokio::time::sleep(Duration::from_mins(10)).await;
    let mut out = Vec::new();
    while let Ok((name, _)) = writes.try_recv() {
        out.push(name);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn transitions_go_before_registrations_before_refreshes() {
    let mut r = rig(one_worker(), &[]);
    for name in ["refresh", "register", "transition"] {
        r.source.set(name, 1);
    }
    want(&r.scheduler, "refresh", Priority::Refresh);
    want(&r.scheduler, "register", Priority::Register);
    want(&r.scheduler, "transition", Priority::Transition);
    // Raised while queued: it moves up to the transitions' queue.
    r.source.set("late", 1);
    want(&r.scheduler, "late", Priority::Refresh);
    want(&r.scheduler, "late", Priority::Transition);
    assert_eq!(r.scheduler.depth(), 4);
    r.scheduler.spawn_workers();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(next_write(&mut r.writes).await.0);
    }
    assert_eq!(order, ["transition", "late", "register", "refresh"]);
    assert!(settle(&mut r.writes).await.is_empty());
    assert_eq!(r.scheduler.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_wants_is_one_write_of_the_newest_status() {
    let mut r = rig(one_worker(), &[]);
    for content in 1..=5 {
        r.source.set("a", content);
        want(&r.scheduler, "a", Priority::Transition);
    }
    r.scheduler.spawn_workers();
    assert_eq!(settle(&mut r.writes).await, ["a"]);
    assert_eq!(*r.source.done.lock().unwrap(), [("a".to_owned(), 5)]);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_failure_is_retried_after_retry_after_with_the_newest_status() {
    let throttled = WriteError::Retryable {
        code: 429,
        retry_after: Some(Duration::from_secs(7)),
        message: "slow down".into(),
    };
    let mut r = rig(one_worker(), &[("a", vec![Err(throttled)])]);
    r.source.set("a", 1);
    want(&r.scheduler, "a", Priority::Transition);
    r.scheduler.spawn_workers();
    let (_, first) = next_write(&mut r.writes).await;
    // Newer content while the retry waits, and a want that must not jump the delay.
    r.source.set("a", 2);
    want(&r.scheduler, "a", Priority::Transition);
    let (_, second) = next_write(&mut r.writes).await;
    let waited = second - first;
    assert!(waited >= Duration::from_secs(7), "retried after {waited:?}");
    assert!(waited < Duration::from_secs(8), "retried after {waited:?}");
    assert!(settle(&mut r.writes).await.is_empty());
    assert_eq!(*r.source.done.lock().unwrap(), [("a".to_owned(), 2)]);
}

#[tokio::test(start_paused = true)]
async fn a_missing_object_is_reported_once_per_drone_and_not_retried() {
    let mut r = rig(
        one_worker(),
        &[("a", vec![Err(WriteError::NotFound), Err(WriteError::NotFound)])],
    );
    r.source.set("a", 1);
    want(&r.scheduler, "a", Priority::Transition);
    r.scheduler.spawn_workers();
    assert_eq!(settle(&mut r.writes).await, ["a"]);
    want(&r.scheduler, "a", Priority::Refresh);
    assert_eq!(settle(&mut r.writes).await, ["a"]);
    assert_eq!(*r.source.missing.lock().unwrap(), ["a", "a"]);
    assert!(r.source.done.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_dropped_and_the_next_want_writes_again() {
    let refused = WriteError::Permanent {
        code: 422,
        message: "invalid".into(),
    };
    let mut r = rig(one_worker(), &[("a", vec![Err(refused)])]);
    r.source.set("a", 1);
    want(&r.scheduler, "a", Priority::Transition);
    r.scheduler.spawn_workers();
    assert_eq!(settle(&mut r.writes).await, ["a"]);
    want(&r.scheduler, "a", Priority::Transition);
    assert_eq!(settle(&mut r.writes).await, ["a"]);
    assert_eq!(*r.source.done.lock().unwrap(), [("a".to_owned(), 1)]);
}

#[tokio::test(start_paused = true)]
async fn drain_writes_what_is_queued_at_the_bucket_rate_then_ends_the_workers() {
    let config = SchedulerConfig {
        qps: 1.0,
        burst: 1,
        workers: 2,
        ..SchedulerConfig::default()
    };
    let mut r = rig(config, &[]);
    r.scheduler.spawn_workers();
    let started = Instant::now();
    for name in ["a", "b", "c"] {
        r.source.set(name, 1);
        want(&r.scheduler, name, Priority::Transition);
    }
    r.scheduler.drain(Duration::from_mins(1)).await;
    let mut written = Vec::new();
    while let Ok((name, _)) = r.writes.try_recv() {
        written.push(name);
    }
    assert_eq!(written, ["a", "b", "c"]);
    // One token at start, then one a second: the drain waited for the bucket.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.scheduler.depth(), 0);
    assert!(r.scheduler.workers.lock().unwrap().is_empty());
    // Nothing writes any more.
    r.source.set("d", 1);
    want(&r.scheduler, "d", Priority::Transition);
    assert!(settle(&mut r.writes).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_after_its_timeout() {
    let config = SchedulerConfig {
        qps: 0.01,
        burst: 1,
        workers: 1,
        ..SchedulerConfig::default()
    };
    let mut r = rig(config, &[]);
    r.scheduler.spawn_workers();
    for name in ["a", "b"] {
        r.source.set(name, 1);
        want(&r.scheduler, name, Priority::Transition);
    }
    let started = Instant::now();
    r.scheduler.drain(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(settle(&mut r.writes).await.len(), 1, "b waits 100 s for a token");
    assert_eq!(r.scheduler.depth(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_delays_double_up_to_the_cap_and_honour_retry_after_under_it() {
    let r = rig(
        SchedulerConfig {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            ..SchedulerConfig::default()
        },
        &[],
    );
    let s = &r.scheduler;
    let ms = Duration::from_millis;
    for (attempts, retry_after, want) in [
        (1, None, ms(200)),
        (2, None, ms(400)),
        (3, None, ms(800)),
        (8, None, ms(25_600)),
        (9, None, ms(30_000)),
        (40, None, ms(30_000)),
        (1, Some(ms(5_000)), ms(5_000)),
        (1, Some(ms(90_000)), ms(30_000)),
    ] {
        assert_eq!(
            s.backoff(attempts, retry_after),
            want,
            "attempt {attempts}, {retry_after:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn token_bucket_spends_the_burst_then_refills_at_qps_and_keeps_the_reserve() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(2.0, 4);
    // (seconds after t0, tokens to keep, expected: Ok or the wait)
    let secs = Duration::from_secs_f64;
    let steps: [(f64, f64, Result<(), Duration>); 9] = [
        (0.0, 2.0, Ok(())),            // 4 -> 3
        (0.0, 2.0, Ok(())),            // 3 -> 2
        (0.0, 2.0, Err(secs(0.5))),    // 2 < 3: the reserve stays
        (0.0, 0.0, Ok(())),            // a transition may take it: 2 -> 1
        (0.0, 0.0, Ok(())),            // 1 -> 0
        (0.0, 0.0, Err(secs(0.5))),    // empty: one token in 1/qps
        (0.5, 0.0, Ok(())),            // refilled one
        (100.0, 0.0, Ok(())),          // refill stops at the burst: 4 -> 3
        (100.0, 10.0, Err(secs(0.5))), // a reserve above the burst waits for a full bucket
    ];
    for (i, (at, keep, want)) in steps.into_iter().enumerate() {
        assert_eq!(b.try_take_above(t0 + secs(at), keep), want, "step {i}");
    }
    b.refund();
    b.refund();
    assert_eq!(
        b.try_take_above(t0 + secs(100.0), 10.0),
        Ok(()),
        "refunds fill the bucket"
    );
}
