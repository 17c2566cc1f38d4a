//! A controller leader stopped with SIGSTOP past its lease and resumed, with real processes: two
//! `flightnode-hub serve --store kube --controllers` replicas on a real kube-apiserver (skipped
//! without `FLIGHTNODE_K8S_DIR`) and a real mosquitto. The leader is stopped mid-rollout; the
//! other replica takes the Lease and finishes the rollout; the first one is resumed with a stale
//! picture of the world (its canary "timed out" while it was stopped) and must write and publish
//! nothing: not the rollout's status, not a drone's `spec.firmware` or `firmwareSync`, no Event,
//! no command.
//!
//! What tells the two replicas apart: each has its own MQTT client id (the broker logs who
//! published what) and its own Event `reportingInstance`; and while the resumed one is watched,
//! the other is stopped too, so any write in that window can only be the resumed one's.
//!
//! Drones are simulated at the API (statuses written as the hub writes heartbeat statuses): a
//! drone "installs" an upgrade command it receives on the real broker by reporting it committed.

mod common;

use common::cluster::{NS, Report, cluster, create_drones, report};
use flightnode_hub::api::flightnode::FlightNode;
use flightnode_hub::api::rollout::{FirmwareRollout, condition};
use flightnode_hub::store::kube::KubeSink;
use flightnode_proto::mqtt::{Command, parse_command};
use flightnode_tests::fleet::{Hub, KubeStore, pause_child};
use flightnode_tests::mosquitto::{Mosquitto, mosquitto_binary};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROLLOUT: &str = "fw-2";

/// Every upgrade command the drones' topics carried, in order: (device, upgrade id).
#[derive(Default, Clone)]
struct Topics(Arc<Mutex<Vec<(String, String)>>>);

impl Topics {
    fn upgrades(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }

    /// Subscribes to every drone's upgrade topic on the broker at `port`. With `pause`, that
    /// process is stopped (SIGSTOP) the moment the first upgrade command arrives.
    async fn subscribe(port: u16, pause: Option<u32>) -> anyhow::Result<Topics> {
        let topics = Topics::default();
        let options = rumqttc::MqttOptions::new("drones", "127.0.0.1", port);
        let seen = topics.clone();
        // NB: the task runs for the rest of the test; it ends with the runtime.
        let _link = common::subscribe(options, "firmware/+/upgrade", move |p| {
            let device = p.topic.split('/').nth(1).unwrap_or_default().to_owned();
            if let Ok(Command::Upgrade(u)) = parse_command(&p.payload, &device) {
                let mut seen = seen.0.lock().unwrap();
                if let Some(pid) = pause.filter(|_| seen.is_empty()) {
                    pause_child(pid).unwrap();
                }
                seen.push((device, u.upgrade_id));
            }
        })
        .await?;
        Ok(topics)
    }
}

/// The drones install what they were sent: each upgrade command seen so far is reported
/// committed, once.
async fn install(topics: &Topics, sink: &KubeSink, done: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for (device, id) in topics.upgrades() {
        if done.insert(id.clone()) {
            let r = Report {
                version: "2.0.0".into(),
                last: Some((id, "committed", "")),
                ..Report::default()
            };
            report(sink, &device, &r).await?;
        }
    }
    Ok(())
}

async fn holder(admin: &Client) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    Ok(leases
        .get_opt("flightnode-hub-controller")
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

/// Waits until `id` holds the controller Lease.
async fn wait_holder(admin: &Client, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while holder(admin).await?.as_deref() != Some(id) {
        anyhow::ensure!(Instant::now() < deadline, "{id} never held the Lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn replica(
    dir: &std::path::Path,
    api: &flightnode_tests::apiserver::ApiServer,
    broker: &Mosquitto,
    id: &str,
) -> anyhow::Result<Hub> {
    let dir = dir.join(id);
    std::fs::create_dir_all(&dir)?;
    let extra = [
        "--controllers",
        "--identity",
        id,
        "--mqtt-url",
        &broker.url(),
        "--mqtt-client-id",
        "ctl",
        "--reconcile-interval",
        "1s",
        // No drone reports to these replicas; the simulated statuses must not go stale under
        // them (a replica marking a drone offline would be a write of its heartbeat side).
        "--offline-after",
        "10m",
        "--status-refresh",
        "10m",
    ];
    let mut hub = Hub::new(&dir, extra.iter().map(|s| (*s).to_owned()).collect())?;
    hub.kube = Some(KubeStore {
        kubeconfig: api.restricted_kubeconfig(),
        namespace: NS.to_owned(),
    });
    hub.start()?;
    Ok(hub)
}

/// What the resumed replica could have written: resourceVersions of the rollout and of every
/// drone, the rollout's status, the Events.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rollout_rv: Option<String>,
    rollout_status: String,
    nodes: BTreeMap<String, Option<String>>,
    events: BTreeSet<String>,
}

async fn snapshot(admin: &Client) -> anyhow::Result<Snapshot> {
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    let r = rollouts.get(ROLLOUT).await?;
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    Ok(Snapshot {
        rollout_rv: r.metadata.resource_version.clone(),
        rollout_status: serde_json::to_string(&r.status)?,
        nodes: nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|n| (n.name_any(), n.metadata.resource_version.clone()))
            .collect(),
        events: events
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|e| {
                format!(
                    "{} {:?} {:?}",
                    e.name_any(),
                    e.reason,
                    e.metadata.resource_version
                )
            })
            .collect(),
    })
}

/// Publishes the broker logged from MQTT client `client` (mosquitto's `log_type all`).
fn publishes_from(log: &str, client: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("Received PUBLISH from {client} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_lease_and_resumed_writes_and_publishes_nothing() -> anyhow::Result<()> {
    let broker = match Mosquitto::start() {
        Ok(b) => b,
        Err(e) if mosquitto_binary().is_err() => {
            eprintln!("SKIP: mosquitto is not installed ({e:#})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let Some((api, admin, hub_client)) = cluster().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let names: Vec<String> = (0..6).map(|i| format!("drone-{i}")).collect();
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub_client.clone(), NS, Duration::from_secs(10));
    for name in &names {
        let r = Report {
            version: "1.0.0".into(),
            ..Report::default()
        };
        report(&sink, name, &r).await?;
    }
    let a = replica(dir.path(), &api, &broker, "replica-a")?;
    wait_holder(&admin, "replica-a", Duration::from_secs(30)).await?;
    let topics = Topics::subscribe(broker.port(), a.pid()).await?;
    let b = replica(dir.path(), &api, &broker, "replica-b")?;

    // A canary of two, then everyone. The canary times out 8 s after its dispatch: long enough
    // for the drones to answer while the leader runs, short enough to have passed by the time
    // the stopped leader is resumed.
    api.apply_yaml(
        &admin,
        &format!(
            "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {{name: {ROLLOUT}}}\n\
             spec:\n  version: \"2.0.0\"\n  url: http://fw.example/2.0.0.fnb\n\
             \x20 selector: {{matchLabels: {{fleet: test}}}}\n\
             \x20 waves: [{{count: 2, soak: 1s}}]\n  droneTimeout: 8s\n"
        ),
        Some(NS),
    )
    .await?;
    // The leader stops the moment its first command reaches a drone: in the middle of its
    // node reconciler's pass over the canary, with the other canary drone's record and command
    // still to come (or on their way).
    let deadline = Instant::now() + Duration::from_secs(30);
    while topics.upgrades().is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "no canary command:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        (1..=2).contains(&publishes_from(&broker.log(), "ctl-replica-a")),
        "the leader sent the canary"
    );

    // The canary installs while the leader is stopped; the other replica takes the Lease once
    // it saw no renewal for the lease's 15 s, and finishes the rollout.
    let mut installed = BTreeSet::new();
    install(&topics, &sink, &mut installed).await?;
    wait_holder(&admin, "replica-b", Duration::from_mins(1)).await?;
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        install(&topics, &sink, &mut installed).await?;
        let r = rollouts.get(ROLLOUT).await?;
        if r.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::COMPLETE && c.status == "True")
        }) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "replica-b did not complete the rollout: {:?}\n{}",
            r.status,
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let upgraded: BTreeSet<String> = topics.upgrades().into_iter().map(|(d, _)| d).collect();
    assert_eq!(upgraded.len(), names.len(), "{:?}", topics.upgrades());
    // Let B's last writes (the Completed event) land, then stop B as well: from here on only
    // the resumed replica could change anything. B still holds a fresh Lease, so A may not take
    // it over for another 15 s of seeing it unchanged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.pause()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = snapshot(&admin).await?;
    let published_before = topics.upgrades().len();
    let a_publishes = publishes_from(&broker.log(), "ctl-replica-a");

    a.resume()?;
    // It resumes in the middle of a pass, on a picture of the world 20-odd seconds old: a
    // canary record and command still to write and send, the canary dispatched and past its
    // timeout with no result. Acting on it would rewrite that record, send the command again,
    // time the canary out, dispatch stand-ins, set the rollout back to wave 0 and Complete
    // False. Give it time to do so.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = snapshot(&admin).await?;
    let a_log = a.log();
    b.resume()?;

    assert_eq!(
        publishes_from(&broker.log(), "ctl-replica-a"),
        a_publishes,
        "the resumed replica published after the takeover:\n{a_log}"
    );
    assert_eq!(
        topics.upgrades().len(),
        published_before,
        "commands went out while only the resumed replica ran: {:?}",
        topics.upgrades()
    );
    assert_eq!(
        after, before,
        "the resumed replica wrote after the takeover:\n{a_log}"
    );
    assert!(
        holder(&admin).await?.as_deref() == Some("replica-b"),
        "the resumed replica took the Lease back from a live holder"
    );
    // Nothing it did ever reached an Event: it recorded none (it never advanced a wave).
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let from_a: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reporting_instance.as_deref() == Some("replica-a"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.note))
        .collect();
    assert!(from_a.is_empty(), "events from the stopped replica: {from_a:?}");
    let r = rollouts.get(ROLLOUT).await?;
    let status = r.status.unwrap_or_default();
    assert!(status.current_wave >= 1, "{status:?}");
    assert_eq!(status.counts.succeeded, 6, "{status:?}");
    Ok(())
}
