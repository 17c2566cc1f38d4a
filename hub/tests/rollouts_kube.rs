//! Rollouts under real operations, on a real kube-apiserver (skipped without
//! `FLIGHTNODE_K8S_DIR`; the harness is `common/cluster.rs`, every hub request runs as the user
//! bound to the committed Role):
//!
//! - two overlapping rollouts created a second apart: the older yields (its status says so), no
//!   drone is ever commanded old, new, old, and once both completed nobody sends anything;
//! - a halt calls back the canary drone that timed out offline and the one in `Retrying`, no
//!   retry follows, the offline one gets a cancel when it returns, and an edit of the breaker's
//!   rules does not resume the halted rollout;
//! - pausing a rollout soaking in its second wave keeps the wave and its soak;
//! - a wave with a flight soak holds the next wave until its canary's FlightNode shows a flight
//!   on the new firmware;
//! - a drone whose `spec.firmware` a person edited after the dispatch counts as pinned, so the
//!   wave finishes; each rollout writes under its own field manager;
//! - a maintenance window that is closed holds every dispatch and the status names its next
//!   opening in the window's time zone; once the operator edits it open, the rollout dispatches.
//!
//! Drones are simulated at the API (statuses written as the hub writes heartbeat statuses); a
//! drone "installs" the last upgrade command it got by reporting it committed.

mod common;

use common::cluster::{
    NS, Recorded, Report, cluster, controllers, create_drones, lists, report, sync_records,
};
use flightnode_hub::api::flightnode::FlightNode;
use flightnode_hub::api::rollout::{FirmwareRollout, condition};
use flightnode_hub::controller::reconcile::Controllers;
use flightnode_hub::store::kube::KubeSink;
use flightnode_proto::mqtt::Command;
use flightnode_tests::apiserver::ApiServer;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rollout(name: &str, version: &str, rest: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {{name: {name}}}\n\
         spec:\n  version: \"{version}\"\n  url: http://fw.example/{version}.fnb\n\
         \x20 selector: {{matchLabels: {{fleet: test}}}}\n{rest}"
    )
}

fn condition_of(r: &FirmwareRollout, type_: &str) -> Option<flightnode_hub::api::meta::Condition> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// Every drone reports its last upgrade command committed (once per upgrade id).
struct Installs {
    done: BTreeSet<String>,
}

impl Installs {
    async fn drive(&mut self, commands: &Recorded, sink: &KubeSink) -> anyhow::Result<()> {
        let mut last: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (device, cmd) in commands.all() {
            match cmd {
                Command::Upgrade(u) => {
                    let version = u.version.map(|v| v.to_string()).unwrap_or_default();
                    last.insert(device, (u.upgrade_id, version));
                }
                Command::Cancel { upgrade_id } => {
                    if last.get(&device).is_some_and(|(id, _)| *id == upgrade_id) {
                        last.remove(&device);
                    }
                }
            }
        }
        for (device, (id, version)) in last {
            if self.done.insert(id.clone()) {
                let r = Report {
                    version,
                    last: Some((id, "committed", "")),
                    ..Report::default()
                };
                report(sink, &device, &r).await?;
            }
        }
        Ok(())
    }
}

/// Steps (and lets the drones install, when `installs` is given) until `done` holds on a fresh
/// read.
async fn run_until<F>(
    c: &Controllers,
    admin: &Client,
    drive: Option<(&mut Installs, &Recorded, &KubeSink)>,
    what: &str,
    done: F,
) -> anyhow::Result<(Vec<FlightNode>, Vec<FirmwareRollout>)>
where
    F: Fn(&[FlightNode], &[FirmwareRollout]) -> bool,
{
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut drive = drive;
    loop {
        c.step().await;
        if let Some((installs, commands, sink)) = drive.as_mut() {
            installs.drive(commands, sink).await?;
        }
        let (n, r) = lists(admin).await?;
        if done(&n, &r) {
            return Ok((n, r));
        }
        if Instant::now() > deadline {
            let syncs = sync_records(&n);
            let rollouts: Vec<_> = r.iter().map(|r| (r.name_any(), &r.status)).collect();
            anyhow::bail!("timed out waiting for: {what}\nrollouts: {rollouts:#?}\ndrones: {syncs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn is(r: &[FirmwareRollout], name: &str, type_: &str) -> bool {
    r.iter()
        .any(|r| r.name_any() == name && condition_of(r, type_).is_some())
}

async fn fleet(n: usize) -> anyhow::Result<Option<(ApiServer, Client, Client, KubeSink, Vec<String>)>> {
    let Some((api, admin, hub)) = cluster().await? else {
        return Ok(None);
    };
    let names: Vec<String> = (0..n).map(|i| format!("drone-{i}")).collect();
    create_drones(&admin, &names).await?;
    let sink = KubeSink::new(hub.clone(), NS, Duration::from_secs(10));
    for name in &names {
        let r = Report {
            version: "1.0.0".into(),
            ..Report::default()
        };
        report(&sink, name, &r).await?;
    }
    Ok(Some((api, admin, hub, sink, names)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_rollouts_never_take_turns_on_a_drone() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, names)) = fleet(4).await? else {
        return Ok(());
    };
    api.apply_yaml(
        &admin,
        &rollout("fw-old", "7.0.0", "  waves: [{count: 1}]\n"),
        Some(NS),
    )
    .await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    let mut installs = Installs {
        done: BTreeSet::new(),
    };
    run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "the old rollout's canary",
        |_, _| !commands.upgrades().is_empty(),
    )
    .await?;
    // A second later (creation times have whole seconds), a newer rollout over the same drones.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.apply_yaml(
        &admin,
        &rollout("fw-new", "7.1.0", "  waves: [{count: 2}]\n"),
        Some(NS),
    )
    .await?;
    let (nodes, rollouts) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "both rollouts Complete",
        |n, r| {
            is(r, "fw-old", condition::COMPLETE)
                && is(r, "fw-new", condition::COMPLETE)
                && n.iter().all(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.firmware.as_ref())
                        .and_then(|f| f.committed_version.as_deref())
                        == Some("7.1.0")
                })
        },
    )
    .await?;
    // The older one yields, and says to whom.
    let old = rollouts.iter().find(|r| r.name_any() == "fw-old").unwrap();
    let superseded = condition_of(old, condition::SUPERSEDED).expect("fw-old has Superseded=True");
    assert_eq!(superseded.reason, "NewerRollout");
    assert!(superseded.message.contains("fw-new"), "{}", superseded.message);
    let new = rollouts.iter().find(|r| r.name_any() == "fw-new").unwrap();
    assert!(condition_of(new, condition::SUPERSEDED).is_none());
    let counts = new.status.clone().unwrap_or_default().counts;
    assert_eq!((counts.total, counts.succeeded), (4, 4), "{counts:?}");
    // Every spec.firmware is the newer rollout's, under its own field manager.
    for n in &nodes {
        assert_eq!(
            n.spec.firmware.as_ref().map(|f| f.version.as_str()),
            Some("7.1.0")
        );
        let managers: Vec<String> = n
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:firmware").is_some())
            })
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(
            managers,
            vec!["flightnode-rollout/fw-new".to_owned()],
            "{}",
            n.name_any()
        );
    }
    assert_eq!(commands.versions().len(), names.len());
    // Both complete: nobody sends anything any more.
    let sent = commands.all().len();
    for _ in 0..10 {
        c.step().await;
        installs.drive(&commands, &sink).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Never old, new, old on one drone, over the whole run.
    for (device, versions) in commands.versions() {
        let first_new = versions.iter().position(|v| v == "7.1.0");
        if let Some(i) = first_new {
            assert!(
                versions[i..].iter().all(|v| v == "7.1.0"),
                "{device} was commanded {versions:?}"
            );
        }
    }
    assert_eq!(
        commands.all()[sent..],
        [],
        "commands after both rollouts completed"
    );
    let (_, rollouts) = lists(&admin).await?;
    assert!(is(&rollouts, "fw-old", condition::COMPLETE) && is(&rollouts, "fw-new", condition::COMPLETE));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_calls_back_the_offline_and_the_retrying_canary_and_stays_halted() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, _)) = fleet(6).await? else {
        return Ok(());
    };
    let spec = |max: u32| {
        rollout(
            "fw-bad",
            "2.0.0",
            &format!(
                "  waves: [{{count: 3, soak: 1h}}]\n  droneTimeout: 3s\n\
                 \x20 failurePolicy: {{rules: [{{kind: rolledBack, maxCount: {max}}}]}}\n"
            ),
        )
    };
    api.apply_yaml(&admin, &spec(1), Some(NS)).await?;
    let commands = Arc::new(Recorded::default());
    let mut c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    // A retry 8 s after a failed attempt: without the call-back, attempt 2 comes in this test.
    c.config.policy.backoff = Duration::from_secs(8);
    run_until(&c, &admin, None, "the canary's commands", |_, _| {
        commands.upgrades().len() == 3
    })
    .await?;
    let canary: Vec<(String, String)> = commands
        .upgrades()
        .into_iter()
        .map(|(d, ids)| (d, ids[0].clone()))
        .collect();
    let (bad, offline, retrying) = (&canary[0], &canary[1], &canary[2]);
    // One goes dark before it picks its command up; one fails transiently (Retrying).
    let dark = Report {
        version: "1.0.0".into(),
        offline: true,
        ..Report::default()
    };
    report(&sink, &offline.0, &dark).await?;
    let failed = Report {
        version: "1.0.0".into(),
        last: Some((retrying.1.clone(), "failed", "download_failed")),
        ..Report::default()
    };
    report(&sink, &retrying.0, &failed).await?;
    let sync_of = |n: &[FlightNode], name: &str| {
        n.iter()
            .find(|n| n.name_any() == name)
            .and_then(|n| n.status.clone())
            .and_then(|s| s.firmware_sync)
            .map(|s| s.reason)
    };
    run_until(
        &c,
        &admin,
        None,
        "Retrying, and the dark one timed out",
        |n, r| {
            sync_of(n, &retrying.0).as_deref() == Some("Retrying")
                && r.iter()
                    .any(|r| r.status.as_ref().is_some_and(|s| s.counts.timed_out >= 1))
        },
    )
    .await?;
    // The third rolls back: the breaker trips.
    let rolled_back = Report {
        version: "1.0.0".into(),
        last: Some((bad.1.clone(), "rolled_back", "health_check_failed")),
        ..Report::default()
    };
    report(&sink, &bad.0, &rolled_back).await?;
    let firmware = |n: &[FlightNode], name: &str| {
        n.iter()
            .find(|n| n.name_any() == name)
            .and_then(|n| n.spec.firmware.clone())
            .map(|f| f.version)
    };
    let (nodes, _) = run_until(&c, &admin, None, "Halted, and the call-backs", |n, r| {
        is(r, "fw-bad", condition::HALTED)
            && firmware(n, &offline.0).is_none()
            && firmware(n, &retrying.0).is_none()
    })
    .await?;
    assert_eq!(
        firmware(&nodes, &bad.0).as_deref(),
        Some("2.0.0"),
        "the rolled-back drone keeps its record"
    );
    // What went out before the halt: the canary, and a stand-in for the dark one (no result).
    let before_halt = commands.upgrades();
    // An edit of the breaker's rules is no resume.
    api.apply_yaml(&admin, &spec(5), Some(NS)).await?;
    // The dark one returns; the back-off of the failed one passes.
    let back = Report {
        version: "1.0.0".into(),
        ..Report::default()
    };
    report(&sink, &offline.0, &back).await?;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        c.step().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (nodes, rollouts) = lists(&admin).await?;
    let r = rollouts.iter().find(|r| r.name_any() == "fw-bad").unwrap();
    let s = r.status.clone().unwrap_or_default();
    assert_eq!(s.observed_generation, r.metadata.generation, "{s:?}");
    assert!(condition_of(r, condition::HALTED).is_some(), "{s:?}");
    for (device, ids) in commands.upgrades() {
        assert_eq!(
            ids.len(),
            1,
            "{device}: {ids:?} (a retry or a dispatch after the halt)"
        );
    }
    assert_eq!(commands.upgrades(), before_halt, "a dispatch after the halt");
    assert!(
        commands
            .cancels()
            .get(&offline.0)
            .is_some_and(|c| c.contains(&offline.1)),
        "the returning drone's command is canceled: {:?}",
        commands.cancels()
    );
    assert!(firmware(&nodes, &offline.0).is_none() && firmware(&nodes, &retrying.0).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_keeps_the_wave_and_its_soak() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, _)) = fleet(4).await? else {
        return Ok(());
    };
    let spec = |paused: bool| {
        rollout(
            "fw",
            "2.0.0",
            &format!("  waves: [{{count: 1}}, {{count: 2, soak: 1h}}]\n  paused: {paused}\n"),
        )
    };
    api.apply_yaml(&admin, &spec(false), Some(NS)).await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    let mut installs = Installs {
        done: BTreeSet::new(),
    };
    let soaking = |r: &[FirmwareRollout]| {
        r.iter().any(|r| {
            r.status
                .as_ref()
                .is_some_and(|s| s.current_wave == 1 && s.wave_finished_time.is_some())
        })
    };
    let (_, before) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "wave 1 soaking",
        |_, r| soaking(r),
    )
    .await?;
    let before = before[0].status.clone().unwrap_or_default();
    for paused in [true, false] {
        api.apply_yaml(&admin, &spec(paused), Some(NS)).await?;
        let (_, after) = run_until(&c, &admin, None, "the edit observed", |_, r| {
            r[0].status.as_ref().and_then(|s| s.observed_generation) == r[0].metadata.generation
        })
        .await?;
        let after = after[0].status.clone().unwrap_or_default();
        assert_eq!(
            (
                after.current_wave,
                &after.wave_started_time,
                &after.wave_finished_time
            ),
            (1, &before.wave_started_time, &before.wave_finished_time),
            "paused {paused}: {after:?}"
        );
    }
    assert_eq!(commands.upgrades().len(), 2, "no dispatch during the soak");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_edited_after_dispatch_is_pinned_and_the_wave_finishes() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, names)) = fleet(3).await? else {
        return Ok(());
    };
    api.apply_yaml(&admin, &rollout("fw", "2.0.0", ""), Some(NS))
        .await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    run_until(&c, &admin, None, "every drone dispatched", |n, _| {
        n.iter().all(|n| n.spec.firmware.is_some())
    })
    .await?;
    // A person edits one drone's firmware after the dispatch, the way `kubectl edit` does (an
    // update under its own field manager, not an apply).
    let edited = &names[0];
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let edit = serde_json::json!({ "spec": { "firmware": { "version": "1.5.0", "url": "http://fw.example/1.5.0.fnb" } } });
    let params = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..PatchParams::default()
    };
    nodes.patch(edited, &params, &Patch::Merge(&edit)).await?;
    let mut installs = Installs {
        done: BTreeSet::new(),
    };
    let (nodes_now, rollouts) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "Complete with the edited drone pinned",
        |_, r| is(r, "fw", condition::COMPLETE),
    )
    .await?;
    let s = rollouts[0].status.clone().unwrap_or_default();
    assert_eq!((s.counts.succeeded, s.counts.pinned), (2, 1), "{s:?}");
    let node = nodes_now.iter().find(|n| n.name_any() == *edited).unwrap();
    assert_eq!(
        node.spec.firmware.as_ref().map(|f| f.version.as_str()),
        Some("1.5.0"),
        "the person's edit stands"
    );
    let managers: BTreeSet<String> = nodes_now
        .iter()
        .flat_map(|n| n.metadata.managed_fields.clone().unwrap_or_default())
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains("flightnode-rollout/fw"), "{managers:?}");
    assert!(!managers.contains("flightnode-rollout"), "{managers:?}");
    Ok(())
}

/// Issue 22 m: `kubectl delete fwr` and a drone leaving the selection call back what the rollout
/// dispatched and the drone has not started; a drone that started keeps its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_rollout_and_a_deselected_drone_call_back_what_has_not_started() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, names)) = fleet(3).await? else {
        return Ok(());
    };
    api.apply_yaml(&admin, &rollout("fw", "2.0.0", ""), Some(NS))
        .await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    run_until(&c, &admin, None, "every drone dispatched", |n, _| {
        n.iter().all(|n| n.spec.firmware.is_some())
    })
    .await?;
    let firmware = |n: &[FlightNode], name: &str| {
        n.iter()
            .find(|n| n.name_any() == name)
            .and_then(|n| n.spec.firmware.clone())
    };
    // One drone starts its upgrade: it keeps its target whatever happens to the rollout.
    let (nodes, _) = run_until(&c, &admin, None, "commands out", |n, _| {
        n.iter().all(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.firmware_sync.as_ref())
                .is_some_and(|s| s.upgrade_id.is_some())
        })
    })
    .await?;
    let started = &names[0];
    let id = nodes
        .iter()
        .find(|n| n.name_any() == *started)
        .and_then(|n| n.status.clone()?.firmware_sync?.upgrade_id)
        .unwrap();
    let running = Report {
        version: "1.0.0".into(),
        current: Some(id),
        ..Report::default()
    };
    report(&sink, started, &running).await?;

    // A drone leaves the selection (its label changes).
    let leaving = &names[1];
    let nodes_api: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let relabel = serde_json::json!({ "metadata": { "labels": { "fleet": "elsewhere" } } });
    nodes_api
        .patch(leaving, &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    run_until(&c, &admin, None, "the deselected drone called back", |n, _| {
        firmware(n, leaving).is_none()
    })
    .await?;

    // The rollout is deleted.
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    rollouts.delete("fw", &kube::api::DeleteParams::default()).await?;
    let (nodes, _) = run_until(&c, &admin, None, "the unstarted drone called back", |n, r| {
        r.is_empty() && firmware(n, &names[2]).is_none()
    })
    .await?;
    assert!(
        firmware(&nodes, started).is_some(),
        "the drone that started keeps its target"
    );
    assert!(
        commands.cancels().contains_key(leaving.as_str())
            || commands.cancels().contains_key(names[2].as_str()),
        "a cancel went out for a called-back command: {:?}",
        commands.cancels()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_soak_holds_the_next_wave_until_the_canary_has_flown() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, _)) = fleet(3).await? else {
        return Ok(());
    };
    let spec = "  waves: [{count: 1, flightSoak: {flights: 1, flightTime: 5m}}, {percent: 100}]\n";
    api.apply_yaml(&admin, &rollout("fw", "2.0.0", spec), Some(NS))
        .await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    let mut installs = Installs {
        done: BTreeSet::new(),
    };
    let soaking_in_flight = |r: &[FirmwareRollout]| {
        r.iter().any(|r| {
            condition_of(r, condition::PROGRESSING).is_some_and(|c| c.message.contains("soaking in flight"))
        })
    };
    run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "the canary committed, the wave soaking in flight",
        |_, r| soaking_in_flight(r),
    )
    .await?;
    for _ in 0..5 {
        c.step().await;
        installs.drive(&commands, &sink).await?;
    }
    let upgrades = commands.upgrades();
    assert_eq!(upgrades.len(), 1, "only the canary before it flies: {upgrades:?}");
    let (canary, ids) = upgrades
        .iter()
        .next()
        .map(|(d, i)| (d.clone(), i.clone()))
        .unwrap_or_default();
    // The canary flies once, for 6 minutes, on 2.0.0: its FlightNode shows it, the next wave
    // starts and the rollout completes.
    let flown = Report {
        version: "2.0.0".into(),
        last: ids.last().map(|id| (id.clone(), "committed", "")),
        flights: Some((1, 360)),
        ..Report::default()
    };
    report(&sink, &canary, &flown).await?;
    let (nodes, _) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "Complete after the canary flew",
        |_, r| is(r, "fw", condition::COMPLETE),
    )
    .await?;
    let node = nodes.iter().find(|n| n.name_any() == canary).unwrap();
    let fw = node
        .status
        .as_ref()
        .and_then(|s| s.firmware.clone())
        .unwrap_or_default();
    assert_eq!((fw.flights, fw.flight_time.as_deref()), (Some(1), Some("6m0s")));
    assert_eq!(commands.upgrades().len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_maintenance_window_holds_dispatch_until_the_operator_opens_it() -> anyhow::Result<()> {
    let Some((api, admin, hub, sink, _)) = fleet(3).await? else {
        return Ok(());
    };
    // Noon in Kathmandu (+05:45) the day after tomorrow: closed now, and the next opening is
    // known to the minute.
    let now = jiff::Timestamp::now();
    let day = now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .checked_add(jiff::Span::new().days(2))?;
    let kathmandu = flightnode_hub::decide::window::time_zone("Asia/Kathmandu")
        .ok_or_else(|| anyhow::anyhow!("no Asia/Kathmandu"))?;
    let noon = day.at(12, 0, 0, 0).to_zoned(kathmandu)?;
    let opens = noon.timestamp().display_with_offset(noon.offset()).to_string();
    let spec = |window: &str| {
        rollout(
            "fw",
            "2.0.0",
            &format!("  waves: [{{count: 1}}]\n  maintenanceWindows: [{window}]\n"),
        )
    };
    let far_off = format!(
        "{{schedule: \"0 12 {} {} *\", duration: 1h, timeZone: Asia/Kathmandu}}",
        day.day(),
        day.month()
    );
    api.apply_yaml(&admin, &spec(&far_off), Some(NS)).await?;
    let commands = Arc::new(Recorded::default());
    let c = controllers(&hub, Arc::clone(&commands), "replica-a").await?;
    let mut installs = Installs {
        done: BTreeSet::new(),
    };
    let window = |r: &[FirmwareRollout]| {
        r.first()
            .and_then(|r| r.status.as_ref())
            .and_then(|s| s.maintenance_window.clone())
    };
    let (_, rollouts) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "the rollout outside its window",
        |_, r| window(r).is_some_and(|w| !w.open),
    )
    .await?;
    for _ in 0..3 {
        c.step().await;
    }
    assert!(commands.upgrades().is_empty(), "{:?}", commands.upgrades());
    let (nodes, _) = lists(&admin).await?;
    assert!(
        nodes.iter().all(|n| n.spec.firmware.is_none()),
        "nothing dispatched"
    );
    assert_eq!(
        window(&rollouts).and_then(|w| w.next_open_time),
        Some(opens.clone())
    );
    let progressing = rollouts[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::PROGRESSING))
        .cloned()
        .unwrap_or_default();
    assert_eq!(progressing.reason, "OutsideMaintenanceWindow");
    assert!(
        progressing
            .message
            .contains(&format!("until the maintenance window opens at {noon}")),
        "{}",
        progressing.message
    );

    // The operator moves the window to one that opened a minute ago, for two hours (UTC).
    let opened = now
        .checked_sub(jiff::Span::new().minutes(1))?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .datetime();
    let open_now = format!(
        "{{schedule: \"{} {} * * *\", duration: 2h}}",
        opened.minute(),
        opened.hour()
    );
    let closes = opened
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()?
        .to_zoned(jiff::tz::TimeZone::UTC)?
        .checked_add(jiff::Span::new().hours(2))?;
    api.apply_yaml(&admin, &spec(&open_now), Some(NS)).await?;
    let (_, rollouts) = run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "the canary dispatched in the open window",
        |_, r| !commands.upgrades().is_empty() && window(r).is_some_and(|w| w.open),
    )
    .await?;
    assert_eq!(
        window(&rollouts).and_then(|w| w.close_time),
        Some(
            closes
                .timestamp()
                .display_with_offset(closes.offset())
                .to_string()
        )
    );
    run_until(
        &c,
        &admin,
        Some((&mut installs, &commands, &sink)),
        "Complete inside the window",
        |_, r| is(r, "fw", condition::COMPLETE),
    )
    .await?;
    assert_eq!(commands.upgrades().len(), 3);
    Ok(())
}
