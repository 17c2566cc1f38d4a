//! Status writes through the real kube client against the fake Kubernetes API on loopback.

mod common;

use common::{config, heartbeat, with_phase};
use flightnode_hub::heartbeat::hub::{Hub, HubConfig};
use flightnode_hub::heartbeat::session::SpecCache;
use flightnode_hub::store::kube::{KubeSink, client_for_url};
use flightnode_tests::fake_kube::{FakeKube, Fault};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn setup(cfg: HubConfig) -> (FakeKube, Arc<Hub>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeKube::start().await.unwrap();
    let client = client_for_url(&fake.url()).unwrap();
    let sink = Arc::new(KubeSink::new(client, "fleet", Duration::from_secs(2)));
    let hub = Hub::new(cfg, sink, None, Arc::new(SpecCache::default()));
    hub.start();
    (fake, hub)
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast() -> HubConfig {
    let mut c = config(1000.0, 1000);
    c.scheduler.backoff_base = Duration::from_millis(50);
    c.ack_wait = Duration::from_millis(200);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_server_side_apply_of_status_once_per_change() {
    let (fake, hub) = setup(fast()).await;
    fake.insert("fleet", "drone-1", "hw-x1");
    hub.heartbeat(&heartbeat("drone-1", "1.0.0")).await;
    eventually("first write", Duration::from_secs(5), || {
        fake.status_writes().len() == 1
    })
    .await;
    for _ in 0..5 {
        hub.heartbeat(&heartbeat("drone-1", "1.0.0")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.status_writes().len(),
        1,
        "unchanged heartbeats write nothing"
    );
    let resp = hub
        .heartbeat(&with_phase(heartbeat("drone-1", "1.0.0"), "downloading", 3))
        .await;
    assert_eq!(resp.acked_seq, 3, "the event is acked once its write succeeded");
    let writes = fake.status_writes();
    assert_eq!(writes.len(), 2);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    let w = &writes[1];
    assert!(w.query.contains("fieldManager=flightnode-hub") && w.query.contains("force=true"));
    assert_eq!(w.body["status"]["phase"], "Downloading");
    let obj = fake.object("fleet", "drone-1").unwrap();
    assert_eq!(obj["status"]["firmware"]["committedVersion"], "1.0.0");
    assert_eq!(obj["spec"]["hardwareId"], "hw-x1");
    let types: Vec<&str> = obj["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Ready", "Online", "UpgradeInProgress", "FirmwareSynced"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_and_no_write_is_lost() {
    let (fake, hub) = setup(fast()).await;
    fake.insert("fleet", "drone-1", "hw-x1");
    fake.push_fault(Fault::TooManyRequests { retry_after_secs: 1 });
    fake.push_fault(Fault::InternalError);
    fake.push_fault(Fault::Conflict);
    fake.push_fault(Fault::TooManyRequests { retry_after_secs: 1 });
    fake.push_fault(Fault::Slow(Duration::from_millis(300)));
    let resp = hub
        .heartbeat(&with_phase(heartbeat("drone-1", "1.0.0"), "downloading", 1))
        .await;
    assert_eq!(resp.acked_seq, 0, "not durable while throttled");
    let hb = with_phase(
        with_phase(heartbeat("drone-1", "1.0.0"), "downloading", 1),
        "staged",
        2,
    );
    hub.heartbeat(&hb).await;
    eventually("the write to land", Duration::from_secs(10), || {
        fake.status_writes().iter().any(|w| w.answered == 200)
    })
    .await;
    let writes = fake.status_writes();
    let codes: Vec<u16> = writes.iter().map(|w| w.answered).collect();
    assert_eq!(codes, [429, 500, 409, 429, 200], "{codes:?}");
    // Retry-After: 1 s honoured after each 429.
    assert!(writes[1].at - writes[0].at >= Duration::from_millis(990));
    assert!(writes[4].at - writes[3].at >= Duration::from_millis(990));
    assert_eq!(
        writes[4].body["status"]["phase"], "Staged",
        "the newest status won"
    );
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
    assert_eq!(hub.heartbeat(&hb).await.acked_seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_flightnode_is_counted_or_registered() {
    let (fake, hub) = setup(fast()).await;
    hub.heartbeat(&heartbeat("ghost", "1.0.0")).await;
    eventually("a 404", Duration::from_secs(5), || {
        !fake.status_writes().is_empty()
    })
    .await;
    assert_eq!(fake.status_writes()[0].answered, 404);
    // Counted once the hub has read the 404, a moment after the fake recorded the write.
    eventually(
        "the missing FlightNode to be counted",
        Duration::from_secs(5),
        || {
            hub.metrics
                .encode()
                .contains("flightnode_hub_flightnode_missing_total 1")
        },
    )
    .await;
    assert!(fake.creates().is_empty(), "no auto-registration by default");

    let mut cfg = fast();
    cfg.scheduler.auto_register = true;
    let (fake, hub) = setup(cfg).await;
    hub.heartbeat(&heartbeat("newbie", "1.0.0")).await;
    eventually("registration and write", Duration::from_secs(5), || {
        fake.object("fleet", "newbie")
            .is_some_and(|o| o.get("status").is_some())
    })
    .await;
    assert_eq!(fake.creates(), [("fleet".to_owned(), "newbie".to_owned())]);
    assert_eq!(
        fake.object("fleet", "newbie").unwrap()["spec"]["hardwareId"],
        "hw-x1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_bounds_a_thousand_drones_over_http() {
    let mut cfg = config(20.0, 40);
    cfg.ack_wait = Duration::from_millis(1);
    let (fake, hub) = setup(cfg).await;
    for i in 0..1000 {
        fake.insert("fleet", &format!("drone-{i}"), "hw-x1");
    }
    let start = Instant::now();
    let mut joins = Vec::new();
    for i in 0..1000 {
        let hub = Arc::clone(&hub);
        joins.push(tokio::spawn(async move {
            hub.heartbeat(&heartbeat(&format!("drone-{i}"), "1.0.0")).await
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    // The burst is used up at some point (how soon depends on the machine); then the rate bound
    // must hold for however long that took.
    eventually("40 writes: the burst used", Duration::from_secs(20), || {
        fake.status_writes().len() >= 40
    })
    .await;
    let n = fake.status_writes().len();
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        (n as f64) <= 40.0 + 20.0 * elapsed + 2.0,
        "{n} writes in {elapsed:.2}s"
    );
    assert!(
        hub.scheduler.depth() >= 900,
        "the rest waits: {}",
        hub.scheduler.depth()
    );
    assert!(fake.violations().is_empty());
}
