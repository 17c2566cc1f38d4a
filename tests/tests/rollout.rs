//! A `FirmwareRollout` over a fleet of 20 real agents (`flightnode-agent run` processes with file
//! slots), real mosquitto and the real hub binary (`serve --controllers`): a bad build whose
//! health check fails on a share of the drones halts in the right wave with the right counts and
//! leaves every drone outside the dispatched waves on its old firmware; a good build then passes
//! through every wave, with the hub killed (SIGKILL) and restarted in the middle: no drone
//! installs twice, no outcome is lost.
//!
//! Stores: the scenario runs twice. On the real kube-apiserver (`FLIGHTNODE_K8S_DIR`, launcher
//! `tests/src/apiserver.rs`; skipped with a message without it): the hub binary runs
//! `--store kube` as the user bound to `hub/deploy/rbac.yaml`'s Role, the FlightNodes are
//! registered by the test as an operator would (the Role has no `create`), and the killed hub is
//! a leader that dies holding its Lease. On the hub's embedded local store (always runs): the
//! same, plus what only that store keeps (the rollout's event list in order, each drone's phase
//! events, which prove one install per generation), and one drone whose id is no valid object
//! name (`Drone_20`). Each run takes about 20 s (35 s on the API server, which waits out the
//! dead leader's Lease); the two never run at once.
//!
//! Determinism: waves come from a stable hash of each drone's name (SHA-256, first 8 bytes, big
//! endian; the contract of docs/src/operator/rollouts.md), computed here from the names the hub
//! shows, and the drones that fail are picked by their rank. The breaker rule only looks at the sample once every drone
//! dispatched so far has finished (`minFinished` = the size of the first two waves), so it trips
//! at exactly one point whatever the order the drones finish in. No wall-clock assertions; every
//! wait has a generous timeout.

use flightnode_tests::agent::binary;
use flightnode_tests::apiserver::ApiServer;
use flightnode_tests::fleet::{Fleet, FleetOptions, HARDWARE, KubeStore, condition, wait_until};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;
use sha2::Digest;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One fleet at a time: two of 20 agents (and an API server) at once would only slow both.
static SERIAL: Mutex<()> = Mutex::new(());

const DRONES: usize = 20;
const OLD: &str = "1.0.0";
const BAD: &str = "2.0.0";
const GOOD: &str = "2.0.1";
/// Cumulative waves: a canary of 2, then up to 8, then everyone.
const CANARY: usize = 2;
const SECOND: usize = 8;
const WAIT: Duration = Duration::from_mins(5);
/// The drone whose id is not a valid Kubernetes name (its object is `drone_20` → derived).
const ODD_ID: &str = "Drone_20";

fn rank_key(name: &str) -> u64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn rollout_yaml(version: &str, url: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fleet\nspec:\n\
         \x20 version: \"{version}\"\n  url: {url}\n\
         \x20 waves:\n    - count: {CANARY}\n      soak: 1s\n    - count: {SECOND}\n      soak: 1s\n\
         \x20 failurePolicy:\n    rules:\n      - kind: rolledBack\n        thresholdPercent: 25\n\
         \x20       minFinished: {SECOND}\n\
         \x20 droneTimeout: 30m\n"
    )
}

fn committed(f: &Value) -> &str {
    f["status"]["firmware"]["committedVersion"].as_str().unwrap_or("")
}

fn is_true(r: &Value, type_: &str, generation: i64) -> bool {
    r["status"]["observedGeneration"].as_i64() == Some(generation)
        && r["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == type_ && c["status"] == "True"))
}

fn counts(r: &Value) -> BTreeMap<String, u64> {
    r["status"]["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        })
        .unwrap_or_default()
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Waits until the rollout has `type_` True for `generation`.
fn wait_rollout(fleet: &Fleet, view: &dyn View, type_: &str, generation: i64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, Duration::from_millis(500), || {
        if let Some(r) = view.rollout() {
            let done = is_true(&r, type_, generation);
            last = r;
            return done;
        }
        false
    });
    assert!(
        ok,
        "the rollout never reached {type_} in generation {generation}; last seen:\n{last:#}\nhub log tail:\n{}",
        tail(&fleet.hub.log())
    );
    last
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// Runs `flightnode-hub ARGS` with `env`: (exit code, stdout, stderr).
fn hub_cli(args: &[String], env: &[(&str, &std::path::Path)]) -> (Option<i32>, String, String) {
    run(&binary("flightnode-hub").unwrap(), args, env)
}

/// Runs `program ARGS` with `env`: (exit code, stdout, stderr).
fn run(
    program: &std::path::Path,
    args: &[String],
    env: &[(&str, &std::path::Path)],
) -> (Option<i32>, String, String) {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the test reads and writes through: the hub's local store, or a real API server.
trait View {
    /// Every FlightNode, as JSON.
    fn nodes(&self) -> Vec<Value>;
    /// The rollout `fleet`, as JSON.
    fn rollout(&self) -> Option<Value>;
    /// `kubectl apply` / `flightnode-hub apply -f` of a rollout.
    fn apply(&self, yaml: &str);
    /// `flightnode-hub rollout status fleet --once` against this store.
    fn rollout_status(&self) -> (Option<i32>, String, String);
    /// Reasons of the rollout's events, oldest first (local store only: on a cluster, events
    /// of one reason become a series).
    fn events(&self) -> Option<Vec<String>>;
    /// Upgrade ids drone `name` reported switching to (local store only: the kube store keeps
    /// no per-drone event log).
    fn switched(&self, name: &str) -> Option<Vec<String>>;
    /// `kubectl flightnode ARGS` as an operator runs it: the hub binary under the plugin's name,
    /// against this store (on a cluster as the admin, through the kubeconfig).
    fn plugin(&self, args: &[&str]) -> (Option<i32>, String, String);
}

/// Runs `kubectl-flightnode ARGS` (the plugin program the hub package ships, which execs the
/// hub beside it under the plugin's name) with `env`.
fn plugin_cli(args: &[String], env: &[(&str, &std::path::Path)]) -> (Option<i32>, String, String) {
    run(&binary("kubectl-flightnode").unwrap(), args, env)
}

struct Local<'a>(&'a Fleet);

impl View for Local<'_> {
    fn nodes(&self) -> Vec<Value> {
        self.0.hub.flightnodes().unwrap_or_default()
    }
    fn rollout(&self) -> Option<Value> {
        self.0.hub.rollout("fleet")
    }
    fn apply(&self, yaml: &str) {
        self.0.hub.apply(yaml).unwrap();
    }
    fn rollout_status(&self) -> (Option<i32>, String, String) {
        let server = format!("http://127.0.0.1:{}", self.0.hub.http_port);
        let args = ["rollout", "status", "fleet", "--once", "--server", &server];
        hub_cli(&args.map(str::to_owned), &[])
    }
    fn events(&self) -> Option<Vec<String>> {
        let events = self.0.hub.rollout_events("fleet").ok()?;
        Some(
            events
                .iter()
                .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
                .collect(),
        )
    }
    fn plugin(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let server = format!("http://127.0.0.1:{}", self.0.hub.http_port);
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        args.extend(["--server".to_owned(), server]);
        plugin_cli(&args, &[])
    }
    fn switched(&self, name: &str) -> Option<Vec<String>> {
        let events = self.0.hub.events(name).ok()?;
        Some(
            events
                .iter()
                .filter(|e| e["phase"] == "Switching")
                .map(|e| e["upgradeId"].as_str().unwrap_or("").to_owned())
                .collect(),
        )
    }
}

/// The fleet: 20 drones, the last one `Drone_20` unless `plain_ids` (on a cluster the hub may
/// not create FlightNodes, so the test creates them, named after the ids).
fn options(kube: Option<KubeStore>, plain_ids: bool) -> FleetOptions {
    FleetOptions {
        drones: DRONES,
        device_id: if plain_ids {
            |i| format!("drone-{}", i + 1)
        } else {
            |i| {
                if i + 1 == DRONES {
                    ODD_ID.to_owned()
                } else {
                    format!("drone-{}", i + 1)
                }
            }
        },
        // A drone fails its health check for version V when its slots directory holds a file
        // `unhealthy-V` (placed below, once the waves are known).
        // It says why on its output, as a real one would: the rollback carries that upstream.
        health: |_| {
            r#"if test -e "$(dirname "$FLIGHTNODE_SLOT_PATH")/unhealthy-$FLIGHTNODE_VERSION"; then echo "checking gps"; echo "gps: no 3D fix after 30 s" >&2; exit 1; fi"#.into()
        },
        hub_args: vec![
            "--offline-after".into(),
            "60s".into(),
            "--controllers".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--retry-backoff".into(),
            "2s".into(),
        ],
        kube,
        ..FleetOptions::default()
    }
}

/// A real kube-apiserver with the committed CRDs and Role, the Role bound to the restricted user
/// the hub runs as, and the 20 FlightNodes an operator registered.
struct Cluster {
    rt: tokio::runtime::Runtime,
    api: ApiServer,
    admin: kube::Client,
}

const NS: &str = "flightnode";

impl Cluster {
    fn start() -> Option<Cluster> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = rt.block_on(ApiServer::start()).unwrap()?;
        let admin = rt.block_on(api.admin_client()).unwrap();
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/deploy");
        rt.block_on(async {
            let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: flightnode}\n";
            api.apply_yaml(&admin, ns, None).await?;
            for file in ["crd.yaml", "rbac.yaml"] {
                let yaml = std::fs::read_to_string(deploy.join(file))?;
                api.apply_yaml(&admin, &yaml, Some(NS)).await?;
            }
            // The hub process runs both jobs (heartbeats and controllers): both Roles.
            for role in ["flightnode-hub", "flightnode-controller"] {
                let binding = format!(
                    "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
                     metadata: {{name: {role}-as-test-user}}\n\
                     roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {role}}}\n\
                     subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: flight-controller}}]\n"
                );
                api.apply_yaml(&admin, &binding, Some(NS)).await?;
            }
            let hub = api.restricted_client().await?;
            api.wait_allowed(&hub, NS, "edge.drone.io", "flightnodes/status", "patch")
                .await?;
            // The Role has no `create`: on a cluster an operator registers the drones.
            for i in 1..=DRONES {
                let node = format!(
                    "apiVersion: edge.drone.io/v1\nkind: FlightNode\nmetadata: {{name: drone-{i}}}\n\
                     spec: {{hardwareId: {HARDWARE}}}\n"
                );
                api.apply_yaml(&admin, &node, Some(NS)).await?;
            }
            anyhow::Ok(())
        })
        .unwrap();
        Some(Cluster { rt, api, admin })
    }

    /// The hub's store on this cluster: the restricted user bound to the hub's Roles.
    fn store(&self) -> KubeStore {
        KubeStore {
            kubeconfig: self.api.restricted_kubeconfig(),
            namespace: NS.to_owned(),
        }
    }

    fn resource(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("edge.drone.io", "v1", kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        Api::namespaced_with(self.admin.clone(), NS, &ar)
    }
}

impl View for Arc<Cluster> {
    fn nodes(&self) -> Vec<Value> {
        let api = self.resource("FlightNode", "flightnodes");
        let list = self.rt.block_on(api.list(&ListParams::default()));
        list.map(|l| {
            l.items
                .iter()
                .filter_map(|o| serde_json::to_value(o).ok())
                .collect()
        })
        .unwrap_or_default()
    }
    fn rollout(&self) -> Option<Value> {
        let api = self.resource("FirmwareRollout", "firmwarerollouts");
        let r = self.rt.block_on(api.get_opt("fleet")).ok()??;
        serde_json::to_value(r).ok()
    }
    fn apply(&self, yaml: &str) {
        self.rt
            .block_on(self.api.apply_yaml(&self.admin, yaml, Some(NS)))
            .unwrap();
    }
    fn rollout_status(&self) -> (Option<i32>, String, String) {
        let args = ["rollout", "status", "fleet", "--once", "--kube", "-n", NS];
        let kubeconfig = self.api.restricted_kubeconfig();
        hub_cli(&args.map(str::to_owned), &[("KUBECONFIG", &kubeconfig)])
    }
    fn events(&self) -> Option<Vec<String>> {
        None
    }
    fn switched(&self, _: &str) -> Option<Vec<String>> {
        None
    }
    fn plugin(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        args.extend(["-n".to_owned(), NS.to_owned()]);
        let kubeconfig = self.api.admin_kubeconfig();
        plugin_cli(&args, &[("KUBECONFIG", &kubeconfig)])
    }
}

#[test]
fn twenty_agents_a_bad_build_halts_in_the_second_wave_then_a_good_build_rolls_through() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut fleet = Fleet::start(options(None, false)).unwrap();
    scenario(&mut fleet, |f| Box::new(Local(f)));
}

/// The same on a real kube-apiserver (skipped without `FLIGHTNODE_K8S_DIR`): the hub binary runs
/// `--store kube` as the user bound to `hub/deploy/rbac.yaml`'s Role, with its Lease; the hub
/// killed mid-wave is a leader that dies without releasing the Lease, and its restart takes it
/// over once it expired.
#[test]
fn twenty_agents_on_a_real_api_server_halt_then_roll_through() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let cluster = Arc::new(cluster);
    let kube = cluster.store();
    let mut fleet = Fleet::start(options(Some(kube), true)).unwrap();
    scenario(&mut fleet, |_| Box::new(Arc::clone(&cluster)));
}

/// Halt in the second wave, then a good build through every wave with the hub killed mid-wave.
fn scenario(fleet: &mut Fleet, view_of: impl for<'a> Fn(&'a Fleet) -> Box<dyn View + 'a>) {
    let (_, bad_url) = fleet.bundle("bad", BAD, 64 * 1024).unwrap();
    let (_, good_url) = fleet.bundle("good", GOOD, 64 * 1024).unwrap();

    // Every drone registered, online, on the factory version; object name → drone index.
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    let registered = wait_until(WAIT, Duration::from_millis(500), || {
        let nodes = view_of(fleet).nodes();
        by_name.clear();
        for f in &nodes {
            let online = condition(f, "Online").is_some_and(|c| c["status"] == "True");
            let id = f["status"]["deviceId"].as_str().unwrap_or("");
            let index = fleet.drones.iter().position(|d| d.id == id);
            if let (true, OLD, Some(i)) = (online, committed(f), index) {
                by_name.insert(f["metadata"]["name"].as_str().unwrap_or("").to_owned(), i);
            }
        }
        by_name.len() == DRONES
    });
    assert!(
        registered,
        "not every drone registered:\n{}",
        tail(&fleet.hub.log())
    );
    let odd_name = by_name
        .iter()
        .find(|(_, i)| fleet.drones[**i].id == ODD_ID)
        .map(|(n, _)| n.clone());
    assert_ne!(
        odd_name.as_deref(),
        Some(ODD_ID),
        "{ODD_ID} is no valid object name"
    );

    // Drone indices by rank: the first CANARY are the canary, up to SECOND the second wave.
    let mut ranked: Vec<(u64, &String)> = by_name.keys().map(|n| (rank_key(n), n)).collect();
    ranked.sort();
    let ranked: Vec<usize> = ranked.iter().map(|(_, n)| by_name[*n]).collect();
    let mark = |i: usize, version: &str| {
        let slots = fleet.drones[i].dir.join("slots");
        std::fs::write(slots.join(format!("unhealthy-{version}")), b"").unwrap();
    };
    // The bad build: three drones of the second wave fail; the canary passes. 3 of 8 finished
    // (37 %) is over 25 %, evaluated only once all 8 finished: the breaker trips in wave 2.
    let bad_ones = &ranked[CANARY..CANARY + 3];
    for &i in bad_ones {
        mark(i, BAD);
    }
    // The good build: one drone of the last wave fails; 1 of ≥ 8 finished never reaches 25 %.
    let good_fails = *ranked[SECOND..]
        .iter()
        .find(|&&i| fleet.drones[i].id != ODD_ID)
        .unwrap();
    mark(good_fails, GOOD);

    view_of(fleet).apply(&rollout_yaml(BAD, &bad_url));
    let r = wait_rollout(fleet, &*view_of(fleet), "Halted", 1);
    let halted = r["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted"))
        .cloned()
        .unwrap();
    assert_eq!(halted["reason"], "CircuitBreakerTripped", "{r:#}");
    assert!(
        halted["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("rolledBack 3 of 8 finished drones (37%) reached the threshold of 25%"),
        "{halted:#}"
    );
    assert_eq!(r["status"]["currentWave"], 1, "halted in the second wave: {r:#}");
    assert_eq!(r["status"]["wave"], "2/3");
    assert_eq!(
        counts(&r),
        expect(&[
            ("total", 20),
            ("succeeded", 5),
            ("rolledBack", 3),
            ("failedTotal", 3),
            ("notStarted", 12),
        ]),
        "{r:#}"
    );

    // Give the controllers a few more passes: nothing new is dispatched after the halt.
    std::thread::sleep(Duration::from_secs(4));
    let r = view_of(fleet).rollout().unwrap();
    assert_eq!(counts(&r)["notStarted"], 12, "{r:#}");
    let nodes = view_of(fleet).nodes();
    for f in &nodes {
        let name = f["metadata"]["name"].as_str().unwrap_or("");
        let i = by_name[name];
        let rank = ranked.iter().position(|&x| x == i).unwrap();
        let drone = &fleet.drones[i];
        let want = if rank >= SECOND || bad_ones.contains(&i) {
            OLD
        } else {
            BAD
        };
        assert_eq!(committed(f), want, "{name} (rank {rank}): {f:#}");
        if rank >= SECOND {
            assert!(f["spec"]["firmware"].is_null(), "{name} was dispatched: {f:#}");
            assert!(drone.slot("b").is_empty(), "{name}: slot b was written");
            assert!(
                drone.status().unwrap()["last_upgrade"].is_null(),
                "{name} saw an upgrade"
            );
        }
        if bad_ones.contains(&i) {
            assert_eq!(f["status"]["lastUpgrade"]["result"], "RolledBack", "{f:#}");
            assert_eq!(f["status"]["lastUpgrade"]["errorCode"], "health_check_failed");
            let why = f["status"]["lastUpgrade"]["errorMessage"].as_str().unwrap_or("");
            assert!(
                why.contains("it said: checking gps | gps: no 3D fix after 30 s"),
                "the rollback cause does not reach the FlightNode: {f:#}"
            );
            assert_eq!(f["status"]["firmware"]["activeSlot"], "a", "{f:#}");
        }
    }
    let (code, out, err) = view_of(fleet).rollout_status();
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("rolled back 3"), "{out}");
    // The per-drone list says why each bad drone rolled back, in its own words.
    assert_eq!(
        out.matches("└ RolledBack health_check_failed: ").count(),
        3,
        "{out}"
    );
    assert_eq!(
        out.matches("it said: checking gps | gps: no 3D fix after 30 s")
            .count(),
        3,
        "{out}"
    );
    assert!(
        err.contains("rollout fleet is halted: rolledBack 3 of 8"),
        "{err}"
    );
    assert_events(&*view_of(fleet), &["WaveAdvanced", "Halted"]);

    // The on-call's view: the fleet at a glance names the three drones that rolled back, and a
    // drone's description says why, in the drone's own words.
    let (code, out, err) = view_of(fleet).plugin(&["fleet"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("{DRONES} drones, {DRONES} online, 0 offline")),
        "{out}"
    );
    assert!(out.contains("Needs attention (3):"), "{out}");
    assert_eq!(
        out.matches(&format!("last upgrade {BAD} RolledBack (health_check_failed)"))
            .count(),
        3,
        "{out}"
    );
    let bad_name = by_name
        .iter()
        .find(|(_, i)| **i == bad_ones[0])
        .map(|(n, _)| n.clone())
        .unwrap();
    let (code, out, err) = view_of(fleet).plugin(&["drone", &bad_name]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&format!("Name:           {bad_name}")), "{out}");
    assert!(out.contains(&format!("Firmware:       {OLD}")), "{out}");
    assert!(out.contains("cause: health_check_failed"), "{out}");
    assert!(
        out.contains("it said: checking gps | gps: no 3D fix after 30 s"),
        "{out}"
    );
    let (code, _, err) = view_of(fleet).plugin(&["drone", "no-such-drone"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no drone no-such-drone in namespace"), "{err}");

    // The good build, a new generation of the same rollout: through every wave. The hub is
    // killed (SIGKILL) once the second wave has started and restarted on the same store.
    view_of(fleet).apply(&rollout_yaml(GOOD, &good_url));
    let second_wave = wait_until(WAIT, Duration::from_millis(100), || {
        view_of(fleet).rollout().is_some_and(|r| {
            r["status"]["observedGeneration"] == 2 && r["status"]["currentWave"].as_u64() >= Some(1)
        })
    });
    assert!(second_wave, "{:#?}", view_of(fleet).rollout());
    fleet.hub.kill();
    fleet.hub.start().unwrap();
    let r = wait_rollout(fleet, &*view_of(fleet), "Complete", 2);
    assert_eq!(r["status"]["wave"], "3/3", "{r:#}");
    assert!(!is_true(&r, "Halted", 2), "{r:#}");
    assert_eq!(
        counts(&r),
        expect(&[
            ("total", 20),
            ("succeeded", 19),
            ("rolledBack", 1),
            ("failedTotal", 1)
        ]),
        "{r:#}"
    );
    for f in view_of(fleet).nodes() {
        let name = f["metadata"]["name"].as_str().unwrap_or("");
        let i = by_name[name];
        let want = if i == good_fails { OLD } else { GOOD };
        assert_eq!(committed(&f), want, "{name}: {f:#}");
    }
    // One install per drone per generation that reached it, across the restart: every upgrade
    // id a drone switched to is distinct, and there are as many as generations that reached it.
    for (name, &i) in &by_name {
        let rank = ranked.iter().position(|&x| x == i).unwrap();
        let installs = if rank < SECOND { 2 } else { 1 };
        let mut switched: Option<Vec<String>> = None;
        let ok = wait_until(WAIT, Duration::from_millis(500), || {
            switched = view_of(fleet).switched(name);
            switched.as_ref().is_none_or(|s| s.len() >= installs)
        });
        let Some(switched) = switched else {
            continue;
        };
        assert!(ok, "{name}: switched {switched:?}");
        let distinct: std::collections::BTreeSet<&String> = switched.iter().collect();
        assert_eq!(
            distinct.len(),
            switched.len(),
            "{name} installed twice: {switched:?}"
        );
        assert_eq!(switched.len(), installs, "{name}: {switched:?}");
    }
    if let Some(odd_name) = &odd_name {
        let odd = view_of(fleet)
            .nodes()
            .into_iter()
            .find(|f| f["metadata"]["name"] == odd_name.as_str())
            .unwrap();
        assert_eq!(committed(&odd), GOOD, "{ODD_ID} got its command: {odd:#}");
    }
    let (code, out, err) = view_of(fleet).rollout_status();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("succeeded 19"), "{out}");
    assert_events(
        &*view_of(fleet),
        &[
            "WaveAdvanced",
            "Halted",
            "WaveAdvanced",
            "WaveAdvanced",
            "Completed",
        ],
    );

    // The rollout's history: its waves, the halt of the bad build and the completion.
    let (code, out, err) = view_of(fleet).plugin(&["rollout", "history", "fleet"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for reason in ["WaveAdvanced", "Halted", "Completed"] {
        assert!(out.contains(reason), "no {reason} in the history:\n{out}");
    }
    assert!(
        out.starts_with("rollout fleet: generation 2, target 2.0.1"),
        "{out}"
    );

    // Pause and resume from the plugin: a spec write anyone could make with `kubectl patch`.
    let (code, out, err) = view_of(fleet).plugin(&["rollout", "pause", "fleet"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "firmwarerollout.edge.drone.io/fleet paused");
    assert_eq!(view_of(fleet).rollout().unwrap()["spec"]["paused"], true);
    let (_, out, _) = view_of(fleet).plugin(&["rollout", "pause", "fleet"]);
    assert_eq!(
        out.trim(),
        "firmwarerollout.edge.drone.io/fleet was already paused"
    );
    let (code, out, err) = view_of(fleet).plugin(&["rollout", "resume", "fleet"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "firmwarerollout.edge.drone.io/fleet resumed");
    assert!(view_of(fleet).rollout().unwrap()["spec"]["paused"].is_null());
    let (code, _, err) = view_of(fleet).plugin(&["rollout", "pause", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("rollout nope in namespace"), "{err}");
    assert!(err.contains("not found"), "{err}");
}

/// The rollout's events are `want` (where the view keeps them). The controller records an event
/// just after the status it explains, so give it a moment.
fn assert_events(view: &dyn View, want: &[&str]) {
    let mut got = None;
    wait_until(WAIT, Duration::from_millis(200), || {
        got = view.events();
        got.as_ref().is_none_or(|g| g == want)
    });
    if let Some(got) = got {
        assert_eq!(got, want);
    }
}

/// Issue 22 e on the real API server: sessions live in the hub's memory, so a hub restarted
/// while its drone went dark must still mark the drone offline, from its stored status (or the
/// drone passes every rollout's online gate forever).
#[test]
fn a_drone_that_went_dark_while_the_hub_restarted_goes_offline_on_a_real_api_server() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let cluster = Arc::new(cluster);
    let kube = cluster.store();
    let mut fleet = Fleet::start(FleetOptions {
        hub_args: ["--offline-after", "3s", "--status-refresh", "3s"]
            .map(String::from)
            .to_vec(),
        kube: Some(kube),
        ..FleetOptions::default()
    })
    .unwrap();
    let online = |want: &str| {
        wait_until(WAIT, Duration::from_millis(500), || {
            cluster.nodes().iter().any(|f| {
                f["metadata"]["name"] == "drone-1"
                    && condition(f, "Online").is_some_and(|c| c["status"] == want)
            })
        })
    };
    assert!(online("True"), "never online:\n{}", tail(&fleet.hub.log()));
    fleet.hub.kill();
    fleet.drones[0].kill();
    fleet.hub.start().unwrap();
    assert!(
        online("False"),
        "the drone stayed online after the hub restarted:\n{}",
        tail(&fleet.hub.log())
    );
}

/// The operator's verbs on the real API server with four real agents, run from outside as an
/// operator would (`kubectl-flightnode`, the admin's kubeconfig): `promote` ends a one-hour
/// soak; `abort` calls back every dispatched drone that has not started (their agents are
/// stopped), and a second one is refused; `resume` lifts the abort without a spec edit and the rollout
/// completes with one drone rolled back; `retry` gives that drone, and only it, a new attempt;
/// `abort` of the complete rollout is refused; `history` names every action and who.
#[test]
fn operators_promote_abort_and_resume_a_rollout_of_real_agents_on_a_real_api_server() {
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let cluster = Arc::new(cluster);
    let kube = cluster.store();
    let mut opts = options(Some(kube), true);
    opts.drones = 4;
    let mut fleet = Fleet::start(opts).unwrap();
    // The four drones with agents, and only they, are the rollout's.
    for i in 1..=4 {
        cluster.apply(&format!(
            "apiVersion: edge.drone.io/v1\nkind: FlightNode\nmetadata: {{name: drone-{i}, labels: {{ops: \"yes\"}}}}\n\
             spec: {{hardwareId: {HARDWARE}}}\n"
        ));
    }
    let (_, url) = fleet.bundle("good", GOOD, 64 * 1024).unwrap();
    let rollout = |flight_states: &str, allow_unknown: bool| {
        format!(
            "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: ops\nspec:\n\
             \x20 version: \"{GOOD}\"\n  url: {url}\n  selector: {{matchLabels: {{ops: \"yes\"}}}}\n\
             \x20 waves:\n    - count: 1\n      soak: 1h\n\
             \x20 gates: {{flightStates: [{flight_states}], allowUnknownFlightState: {allow_unknown}}}\n"
        )
    };
    let online = wait_until(WAIT, Duration::from_millis(500), || {
        cluster
            .nodes()
            .iter()
            .filter(|f| condition(f, "Online").is_some_and(|c| c["status"] == "True"))
            .count()
            == 4
    });
    assert!(online, "not every drone online:\n{}", tail(&fleet.hub.log()));
    cluster.apply(&rollout("disarmed", true));
    let get = || {
        let api = cluster.resource("FirmwareRollout", "firmwarerollouts");
        let r = cluster.rt.block_on(api.get_opt("ops")).ok().flatten();
        r.and_then(|r| serde_json::to_value(r).ok()).unwrap_or_default()
    };
    let soaking = wait_until(WAIT, Duration::from_millis(500), || {
        let r = get();
        r["status"]["waveFinishedTime"].is_string() && r["status"]["currentWave"] == 0
    });
    assert!(soaking, "the canary never finished: {:#}", get());

    // The other three agents stop (they stay Online for the hub's --offline-after 60 s): what
    // is dispatched to them now cannot start. Then the canary's hour of soak is cut short.
    let canary: Vec<String> = cluster
        .nodes()
        .iter()
        .filter(|f| f["spec"]["firmware"]["version"] == GOOD)
        .filter_map(|f| f["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(canary.len(), 1, "{canary:?}");
    let others: Vec<usize> = (0..4).filter(|i| fleet.drones[*i].id != canary[0]).collect();
    for &i in &others {
        fleet.drones[i].kill();
    }
    let plugin = |args: &[&str]| cluster.plugin(args);
    let (code, out, err) = plugin(&["rollout", "promote", "ops"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        out.trim(),
        "firmwarerollout.edge.drone.io/ops promoted: the soak of wave 1 ends now"
    );
    let dispatched = |n: usize| {
        wait_until(WAIT, Duration::from_millis(300), || {
            cluster
                .nodes()
                .iter()
                .filter(|f| f["spec"]["firmware"]["version"] == GOOD)
                .count()
                == n
        })
    };
    assert!(dispatched(4), "wave 2 was not dispatched: {:#}", get());

    // Abort: the three drones that never started are called back; the canary keeps its firmware.
    let (code, out, err) = plugin(&["rollout", "abort", "ops"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("firmwarerollout.edge.drone.io/ops aborted: nothing new is dispatched"),
        "{out}"
    );
    assert!(
        dispatched(1),
        "the unstarted drones were not called back: {:#}",
        get()
    );
    let r = get();
    let halted = r["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&halted["status"], &halted["reason"]),
        (&"True".into(), &"Aborted".into()),
        "{r:#}"
    );
    let (code, _, err) = plugin(&["rollout", "abort", "ops"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("rollout ops: abort: the rollout is already aborted"),
        "{err}"
    );

    // The drones come back, one of them with a health check that fails on this version; an
    // edit does not end the abort, a resume does, and the rollout completes with that drone
    // rolled back.
    let sick = others[0];
    let sick_marker = fleet.drones[sick]
        .dir
        .join("slots")
        .join(format!("unhealthy-{GOOD}"));
    std::fs::write(&sick_marker, b"").unwrap();
    for &i in &others {
        fleet.drones[i].start().unwrap();
    }
    cluster.apply(&format!("{}  maxConcurrent: 10\n", rollout("disarmed", true)));
    let edited = wait_until(WAIT, Duration::from_millis(200), || {
        get()["status"]["observedGeneration"] == 2
    });
    assert!(edited, "{:#}", get());
    std::thread::sleep(Duration::from_secs(3));
    assert!(dispatched(1), "an edit resumed an aborted rollout: {:#}", get());
    let (code, out, err) = plugin(&["rollout", "resume", "ops"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("firmwarerollout.edge.drone.io/ops resumed: halt lifted"),
        "{out}"
    );
    let complete = wait_until(WAIT, Duration::from_millis(500), || {
        is_true(&get(), "Complete", 2)
    });
    assert!(complete, "{:#}\n{}", get(), tail(&fleet.hub.log()));
    assert_eq!(get()["status"]["counts"]["rolledBack"], 1, "{:#}", get());

    // The drone is fixed; retry gives it, and only it, a new attempt.
    std::fs::remove_file(&sick_marker).unwrap();
    let sick_id = fleet.drones[sick].id.clone();
    let (code, out, err) = plugin(&["rollout", "retry", "ops"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        out.trim(),
        format!(
            "firmwarerollout.edge.drone.io/ops retried: a new attempt for the 1 drone(s) that failed: {sick_id}"
        )
    );
    let all_on_target = wait_until(WAIT, Duration::from_millis(500), || {
        get()["status"]["counts"]["succeeded"] == 4
    });
    assert!(all_on_target, "{:#}\n{}", get(), tail(&fleet.hub.log()));
    for f in cluster
        .nodes()
        .iter()
        .filter(|f| f["metadata"]["labels"]["ops"] == "yes")
    {
        assert_eq!(committed(f), GOOD, "{f:#}");
        let retried = f["metadata"]["name"] == sick_id.as_str();
        assert_eq!(
            f["spec"]["firmware"]["retry"].as_u64().unwrap_or(0),
            u64::from(retried),
            "{f:#}"
        );
    }
    let (code, _, err) = plugin(&["rollout", "retry", "ops"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("retry: no drone of this target failed"), "{err}");
    let (code, _, err) = plugin(&["rollout", "abort", "ops"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("rollout ops is complete: nothing to abort"), "{err}");

    // The history: every action, and who did it (the admin user of the kubeconfig).
    let history = get()["status"]["history"].clone();
    let actions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        actions,
        [
            "Created", "Promoted", "Aborted", "Refused", "Edited", "Resumed", "Retried", "Refused"
        ],
        "{history:#}"
    );
    let by: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["by"].as_str().unwrap_or(""))
        .collect();
    // The verbs name the kubeconfig's user as the API server knows it; the edits made through
    // the test's own client carry its field manager.
    assert_eq!(
        by,
        [
            "flightnode-tests",
            "admin",
            "admin",
            "admin",
            "flightnode-tests",
            "admin",
            "admin",
            "admin"
        ],
        "{history:#}"
    );
    // Where a kubectl is installed: it finds the plugin and runs it as `kubectl flightnode`.
    if let Some(kubectl) = which("kubectl") {
        // The plugin program's own directory on PATH (it holds the hub too, as the package's
        // /usr/bin does).
        let plugin = binary("kubectl-flightnode").unwrap();
        let dir = plugin.parent().unwrap();
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
        let kubeconfig = cluster.api.admin_kubeconfig();
        let run = |args: &[&str]| {
            std::process::Command::new(&kubectl)
                .args(args)
                .env("PATH", &path)
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .unwrap()
        };
        let listed = run(&["plugin", "list"]);
        let text = String::from_utf8_lossy(&listed.stdout).into_owned();
        assert!(text.contains("kubectl-flightnode"), "kubectl plugin list: {text}");
        let fleet_view = run(&["flightnode", "fleet", "-n", NS]);
        let text = String::from_utf8_lossy(&fleet_view.stdout).into_owned();
        assert!(fleet_view.status.success(), "{text}");
        assert!(text.contains("Fleet in namespace flightnode:"), "{text}");
    } else {
        eprintln!("no kubectl on PATH: `kubectl plugin list` not checked");
    }
    let (code, out, _) = plugin(&["rollout", "history", "ops"]);
    assert_eq!(code, Some(0));
    for reason in ["Promoted", "Aborted", "Resumed", "Completed"] {
        assert!(out.contains(reason), "no {reason} event:\n{out}");
    }
    fleet.hub.stop();
}

/// An executable named `name` on PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}
