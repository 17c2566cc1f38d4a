//! The controllers against a real kube-apiserver (skipped without `FLIGHTNODE_K8S_DIR`): the
//! committed CRDs install, the committed Role is all the hub needs (every hub request here runs
//! as the restricted `flight-controller` user bound to it), `kubectl`-style edits by another
//! field manager never fight the hub's fields, Leases elect one leader, Events are recorded, and
//! a restart or a failover mid-wave never installs twice.
//!
//! Drones are simulated at the API: their statuses are written the way the hub writes heartbeat
//! statuses (the real `KubeSink`, field manager `flightnode-hub`); commands are recorded by a
//! `CommandSink` instead of a broker (the MQTT path is covered by the fleet tests). The harness
//! is `common/cluster.rs`; overlapping rollouts, halts and edits are in `rollouts_kube.rs`.

mod common;

use common::cluster::{
    NS, Recorded, Report, cluster, controllers, create_drones, report, step_until, sync_reason,
};
use flightnode_hub::api::flightnode::FlightNode;
use flightnode_hub::api::rollout::{FirmwareRollout, condition};
use flightnode_hub::decide::node_sync::upgrade_id;
use flightnode_hub::decide::status::{Liveness, SpecView, from_heartbeat, with_conditions};
use flightnode_hub::store::kube::KubeSink;
use flightnode_hub::store::sink::{StatusSink, WriteRequest};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_spec_drives_one_install_across_restarts_and_kubectl_edits() -> anyhow::Result<()> {
    let Some((_api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let names = vec!["drone-1".to_owned()];
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    let mut r = Report {
        version: "1.0.0".into(),
        ..Report::default()
    };
    report(&sink, "drone-1", &r).await?;
    // The operator sets the wanted firmware with kubectl (field manager "kubectl").
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let want = serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
        "metadata": { "name": "drone-1", "labels": { "fleet": "test" } },
        "spec": { "hardwareId": "hw-x1", "firmware": { "version": "2.0.0", "url": "http://fw.example/2.0.0.fnb" } },
    });
    let node = nodes
        .patch("drone-1", &PatchParams::apply("kubectl"), &Patch::Apply(&want))
        .await?;
    let id = upgrade_id(
        &node.uid().unwrap_or_default(),
        node.metadata.generation.unwrap_or(0),
        1,
    );

    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    step_until(&c, &admin, "firmwareSync InProgress", |n, _| {
        sync_reason(n, "drone-1").as_deref() == Some("InProgress")
    })
    .await?;
    assert_eq!(commands.upgrades().get("drone-1"), Some(&vec![id.clone()]));
    // A restart: a new controller with a new cache publishes nothing new.
    drop(c);
    let c = controllers(&hub, Arc::clone(&commands), "replica-b").await?;
    let decisions = || c.metrics.node_decisions.get();
    for _ in 0..100 {
        if decisions() > 0 {
            break;
        }
        c.step().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        c.step().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        commands.upgrades().get("drone-1"),
        Some(&vec![id.clone()]),
        "no second install"
    );
    // Passes over an unchanged drone whose redelivery is not due do not decide it again.
    let settled = decisions();
    for _ in 0..3 {
        c.step().await;
    }
    assert_eq!(decisions(), settled, "an unchanged drone was decided again");

    // kubectl edits a label: no conflict with the hub's fields, and the hub's status stays.
    let relabel = serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
        "metadata": { "name": "drone-1", "labels": { "fleet": "test", "site": "north" } },
        "spec": { "hardwareId": "hw-x1", "firmware": { "version": "2.0.0", "url": "http://fw.example/2.0.0.fnb" } },
    });
    nodes
        .patch("drone-1", &PatchParams::apply("kubectl"), &Patch::Apply(&relabel))
        .await?;
    // The edit is a change: the next passes decide the drone again.
    for _ in 0..100 {
        if decisions() > settled {
            break;
        }
        c.step().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(decisions() > settled, "the edited drone is decided again");
    let got = nodes.get("drone-1").await?;
    assert_eq!(
        got.status
            .as_ref()
            .and_then(|s| s.firmware_sync.as_ref())
            .map(|s| s.reason.as_str()),
        Some("InProgress")
    );
    let managers: Vec<String> = got
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"flightnode-hub-reconciler".to_owned()),
        "{managers:?}"
    );
    assert!(managers.contains(&"flightnode-hub".to_owned()), "{managers:?}");

    // The drone picks it up, then commits: Synced, and a heartbeat status write (another field
    // manager) does not wipe the reconciler's record.
    r.current = Some(id.clone());
    report(&sink, "drone-1", &r).await?;
    r = Report {
        version: "2.0.0".into(),
        current: None,
        last: Some((id.clone(), "committed", "")),
        ..Report::default()
    };
    report(&sink, "drone-1", &r).await?;
    step_until(&c, &admin, "Synced", |n, _| {
        sync_reason(n, "drone-1").as_deref() == Some("Synced")
    })
    .await?;
    report(&sink, "drone-1", &r).await?;
    let got = nodes.get("drone-1").await?;
    assert_eq!(
        got.status.and_then(|s| s.firmware_sync).map(|s| s.reason),
        Some("Synced".to_owned())
    );
    assert_eq!(
        commands.upgrades().get("drone-1"),
        Some(&vec![id]),
        "exactly one install"
    );
    Ok(())
}

fn rollout_yaml(version: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {{name: fleet-upgrade}}\n\
         spec:\n  version: \"{version}\"\n  url: http://fw.example/{version}.fnb\n\
         \x20 selector: {{matchLabels: {{fleet: test}}}}\n\
         \x20 waves: [{{count: 2}}, {{percent: 50}}]\n\
         \x20 failurePolicy: {{rules: [{{kind: rolledBack, thresholdPercent: 50, minFinished: 2}}]}}\n"
    )
}

fn halted(r: &[FirmwareRollout]) -> bool {
    r.iter().any(|r| {
        r.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::HALTED && c.status == "True")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_trips_the_breaker_then_a_good_build_rolls_through_with_a_failover() -> anyhow::Result<()> {
    let Some((api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let names: Vec<String> = (0..8).map(|i| format!("drone-{i}")).collect();
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    for n in &names {
        report(
            &sink,
            n,
            &Report {
                version: "1.0.0".into(),
                ..Report::default()
            },
        )
        .await?;
    }
    api.apply_yaml(&admin, &rollout_yaml("2.0.0-bad"), Some(NS))
        .await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    step_until(&c, &admin, "canary commands", |_, _| {
        commands.upgrades().len() == 2
    })
    .await?;
    // The canary rolls back: the breaker trips in wave 0.
    for (device, ids) in commands.upgrades() {
        let last = Some((ids[0].clone(), "rolled_back", "health_check_failed"));
        report(
            &sink,
            &device,
            &Report {
                version: "1.0.0".into(),
                current: None,
                last,
                ..Report::default()
            },
        )
        .await?;
    }
    step_until(&c, &admin, "Halted", |_, r| halted(r)).await?;
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    let r = rollouts.get("fleet-upgrade").await?;
    let s = r.status.clone().unwrap_or_default();
    assert_eq!(
        (s.current_wave, s.counts.rolled_back, s.counts.not_started),
        (0, 2, 6),
        "{s:?}"
    );
    let why = s
        .conditions
        .iter()
        .find(|c| c.type_ == condition::HALTED)
        .unwrap();
    assert!(why.message.contains("rolledBack 2 of 2"), "{}", why.message);
    for _ in 0..3 {
        c.step().await;
    }
    assert_eq!(
        commands.upgrades().len(),
        2,
        "no dispatch after the breaker tripped"
    );
    // The Event, recorded with the restricted user's rights (events.k8s.io/v1).
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), NS);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.contains(&"Halted".to_owned()), "{reasons:?}");

    // An operator pins one drone by hand: the rollout must never overwrite it.
    let pinned = names
        .iter()
        .find(|n| !commands.upgrades().contains_key(*n))
        .cloned()
        .unwrap();
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let pin = serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
        "metadata": { "name": pinned, "labels": { "fleet": "test" } },
        "spec": { "hardwareId": "hw-x1", "firmware": { "version": "1.0.0", "url": "http://fw.example/1.0.0.fnb" } },
    });
    nodes
        .patch(&pinned, &PatchParams::apply("kubectl"), &Patch::Apply(&pin))
        .await?;

    // A good build: a new generation resumes; drones commit as soon as they get the command.
    let bad_ids: std::collections::BTreeSet<String> = commands.upgrades().into_values().flatten().collect();
    api.apply_yaml(&admin, &rollout_yaml("2.0.1"), Some(NS)).await?;
    let drive = |commands: Arc<Recorded>, sink: KubeSink| {
        let bad_ids = bad_ids.clone();
        async move {
            for (device, ids) in commands.upgrades() {
                let id = ids.last().cloned().unwrap_or_default();
                if bad_ids.contains(&id) {
                    continue;
                }
                let last = Some((id, "committed", ""));
                let _ = report(
                    &sink,
                    &device,
                    &Report {
                        version: "2.0.1".into(),
                        current: None,
                        last,
                        ..Report::default()
                    },
                )
                .await;
            }
        }
    };
    // Replica A works the first wave, then dies mid-rollout; replica B takes over.
    step_until(&c, &admin, "wave 0 of the good build", |n, _| {
        n.iter()
            .filter(|n| n.spec.firmware.as_ref().is_some_and(|f| f.version == "2.0.1"))
            .count()
            >= 2
    })
    .await?;
    c.step().await;
    drive(Arc::clone(&commands), sink.clone()).await;
    drop(c);
    let b = controllers(&hub, Arc::clone(&commands), "replica-b").await?;
    let done = |r: &[FirmwareRollout]| {
        r.iter().any(|r| {
            r.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == condition::COMPLETE && c.status == "True")
            })
        })
    };
    for _ in 0..60 {
        b.step().await;
        drive(Arc::clone(&commands), sink.clone()).await;
        if done(&rollouts.list(&ListParams::default()).await?.items) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = rollouts.get("fleet-upgrade").await?;
    let s = r.status.clone().unwrap_or_default();
    assert!(done(std::slice::from_ref(&r)), "{s:?}");
    assert_eq!((s.counts.succeeded, s.counts.pinned), (7, 1), "{s:?}");
    // Never two installs of one generation's upgrade on a drone: every drone saw one distinct
    // id per node generation (re-publishing the same id is the agent's no-op).
    for (device, ids) in commands.upgrades() {
        assert_ne!(device, pinned, "the pinned drone got a command");
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        let canary = ids.iter().any(|i| bad_ids.contains(i));
        // The canary got the bad build and then the good one; everyone else one install.
        assert_eq!(distinct.len(), if canary { 2 } else { 1 }, "{device}: {ids:?}");
    }
    let pinned_node = nodes.get(&pinned).await?;
    assert_eq!(
        pinned_node.spec.firmware.map(|f| f.version),
        Some("1.0.0".to_owned())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_holder_and_a_failover() -> anyhow::Result<()> {
    use flightnode_hub::controller::lease::{Leadership, LeaseConfig, run};
    let Some((_api, _admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let config = |id: &str| LeaseConfig {
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(300),
        renew_deadline: Duration::from_secs(2),
        ..LeaseConfig::new(NS, id)
    };
    let (a_rx, b_rx) = (Leadership::follower(), Leadership::follower());
    let (stop_a, stop_a_rx) = tokio::sync::watch::channel(false);
    let (stop_b, stop_b_rx) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(run(hub.clone(), config("replica-a"), a_rx.clone(), stop_a_rx));
    let b = tokio::spawn(run(hub.clone(), config("replica-b"), b_rx.clone(), stop_b_rx));
    let wait_leader = |l: Leadership| async move {
        tokio::time::timeout(Duration::from_secs(30), l.gained())
            .await
            .is_ok()
    };
    assert!(wait_leader(a_rx.clone()).await || wait_leader(b_rx.clone()).await);
    for _ in 0..10 {
        assert!(!(a_rx.is_leader() && b_rx.is_leader()), "two leaders");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A hard kill of the leader (abort: no release): the other waits out the lease, then leads.
    let (leader_task, follower_rx) = if a_rx.is_leader() {
        (a, b_rx.clone())
    } else {
        (b, a_rx.clone())
    };
    leader_task.abort();
    assert!(
        wait_leader(follower_rx).await,
        "the follower took over after the leader died"
    );
    drop((stop_a, stop_b));
    Ok(())
}

/// Two replicas run side by side the way `serve --controllers` runs them (a Lease loop and the
/// reconcile loop each); the leader is killed (tasks aborted: no Lease release, no last write)
/// while the second wave is in flight, and the drones of that wave finish while nobody leads.
/// The standby sent nothing while the leader lived, takes over after the Lease expires, counts
/// the outcomes that arrived in the gap, and no drone got two installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_wave_hands_over_without_a_second_install() -> anyhow::Result<()> {
    use flightnode_hub::controller::lease::{Leadership, LeaseConfig, run};
    let Some((api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let names: Vec<String> = (0..6).map(|i| format!("drone-{i}")).collect();
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    let old = Report {
        version: "1.0.0".into(),
        ..Report::default()
    };
    for n in &names {
        report(&sink, n, &old).await?;
    }
    api.apply_yaml(
        &admin,
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {name: ha}\n\
         spec:\n  version: \"2.0.0\"\n  url: http://fw.example/2.0.0.fnb\n\
         \x20 selector: {matchLabels: {fleet: test}}\n  waves: [{count: 2}, {count: 4}]\n",
        Some(NS),
    )
    .await?;

    #[allow(
        clippy::items_after_statements,
        reason = "the replica type only this test uses"
    )]
    struct Replica {
        commands: Arc<Recorded>,
        leader: Leadership,
        tasks: Vec<tokio::task::JoinHandle<()>>,
        _stop: tokio::sync::watch::Sender<bool>,
    }
    let start = |id: &'static str| {
        let hub = hub.clone();
        async move {
            let lease = LeaseConfig {
                duration: Duration::from_secs(3),
                renew_every: Duration::from_millis(300),
                renew_deadline: Duration::from_secs(2),
                ..LeaseConfig::new(NS, id)
            };
            let rx = Leadership::follower();
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let commands = Arc::new(Recorded::default());
            let mut c = controllers(&hub, Arc::clone(&commands), id).await?;
            c.config.interval = Duration::from_millis(300);
            let tasks = vec![
                tokio::spawn(run(hub.clone(), lease, rx.clone(), stop_rx)),
                tokio::spawn(c.run(rx.clone())),
            ];
            anyhow::Ok(Replica {
                commands,
                leader: rx,
                tasks,
                _stop: stop,
            })
        }
    };
    let a = start("replica-a").await?;
    let b = start("replica-b").await?;
    let both = |a: &Replica, b: &Replica| {
        let mut all = a.commands.upgrades();
        for (d, ids) in b.commands.upgrades() {
            all.entry(d).or_default().extend(ids);
        }
        all
    };
    // A drone "installs" each distinct upgrade id once (the agent deduplicates redeliveries).
    let installed: Mutex<BTreeMap<String, Vec<String>>> = Mutex::default();
    let drive = |cmds: BTreeMap<String, Vec<String>>, only: Option<Vec<String>>| {
        let sink = sink.clone();
        let installed = &installed;
        async move {
            for (device, ids) in cmds {
                if only.as_ref().is_some_and(|o| !o.contains(&device)) {
                    continue;
                }
                for id in ids {
                    let new = {
                        let mut m = installed.lock().unwrap();
                        let seen = m.entry(device.clone()).or_default();
                        let new = !seen.contains(&id);
                        if new {
                            seen.push(id.clone());
                        }
                        new
                    };
                    if new {
                        let last = Some((id.clone(), "committed", ""));
                        let done = Report {
                            version: "2.0.0".into(),
                            current: None,
                            last,
                            ..Report::default()
                        };
                        report(&sink, &device, &done).await?;
                    }
                }
            }
            anyhow::Ok(())
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_mins(2);
    let wait = |what: &str| {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
    };

    // The canary finishes; the leader dispatches the second wave.
    let canary: Vec<String> = loop {
        let cmds = both(&a, &b);
        if cmds.len() >= 2 {
            break cmds.keys().cloned().collect();
        }
        wait("the canary");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (leader, follower) = if a.leader.is_leader() { (a, b) } else { (b, a) };
    assert!(leader.leader.is_leader() && !follower.leader.is_leader());
    drive(both(&leader, &follower), Some(canary.clone())).await?;
    while both(&leader, &follower).len() < 4 {
        wait("the second wave");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        follower.commands.all().is_empty(),
        "the standby sent commands while the leader lived: {:?}",
        follower.commands.all()
    );
    // Kill the leader mid-wave; the second wave's drones finish while nobody leads.
    for t in &leader.tasks {
        t.abort();
    }
    drive(both(&leader, &follower), None).await?;
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    let complete = |r: &FirmwareRollout| {
        r.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::COMPLETE && c.status == "True")
        })
    };
    loop {
        drive(both(&leader, &follower), None).await?;
        if complete(&rollouts.get("ha").await?) {
            break;
        }
        wait("Complete after the failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(follower.leader.is_leader(), "the standby leads");
    assert!(
        !follower.commands.all().is_empty(),
        "the standby dispatched the rest"
    );
    let s = rollouts.get("ha").await?.status.unwrap_or_default();
    assert_eq!(
        (s.counts.total, s.counts.succeeded, s.counts.failed_total),
        (6, 6, 0),
        "{s:?}"
    );
    // Every drone: one distinct upgrade id over both replicas (re-sending the same id is the
    // agent's no-op), so one install.
    let all = both(&leader, &follower);
    assert_eq!(all.len(), 6, "{all:?}");
    for (device, ids) in &all {
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), 1, "{device}: {ids:?}");
    }
    for t in &follower.tasks {
        t.abort();
    }
    Ok(())
}

/// A device id that is no valid object name (upper case, `_`, 64 characters) on the real API
/// server: its FlightNode has the derived name the API server accepts, the status the hub writes
/// keeps the real id (the committed CRD has the field), and the command goes to the real id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_that_is_no_object_name_gets_its_commands() -> anyhow::Result<()> {
    use flightnode_hub::api::flightnode::object_name;
    let Some((_api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let ids = ["Drone_7".to_owned(), format!("UAV_{}", "Q".repeat(60))];
    let names: Vec<String> = ids.iter().map(|id| object_name(id)).collect();
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    for (id, name) in ids.iter().zip(&names) {
        let hb = flightnode_proto::sample::idle_heartbeat(id, "1.0.0");
        let now = flightnode_hub::decide::status::rfc3339(time::OffsetDateTime::now_utc());
        let status = with_conditions(
            from_heartbeat(&hb),
            Liveness::Online,
            &SpecView::default(),
            &[],
            &now,
        );
        let req = WriteRequest {
            name: name.clone(),
            device_id: id.clone(),
            hardware_id: "hw-x1".into(),
            status,
            events: Vec::new(),
        };
        sink.write_status(&req)
            .await
            .map_err(|e| anyhow::anyhow!("status of {name}: {e}"))?;
        let want = serde_json::json!({
            "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
            "metadata": { "name": name, "labels": { "fleet": "test" } },
            "spec": { "hardwareId": "hw-x1", "firmware": { "version": "2.0.0", "url": "http://fw.example/2.0.0.fnb" } },
        });
        nodes
            .patch(name, &PatchParams::apply("kubectl"), &Patch::Apply(&want))
            .await?;
        let stored = nodes.get(name).await?;
        assert_eq!(
            stored.status.and_then(|s| s.device_id).as_deref(),
            Some(id.as_str()),
            "status.deviceId survives the schema"
        );
    }
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    step_until(&c, &admin, "both commands", |_, _| commands.upgrades().len() == 2).await?;
    let got: Vec<String> = commands.upgrades().into_keys().collect();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want);
    Ok(())
}

/// A TCP relay to the API server that can be frozen: bytes stop moving both ways, the way calls
/// hang when the server or the network stalls (kube's client has no read timeout).
struct Freezable {
    url: String,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to`, holding every chunk while `frozen` is set.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn freezable(upstream_port: u16) -> anyhow::Result<Freezable> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(relay(cr, sw, Arc::clone(&flag)));
            tokio::spawn(relay(sr, cw, Arc::clone(&flag)));
        }
    });
    Ok(Freezable { url, frozen })
}

/// The leader's Lease calls hang (the relay to the API server freezes) while its controllers
/// keep running: it must stop writing and publishing by its own clock, before the other replica
/// may take over, instead of leading forever next to the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_calls_hang_writes_and_publishes_nothing_after_the_takeover()
-> anyhow::Result<()> {
    use flightnode_hub::controller::fence::{FencedCommands, FencedStore};
    use flightnode_hub::controller::lease::{Leadership, LeaseConfig, run};
    let Some((api, admin, hub)) = cluster().await? else {
        return Ok(());
    };
    let relay = freezable(api.port()).await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(api.restricted_kubeconfig())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    config.cluster_url = relay.url.parse()?;
    let hung_lease_client = Client::try_from(config)?;

    let lease = |id: &str| LeaseConfig {
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(300),
        renew_deadline: Duration::from_secs(2),
        ..LeaseConfig::new(NS, id)
    };
    let start = |id: &'static str, lease_client: Client| {
        let hub = hub.clone();
        let lease = lease(id);
        async move {
            let leader = Leadership::follower();
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let commands = Arc::new(Recorded::default());
            let mut c = controllers(&hub, Arc::clone(&commands), id).await?;
            c.config.interval = Duration::from_millis(300);
            c.store = Arc::new(FencedStore::new(c.store, leader.clone()));
            c.commands = Arc::new(FencedCommands::new(c.commands, leader.clone()));
            tokio::spawn(run(lease_client, lease, leader.clone(), stop_rx));
            tokio::spawn(c.run(leader.clone()));
            anyhow::Ok((leader, commands, stop))
        }
    };
    let (a, a_commands, _stop_a) = start("replica-a", hung_lease_client).await?;
    tokio::time::timeout(Duration::from_secs(30), a.gained()).await?;
    let (b, b_commands, _stop_b) = start("replica-b", hub.clone()).await?;

    relay.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), b.gained()).await?;
    assert!(
        !a.is_leader(),
        "two leaders: the hung one still believes it leads"
    );

    // Work for whoever leads: a drone that wants 2.0.0.
    create_drones(&admin, &["drone-z".to_owned()]).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    let old = Report {
        version: "1.0.0".into(),
        ..Report::default()
    };
    report(&sink, "drone-z", &old).await?;
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    nodes
        .patch(
            "drone-z",
            &PatchParams::apply("kubectl"),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
                "metadata": { "name": "drone-z", "labels": { "fleet": "test" } },
                "spec": { "hardwareId": "hw-x1", "firmware": { "version": "2.0.0", "url": "http://fw.example/2.0.0.fnb" } },
            })),
        )
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !b_commands.upgrades().contains_key("drone-z") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the new leader never dispatched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Steps of the old replica's controllers keep coming; give them time to misbehave.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !a_commands.upgrades().contains_key("drone-z"),
        "the replica that lost the lease published: {:?}",
        a_commands.all()
    );
    assert!(b.is_leader() && !a.is_leader());
    Ok(())
}
