//! The reconcilers on the embedded local store (no cluster needed), and the rollout commands as
//! a user runs them.
//!
//! - A cancel whose publish fails after the breaker halted a rollout is sent again on a later
//!   pass, with the same upgrade id (the record naming it is kept until it went out).
//! - A spec changed twice while the drone, idle and online, never starts the command: each
//!   change cancels the previous upgrade id before the new command, on the drone's topic of a
//!   real mosquitto, also across a broker restart; a cancel whose publish fails holds the new
//!   command back and is sent again, first, on the next pass.
//! - A drone whose device id is not a valid Kubernetes object name (upper case, `_`, 64
//!   characters) lives in an object with a derived name, and its commands still go to
//!   `firmware/<real id>/…`.
//! - `flightnode-hub apply -f`, `get rollouts` and `rollout status` run as processes against a
//!   `serve --store local --controllers` process: output, exit codes, errors for a missing
//!   rollout and a bad file.
//!
//! Drones are simulated at the store (heartbeat statuses written the way the hub writes them);
//! commands are recorded by a [`CommandSink`]. The MQTT path to real agents is covered by the
//! fleet tests (`tests/tests/rollout.rs`).

use flightnode_hub::api::flightnode::FirmwareTarget;
use flightnode_hub::api::flightnode::object_name;
use flightnode_hub::api::rollout::{FirmwareRollout, condition};
use flightnode_hub::controller::mqtt::CommandSink;
use flightnode_hub::controller::reconcile::{ControllerConfig, Controllers};
use flightnode_hub::decide::status::{Liveness, SpecView, from_heartbeat, with_conditions};
use flightnode_hub::metrics::Metrics;
use flightnode_hub::store::fleet::LocalFleet;
use flightnode_hub::store::local::LocalStore;
use flightnode_hub::store::sink::WriteRequest;
use flightnode_proto::mqtt::Command;
use flightnode_proto::v1;
use futures_util::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "default";

/// Records commands; while `fail_cancels` is set, a cancel fails the way an unreachable broker
/// makes it fail.
#[derive(Default)]
struct Flaky {
    sent: Mutex<Vec<(String, Command)>>,
    fail_cancels: AtomicBool,
}

impl Flaky {
    fn all(&self) -> Vec<(String, Command)> {
        self.sent.lock().unwrap().clone()
    }
    fn upgrades(&self) -> Vec<(String, String)> {
        self.all()
            .into_iter()
            .filter_map(|(d, c)| match c {
                Command::Upgrade(u) => Some((d, u.upgrade_id)),
                Command::Cancel { .. } => None,
            })
            .collect()
    }
    fn cancels(&self) -> Vec<(String, String)> {
        self.all()
            .into_iter()
            .filter_map(|(d, c)| match c {
                Command::Cancel { upgrade_id } => Some((d, upgrade_id)),
                Command::Upgrade(_) => None,
            })
            .collect()
    }
}

impl CommandSink for Flaky {
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, flightnode_hub::Result<()>> {
        let fail = matches!(cmd, Command::Cancel { .. }) && self.fail_cancels.load(Ordering::SeqCst);
        if !fail {
            self.sent
                .lock()
                .unwrap()
                .push((device_id.to_owned(), cmd.clone()));
        }
        Box::pin(async move {
            if fail {
                Err(flightnode_hub::Error::Mqtt {
                    url: "mqtt://broker.test".into(),
                    source: format!("publish to firmware/{device_id}/cancel: connection refused").into(),
                })
            } else {
                Ok(())
            }
        })
    }
}

/// A drone's heartbeat status in the store, as the hub writes it: `last` is (id, result, code).
async fn report(store: &LocalStore, device_id: &str, version: &str, last: Option<(&str, &str, &str)>) {
    let mut hb = flightnode_proto::sample::idle_heartbeat(device_id, version);
    if let Some((id, result, code)) = last {
        hb.last_upgrade = Some(v1::LastUpgrade {
            upgrade_id: id.into(),
            result: result.into(),
            error_code: code.into(),
            finished_unix: 1_800_000_000,
            ..Default::default()
        });
    }
    let now = flightnode_hub::decide::status::rfc3339(time::OffsetDateTime::now_utc());
    let mut status = with_conditions(
        from_heartbeat(&hb),
        Liveness::Online,
        &SpecView::default(),
        &[],
        &now,
    );
    status.last_heartbeat_time = Some(now);
    let req = WriteRequest {
        name: object_name(device_id),
        device_id: device_id.to_owned(),
        hardware_id: "hw-x1".into(),
        status,
        events: Vec::new(),
    };
    store.write(&req).await.unwrap();
}

fn controllers(store: &LocalStore, commands: Arc<Flaky>) -> Controllers {
    Controllers::new(
        Arc::new(LocalFleet::new(store.clone(), Arc::new(|_| {}))),
        commands,
        Arc::new(Metrics::new()),
        ControllerConfig::default(),
    )
}

fn sync_id(store: &LocalStore, name: &str) -> Option<String> {
    store.get(NS, name)?.status?.firmware_sync?.upgrade_id
}

fn halted(store: &LocalStore, name: &str) -> bool {
    store.rollout(NS, name).is_some_and(|r| {
        r.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::HALTED && c.status == "True")
        })
    })
}

#[tokio::test]
async fn a_cancel_that_fails_to_publish_after_a_halt_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("drone-{i}")).collect();
    for n in &names {
        report(&store, n, "1.0.0", None).await;
    }
    let rollout: FirmwareRollout = serde_json::from_value(serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FirmwareRollout",
        "metadata": { "name": "r1" },
        "spec": {
            "version": "2.0.0", "url": "http://fw.example/2.0.0.fnb",
            "waves": [{ "count": 2 }],
            "failurePolicy": { "rules": [{ "kind": "rolledBack", "maxCount": 1 }] },
        },
    }))
    .unwrap();
    store.apply_rollout(rollout).await.unwrap();
    let commands = Arc::new(Flaky::default());
    let c = controllers(&store, Arc::clone(&commands));
    c.step().await;
    let canary = commands.upgrades();
    assert_eq!(canary.len(), 2, "the canary of two: {canary:?}");
    let (a, a_id) = canary[0].clone();
    let (b, b_id) = canary[1].clone();

    // A rolls back; B has not picked its command up yet (the broker went away, say).
    report(
        &store,
        &a,
        "1.0.0",
        Some((&a_id, "rolled_back", "health_check_failed")),
    )
    .await;
    commands.fail_cancels.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        c.step().await;
        if halted(&store, "r1") {
            break;
        }
    }
    assert!(halted(&store, "r1"), "{:?}", store.rollout(NS, "r1"));
    c.step().await;
    let node_b = store.get(NS, &b).unwrap();
    assert_eq!(node_b.spec.firmware, None, "B was called back");
    assert!(commands.cancels().is_empty(), "{:?}", commands.cancels());
    assert_eq!(
        sync_id(&store, &b).as_deref(),
        Some(b_id.as_str()),
        "the record naming the upgrade to cancel is kept while the cancel cannot go out"
    );

    // The broker is back: the next pass sends the cancel, once, for B's upgrade.
    commands.fail_cancels.store(false, Ordering::SeqCst);
    c.step().await;
    assert_eq!(commands.cancels(), vec![(b.clone(), b_id.clone())]);
    assert_eq!(
        sync_id(&store, &b),
        None,
        "record cleared once the cancel went out"
    );
    c.step().await;
    assert_eq!(commands.cancels().len(), 1, "no second cancel");
    assert_eq!(commands.upgrades().len(), 2, "no dispatch after the halt");
}

/// Every drone reports its last upgrade command committed, once per upgrade id.
async fn install_last(store: &LocalStore, commands: &Flaky, done: &mut Vec<String>) {
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
        if !done.contains(&id) {
            report(store, &device, &version, Some((&id, "committed", ""))).await;
            done.push(id);
        }
    }
}

fn rollout_of(name: &str, version: &str, canary: u32) -> FirmwareRollout {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FirmwareRollout",
        "metadata": { "name": name },
        "spec": {
            "version": version, "url": format!("http://fw.example/{version}.fnb"),
            "waves": [{ "count": canary }],
        },
    }))
    .unwrap()
}

/// Two overlapping rollouts on the local store (ownership kept by the rollout annotation there):
/// the older yields, the newer takes the older's drone over, no drone is commanded old, new,
/// old, and once both completed nothing more is sent.
#[tokio::test]
async fn overlapping_rollouts_on_the_local_store_never_take_turns_on_a_drone() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("drone-{i}")).collect();
    for n in &names {
        report(&store, n, "1.0.0", None).await;
    }
    store.apply_rollout(rollout_of("old", "7.0.0", 1)).await.unwrap();
    let commands = Arc::new(Flaky::default());
    let c = controllers(&store, Arc::clone(&commands));
    let mut done = Vec::new();
    c.step().await;
    install_last(&store, &commands, &mut done).await;
    assert_eq!(commands.upgrades().len(), 1, "the old rollout's canary");
    // Creation times have whole seconds: the newer one is a second younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.apply_rollout(rollout_of("new", "7.1.0", 2)).await.unwrap();
    let complete = |name: &str| {
        store.rollout(NS, name).is_some_and(|r| {
            r.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == condition::COMPLETE && c.status == "True")
            })
        })
    };
    let on_new = || {
        names.iter().all(|n| {
            store
                .get(NS, n)
                .and_then(|n| n.status?.firmware?.committed_version)
                .as_deref()
                == Some("7.1.0")
        })
    };
    for _ in 0..40 {
        c.step().await;
        install_last(&store, &commands, &mut done).await;
        if complete("old") && complete("new") && on_new() {
            break;
        }
    }
    assert!(
        complete("old") && complete("new") && on_new(),
        "{:?}",
        store.rollouts(Some(NS))
    );
    let sent = commands.all().len();
    let reads = || {
        (
            c.metrics.rollout_drone_reads.get(),
            c.metrics.node_decisions.get(),
        )
    };
    let mut read_before = reads();
    for i in 0..5 {
        c.step().await;
        install_last(&store, &commands, &mut done).await;
        if i == 0 {
            // The first step still sees the last step's own writes.
            read_before = reads();
        }
    }
    // Steps over a fleet where nothing changed read no drone again: a step costs what changed.
    assert_eq!(
        reads(),
        read_before,
        "drones read again (rollout reads, node decisions)"
    );
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (device, cmd) in commands.all() {
        if let Command::Upgrade(u) = cmd {
            let v = u.version.map(|v| v.to_string()).unwrap_or_default();
            versions.entry(device).or_default().push(v);
        }
    }
    for (device, v) in &versions {
        if let Some(i) = v.iter().position(|v| v == "7.1.0") {
            assert!(
                v[i..].iter().all(|v| v == "7.1.0"),
                "{device} was commanded {v:?}"
            );
        }
    }
    assert_eq!(commands.all()[sent..], [], "commands after both completed");
    let old = store
        .rollout(NS, "old")
        .and_then(|r| r.status)
        .unwrap_or_default();
    let superseded = old
        .conditions
        .iter()
        .find(|c| c.type_ == condition::SUPERSEDED && c.status == "True")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(superseded.contains("new"), "{:?}", old.conditions);
    assert_eq!(old.counts.superseded, 4, "{:?}", old.counts);
}

#[tokio::test]
async fn a_device_id_that_is_no_object_name_gets_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let long = format!("UAV_{}", "Q".repeat(60));
    assert_eq!(long.len(), flightnode_proto::device::MAX_DEVICE_ID_BYTES);
    let ids = ["Drone_7", "drone_7", long.as_str(), "plain-drone"];
    let mut names = Vec::new();
    for id in ids {
        flightnode_proto::device::validate_device_id(id).unwrap();
        let name = object_name(id);
        assert!(is_dns_subdomain(&name), "{id} → {name}");
        report(&store, id, "1.0.0", None).await;
        let node = store.get(NS, &name).unwrap();
        assert_eq!(node.status.and_then(|s| s.device_id).as_deref(), Some(id));
        names.push(name);
    }
    assert_eq!(names[3], "plain-drone", "a valid id is its own name");
    assert_ne!(names[0], names[1], "Drone_7 and drone_7 are two objects");
    for name in &names {
        let target = FirmwareTarget {
            version: "2.0.0".into(),
            url: "http://fw.example/2.0.0.fnb".into(),
            allow_downgrade: false,
            retry: 0,
        };
        store
            .set_target(name, Some(target), &BTreeMap::new(), &[])
            .await
            .unwrap();
    }
    let commands = Arc::new(Flaky::default());
    controllers(&store, Arc::clone(&commands)).step().await;
    let mut got: Vec<String> = commands.upgrades().into_iter().map(|(d, _)| d).collect();
    got.sort();
    let mut want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(got, want, "commands go to the drones' own ids");
}

/// RFC 1123 subdomain, the rule the API server applies to custom object names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// One CLI run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `flightnode-hub ARGS` like a user would; killed (and failed) after two minutes.
fn hub_cli(args: &[&str]) -> Run {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flightnode-hub"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_mins(2);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flightnode-hub {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The row of `name` in a `get rollouts` table, split into columns.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn rollout_commands_on_the_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let broker = flightnode_tests::mosquitto::Mosquitto::start().unwrap();
    let mut hub = flightnode_tests::fleet::Hub::new(
        dir.path(),
        vec![
            "--controllers".into(),
            "--reconcile-interval".into(),
            "500ms".into(),
            "--mqtt-url".into(),
            broker.url(),
        ],
    )
    .unwrap();
    hub.start().unwrap();
    let server = format!("http://127.0.0.1:{}", hub.http_port);
    let s = server.as_str();

    let none = hub_cli(&["get", "rollouts", "--server", s]);
    assert_eq!(none.code, Some(0), "{}", none.stderr);
    assert_eq!(none.stdout.trim(), "No resources found");

    // A rollout over no drone yet (nothing matches its selector): it completes at once.
    let file = write(
        dir.path(),
        "rollout.yaml",
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fleet-a\nspec:\n\
         \x20 version: \"2.0.0\"\n  url: http://fw.example/2.0.0.fnb\n\
         \x20 selector: {matchLabels: {fleet: north}}\n\
         \x20 waves:\n    - count: 1\n      soak: 1s\n",
    );
    let applied = hub_cli(&["apply", "-f", &file, "--server", s]);
    assert_eq!(applied.code, Some(0), "{}", applied.stderr);
    assert_eq!(applied.stdout.trim(), "firmwarerollout fleet-a configured");

    let followed = hub_cli(&[
        "rollout",
        "status",
        "fleet-a",
        "--server",
        s,
        "--interval",
        "200ms",
    ]);
    assert_eq!(followed.code, Some(0), "{}\n{}", followed.stdout, followed.stderr);
    assert!(
        followed
            .stdout
            .contains("rollout fleet-a → 2.0.0 (http://fw.example/2.0.0.fnb)"),
        "{}",
        followed.stdout
    );
    let complete = followed
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("Complete"))
        .unwrap_or_default()
        .to_owned();
    assert!(complete.contains("True"), "{}", followed.stdout);

    let listed = hub_cli(&["get", "rollouts", "--server", s]);
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let header = listed.stdout.lines().next().unwrap_or_default();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "NAME",
            "VERSION",
            "WAVE",
            "SUCCEEDED",
            "FAILED",
            "TOTAL",
            "HALTED",
            "COMPLETE",
            "NEXT-WINDOW"
        ]
    );
    assert_eq!(
        row(&listed.stdout, "fleet-a"),
        [
            "fleet-a", "2.0.0", "1/1", "0", "0", "0", "False", "True", "<none>"
        ]
    );
    let json = hub_cli(&["get", "fwr", "--server", s, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "fleet-a");
    assert_eq!(list["items"][0]["status"]["observedGeneration"], 1);

    // A second apply of a changed spec is a new generation of the same rollout.
    let file2 = write(
        dir.path(),
        "rollout-2.yaml",
        &std::fs::read_to_string(&file).unwrap().replace("2.0.0", "2.0.1"),
    );
    let again = hub_cli(&["apply", "-f", &file2, "--server", s]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let r = hub.rollout("fleet-a").unwrap();
    assert_eq!(r["metadata"]["generation"], 2);
    assert_eq!(r["spec"]["version"], "2.0.1");

    // A rollout that does not exist: exit code 1 and a sentence naming it.
    let missing = hub_cli(&["rollout", "status", "no-such-rollout", "--server", s, "--once"]);
    assert_eq!(missing.code, Some(1), "{}", missing.stdout);
    assert!(
        missing
            .stderr
            .contains("rollout no-such-rollout in namespace default: not found"),
        "{}",
        missing.stderr
    );
    assert!(missing.stdout.is_empty(), "{}", missing.stdout);

    // Bad files: each error names the file and what is wrong, and nothing is stored.
    let invalid = write(
        dir.path(),
        "invalid.yaml",
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {name: fleet-b}\nspec:\n\
         \x20 version: \"3.0.0\"\n  url: http://fw.example/3.0.0.fnb\n  waves: [{count: 2, percent: 10}]\n",
    );
    let unparsable = write(
        dir.path(),
        "broken.yaml",
        "kind: FirmwareRollout\nmetadata: [unclosed\n",
    );
    let nameless = write(
        dir.path(),
        "nameless.yaml",
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nspec: {version: \"1\", url: http://x/1.fnb}\n",
    );
    let absent = dir.path().join("absent.yaml").display().to_string();
    for (path, why) in [
        (&invalid, "spec.waves[0]: give exactly one of count or percent"),
        (&unparsable, "YAML"),
        (&nameless, "without metadata.name"),
        (&absent, "read "),
    ] {
        let run = hub_cli(&["apply", "-f", path, "--server", s]);
        assert_eq!(run.code, Some(1), "{path}: {}", run.stdout);
        assert!(run.stderr.contains(path.as_str()), "{path}: {}", run.stderr);
        assert!(run.stderr.contains(why), "{path}: {}", run.stderr);
    }
    assert!(hub.rollout("fleet-b").is_none());
    let listed = hub_cli(&["get", "rollouts", "--server", s]);
    assert_eq!(listed.stdout.lines().count(), 2, "{}", listed.stdout);
    hub.stop();
}

/// Commands seen on the drone's upgrade topic of a real broker, by a persistent-session client
/// (it gets what was queued for it while the broker restarted).
struct DroneTopic {
    rx: tokio::sync::mpsc::UnboundedReceiver<Command>,
}

impl DroneTopic {
    async fn subscribe(url: &str, device_id: &str) -> DroneTopic {
        let port = url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let mut options = rumqttc::MqttOptions::new(format!("drone-{device_id}"), "127.0.0.1", port);
        options.set_clean_session(false);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
        let topic = flightnode_proto::mqtt::upgrade_topic(device_id);
        client
            .subscribe(topic.as_str(), rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed, suback) = tokio::sync::oneshot::channel();
        let mut subscribed = Some(subscribed);
        let device = device_id.to_owned();
        tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(s) = subscribed.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let cmd = flightnode_proto::mqtt::parse_command(&p.payload, &device).unwrap();
                        if tx.send(cmd).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), suback)
            .await
            .expect("no SUBACK")
            .unwrap();
        DroneTopic { rx }
    }

    async fn next(&mut self) -> Command {
        tokio::time::timeout(Duration::from_mins(1), self.rx.recv())
            .await
            .expect("no command on the drone's topic within a minute")
            .unwrap()
    }

    async fn nothing_more(&mut self) {
        if let Ok(cmd) = tokio::time::timeout(Duration::from_secs(1), self.rx.recv()).await {
            panic!("unexpected command {cmd:?}");
        }
    }
}

fn firmware(version: &str) -> FirmwareTarget {
    FirmwareTarget {
        version: version.into(),
        url: format!("http://fw.example/{version}.fnb"),
        allow_downgrade: false,
        retry: 0,
    }
}

fn upgrade_of(cmd: Command) -> String {
    match cmd {
        Command::Upgrade(u) => u.upgrade_id,
        Command::Cancel { upgrade_id } => panic!("cancel of {upgrade_id} where an upgrade was due"),
    }
}

fn cancel_of(cmd: Command) -> String {
    match cmd {
        Command::Cancel { upgrade_id } => upgrade_id,
        Command::Upgrade(u) => panic!("upgrade {} where a cancel was due", u.upgrade_id),
    }
}

fn sync_message(store: &LocalStore, name: &str) -> String {
    store
        .get(NS, name)
        .and_then(|n| n.status?.firmware_sync)
        .map(|s| s.message)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_spec_changed_before_the_drone_started_cancels_the_old_upgrade_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let mut broker = flightnode_tests::mosquitto::Mosquitto::start().unwrap();
    let drone = "drone-idle";
    report(&store, drone, "1.0.0", None).await;
    let mut topic = DroneTopic::subscribe(&broker.url(), drone).await;
    let publisher = Arc::new(
        flightnode_hub::controller::mqtt::MqttPublisher::start(
            &flightnode_hub::controller::mqtt::MqttTarget {
                url: broker.url(),
                ca: None,
                cert: None,
                key: None,
                client_id: "hub-controllers".into(),
                timeout: Duration::from_secs(10),
                signer: None,
            },
        )
        .unwrap(),
    );
    assert!(publisher.wait_connected(Duration::from_secs(30)).await);
    let c = Controllers::new(
        Arc::new(LocalFleet::new(store.clone(), Arc::new(|_| {}))),
        Arc::clone(&publisher) as _,
        Arc::new(Metrics::new()),
        ControllerConfig::default(),
    );

    store
        .set_target(drone, Some(firmware("2.0.0")), &BTreeMap::new(), &[])
        .await
        .unwrap();
    c.reconcile_nodes().await;
    let first = upgrade_of(topic.next().await);
    assert_eq!(sync_id(&store, drone).as_deref(), Some(first.as_str()));

    // The drone stays idle and online and never reports `first` (queued behind other work on
    // the drone, say); the spec moves on.
    store
        .set_target(drone, Some(firmware("2.1.0")), &BTreeMap::new(), &[])
        .await
        .unwrap();
    c.reconcile_nodes().await;
    assert_eq!(
        cancel_of(topic.next().await),
        first,
        "the old upgrade is canceled first"
    );
    let second = upgrade_of(topic.next().await);
    assert_ne!(second, first);
    assert_eq!(sync_id(&store, drone).as_deref(), Some(second.as_str()));
    let message = sync_message(&store, drone);
    assert!(
        message.contains(&first) && message.contains(&second),
        "the operator sees both ids: {message}"
    );
    c.reconcile_nodes().await;
    topic.nothing_more().await;

    // Once more with the broker down while the spec changes: the cancel cannot go out, so the
    // record stays and nothing else happens; when the broker is back, the next pass sends the
    // cancel first, then the new command.
    broker.stop().unwrap();
    store
        .set_target(drone, Some(firmware("2.2.0")), &BTreeMap::new(), &[])
        .await
        .unwrap();
    c.reconcile_nodes().await;
    assert_eq!(sync_id(&store, drone).as_deref(), Some(second.as_str()));
    broker.start_again().unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(30)).await);
    c.reconcile_nodes().await;
    assert_eq!(
        cancel_of(topic.next().await),
        second,
        "the cancel survives the broker restart"
    );
    let third = upgrade_of(topic.next().await);
    assert!(third != first && third != second, "{third}");
    c.reconcile_nodes().await;
    topic.nothing_more().await;
}

#[tokio::test]
async fn a_cancel_that_fails_to_publish_holds_the_new_command_back_and_goes_first_next_pass() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let drone = "drone-idle";
    report(&store, drone, "1.0.0", None).await;
    let commands = Arc::new(Flaky::default());
    let c = controllers(&store, Arc::clone(&commands));
    store
        .set_target(drone, Some(firmware("2.0.0")), &BTreeMap::new(), &[])
        .await
        .unwrap();
    c.reconcile_nodes().await;
    let first = commands.upgrades()[0].1.clone();

    store
        .set_target(drone, Some(firmware("2.1.0")), &BTreeMap::new(), &[])
        .await
        .unwrap();
    commands.fail_cancels.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        c.reconcile_nodes().await;
    }
    assert_eq!(
        commands.upgrades().len(),
        1,
        "no new command while the cancel cannot go out: {:?}",
        commands.all()
    );
    assert_eq!(
        sync_id(&store, drone).as_deref(),
        Some(first.as_str()),
        "the record naming the upgrade to cancel is kept"
    );

    commands.fail_cancels.store(false, Ordering::SeqCst);
    c.reconcile_nodes().await;
    let all = commands.all();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(cancel_of(all[1].1.clone()), first);
    let second = upgrade_of(all[2].1.clone());
    assert_ne!(second, first);
    assert_eq!(sync_id(&store, drone).as_deref(), Some(second.as_str()));
    c.reconcile_nodes().await;
    assert_eq!(
        commands.all().len(),
        3,
        "nothing sent twice: {:?}",
        commands.all()
    );
}

/// Issue 22 c: one pass of the node reconciler does a bounded amount of work; the rest of the
/// fleet goes in the next pass, which is due at once.
#[tokio::test]
async fn a_node_pass_writes_for_at_most_its_cap_and_asks_for_the_next_pass_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("drone-{i}")).collect();
    for n in &names {
        report(&store, n, "1.0.0", None).await;
        store
            .set_target(n, Some(firmware("2.0.0")), &BTreeMap::new(), &[])
            .await
            .unwrap();
    }
    let commands = Arc::new(Flaky::default());
    let mut c = controllers(&store, Arc::clone(&commands));
    c.config.max_writes_per_pass = 2;
    assert_eq!(
        c.reconcile_nodes().await,
        Duration::ZERO,
        "the rest is due at once"
    );
    assert_eq!(commands.upgrades().len(), 2);
    let mut passes = 1;
    loop {
        let before = commands.upgrades().len();
        let next = c.reconcile_nodes().await;
        passes += 1;
        assert!(
            commands.upgrades().len() - before <= 2,
            "over the cap in one pass"
        );
        if next != Duration::ZERO {
            break;
        }
        assert!(passes < 10, "the fleet never got through");
    }
    assert_eq!(commands.upgrades().len(), 5, "{:?}", commands.upgrades());
}

/// Many drones written at once, the way a rollout step and a node pass write them
/// (`--write-concurrency`): every write returns. sled's own async flush can leave concurrent
/// callers waiting forever (and block the runtime's threads), which once stalled a rollout
/// mid-wave after a hub restart; the writes run on a thread of their own, so that fails here
/// instead of hanging.
#[test]
fn concurrent_writes_to_the_local_store_all_return() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), NS).unwrap();
    let ids: Vec<String> = (0..64).map(|i| format!("drone-{i}")).collect();
    let (done, finished) = std::sync::mpsc::channel();
    let (writer, names) = (store.clone(), ids.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for round in 0..5 {
                futures_util::stream::iter(&names)
                    .for_each_concurrent(16, |id| {
                        let store = &writer;
                        async move {
                            report(store, id, "1.0.0", None).await;
                            let target = Some(firmware(&format!("2.0.{round}")));
                            let set = store.set_target(id, target, &BTreeMap::new(), &[]).await;
                            assert!(set.unwrap().is_some(), "{id} is missing");
                        }
                    })
                    .await;
            }
        });
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_mins(2)).is_ok(),
        "concurrent local-store writes never returned (or panicked)"
    );
    for id in &ids {
        let node = store.get(NS, id).unwrap();
        assert_eq!(node.spec.firmware.unwrap().version, "2.0.4", "{id}");
    }
}
