//! Cancels under real operations, on a real kube-apiserver (skipped without
//! `FLIGHTNODE_K8S_DIR`) and a real mosquitto: a broker's PUBACK is no delivery, so the hub
//! keeps a cancel in the drone's status and sends it again until the drone acknowledges it.
//!
//! Drones are simulated at the API (statuses written as the hub writes heartbeat statuses);
//! the far drone's MQTT session is a real persistent session on the broker.

mod common;

use common::cluster::{NS, Report, cluster, create_drones, lists, report, step_until};
use flightnode_hub::api::flightnode::FlightNode;
use flightnode_hub::api::rollout::{FirmwareRollout, condition};
use flightnode_hub::controller::reconcile::Controllers;
use flightnode_hub::store::kube::KubeSink;
use flightnode_proto::mqtt::Command;
use kube::ResourceExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn halted(r: &[FirmwareRollout], name: &str) -> bool {
    r.iter().any(|r| {
        r.name_any() == name
            && r.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == condition::HALTED && c.status == "True")
            })
    })
}

/// Commands on one drone's topic, through a persistent MQTT session the test connects and drops
/// as the drone's link comes and goes (a real broker keeps what arrives meanwhile).
struct DroneLink {
    port: u16,
    device: String,
    got: Arc<std::sync::Mutex<Vec<Command>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DroneLink {
    fn new(port: u16, device: &str) -> Self {
        DroneLink {
            port,
            device: device.to_owned(),
            got: Arc::default(),
            task: None,
        }
    }

    /// Connects the drone's session (clean session off, as the agent does) and subscribes.
    async fn connect(&mut self) -> anyhow::Result<()> {
        let mut options = rumqttc::MqttOptions::new(self.device.clone(), "127.0.0.1", self.port);
        options.set_clean_session(false);
        let topic = flightnode_proto::mqtt::upgrade_topic(&self.device);
        let (got, device) = (Arc::clone(&self.got), self.device.clone());
        let task = common::subscribe(options, &topic, move |p| {
            if let Ok(cmd) = flightnode_proto::mqtt::parse_command(&p.payload, &device) {
                got.lock().unwrap().push(cmd);
            }
        })
        .await?;
        self.task = Some(task);
        Ok(())
    }

    /// The link goes down without a word (the session stays on the broker).
    fn drop_link(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    fn commands(&self) -> Vec<Command> {
        self.got.lock().unwrap().clone()
    }

    fn cancels_of(&self, id: &str) -> usize {
        self.commands()
            .iter()
            .filter(|c| matches!(c, Command::Cancel { upgrade_id } if upgrade_id == id))
            .count()
    }
}

/// A halt calls back a drone that is out of reach, its upgrade queued for it on the broker. The
/// broker acknowledges the cancel, then crashes before it saved it: when it is back it holds
/// the upgrade (saved at an earlier, clean restart) but not the cancel. The hub keeps the cancel
/// in the drone's status until the drone acknowledges it and sends it again, so the drone gets
/// the cancel after its upgrade and does not install; once the drone reports the upgrade
/// canceled, the record goes and no more cancels are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_broker_lost_after_its_puback_still_reaches_the_drone() -> anyhow::Result<()> {
    use flightnode_hub::controller::mqtt::{MqttPublisher, MqttTarget};
    use flightnode_tests::mosquitto::{Mosquitto, mosquitto_binary};
    let mut broker = match Mosquitto::start() {
        Ok(b) => b,
        Err(e) if mosquitto_binary().is_err() => {
            eprintln!("SKIP: mosquitto is not installed ({e:#})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let Some((api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let (bad, far) = ("drone-0", "drone-1");
    create_drones(&admin, &[bad.to_owned(), far.to_owned()]).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    for name in [bad, far] {
        let r = Report {
            version: "1.0.0".into(),
            ..Report::default()
        };
        report(&sink, name, &r).await?;
    }
    // The far drone's session exists on the broker (it was online once); now it is out of reach.
    let mut link = DroneLink::new(broker.port(), far);
    link.connect().await?;
    link.drop_link();

    let publisher = Arc::new(MqttPublisher::start(&MqttTarget {
        url: broker.url(),
        ca: None,
        cert: None,
        key: None,
        client_id: "hub-controllers".into(),
        timeout: Duration::from_secs(5),
        signer: None,
    })?);
    anyhow::ensure!(
        publisher.wait_connected(Duration::from_secs(30)).await,
        "no broker"
    );
    let store = flightnode_hub::store::fleet::KubeFleet::start(hub.clone(), NS, "replica-a").await?;
    let mut c = Controllers::new(
        Arc::new(store),
        Arc::clone(&publisher) as _,
        Arc::new(flightnode_hub::metrics::Metrics::new()),
        flightnode_hub::controller::reconcile::ControllerConfig::default(),
    );
    c.config.policy.backoff = Duration::from_secs(2);
    c.config.policy.backoff_max = Duration::from_secs(4);
    api.apply_yaml(
        &admin,
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {name: fw-bad}\n\
         spec:\n  version: \"2.0.0\"\n  url: http://fw.example/2.0.0.fnb\n\
         \x20 selector: {matchLabels: {fleet: test}}\n\
         \x20 waves: [{count: 2, soak: 1h}]\n  droneTimeout: 1h\n\
         \x20 failurePolicy: {rules: [{kind: rolledBack, maxCount: 1}]}\n",
        Some(NS),
    )
    .await?;
    let upgrade_of = |n: &[FlightNode], name: &str| {
        n.iter()
            .find(|n| n.name_any() == name)
            .and_then(|n| n.status.clone()?.firmware_sync?.upgrade_id)
    };
    let (nodes, _) = step_until(&c, &admin, "both commands published", |n, _| {
        upgrade_of(n, bad).is_some() && upgrade_of(n, far).is_some()
    })
    .await?;
    let (bad_id, far_id) = (upgrade_of(&nodes, bad).unwrap(), upgrade_of(&nodes, far).unwrap());
    // A clean broker restart saves the far drone's queued upgrade.
    broker.restart()?;
    anyhow::ensure!(
        publisher.wait_connected(Duration::from_secs(30)).await,
        "no broker"
    );

    // The other canary rolls back: the breaker trips and calls the far drone back.
    let rolled_back = Report {
        version: "1.0.0".into(),
        last: Some((bad_id, "rolled_back", "health_check_failed")),
        ..Report::default()
    };
    report(&sink, bad, &rolled_back).await?;
    let pending = |n: &[FlightNode]| {
        n.iter()
            .find(|n| n.name_any() == far)
            .and_then(|n| n.status.clone()?.firmware_sync)
            .map(|s| (s.reason, s.pending_cancels))
    };
    step_until(
        &c,
        &admin,
        "halted, the far drone called back and its cancel sent",
        |n, r| {
            halted(r, "fw-bad")
            && n.iter()
                .any(|n| n.name_any() == far && n.spec.firmware.is_none())
            // Written only once the broker acknowledged the cancel.
            && pending(n).is_some_and(|(_, p)| p.iter().any(|p| p.upgrade_id == far_id))
        },
    )
    .await?;
    // The broker took the cancel (PUBACK) and dies before it saved it.
    broker.kill()?;
    broker.start_again()?;
    anyhow::ensure!(
        publisher.wait_connected(Duration::from_secs(30)).await,
        "no broker"
    );

    // The drone comes back in reach: its session hands it the upgrade saved before the crash.
    link.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(45);
    while link.cancels_of(&far_id) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the drone never got the cancel of {far_id}; it got {:?}; status: {:?}",
            link.commands(),
            pending(&lists(&admin).await?.0)
        );
        c.step().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let got = link.commands();
    let upgrade_at = got
        .iter()
        .position(|c| matches!(c, Command::Upgrade(u) if u.upgrade_id == far_id));
    let cancel_at = got
        .iter()
        .position(|c| matches!(c, Command::Cancel { upgrade_id } if *upgrade_id == far_id));
    assert!(
        upgrade_at.is_some() && upgrade_at < cancel_at,
        "the saved upgrade first, then the cancel sent again: {got:?}"
    );
    // Until the drone answers, its status says a cancel waits for it.
    let (nodes, _) = lists(&admin).await?;
    let (reason, waiting) = pending(&nodes).unwrap_or_default();
    assert_eq!(reason, "Canceling");
    assert!(
        waiting.len() == 1 && waiting[0].upgrade_id == far_id && waiting[0].sends >= 2,
        "{waiting:?}"
    );

    // The drone stops the upgrade (as the agent does when the cancel comes while it downloads)
    // and says so: the hub forgets the cancel and sends it no more.
    let canceled = Report {
        version: "1.0.0".into(),
        last: Some((far_id.clone(), "canceled", "canceled")),
        ..Report::default()
    };
    report(&sink, far, &canceled).await?;
    step_until(&c, &admin, "the cancel acknowledged", |n, _| pending(n).is_none()).await?;
    let sent = link.cancels_of(&far_id);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        c.step().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        link.cancels_of(&far_id),
        sent,
        "a cancel after the acknowledgement"
    );
    Ok(())
}
