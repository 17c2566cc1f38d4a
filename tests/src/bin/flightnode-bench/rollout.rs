//! `rollout`: N simulated drones through a FirmwareRollout on the real Kubernetes API server,
//! against the real `flightnode-hub serve --store kube --controllers`, next to the same rollout
//! with N/10 drones in the same run.
//!
//! Only external interfaces are read, so the bench does not follow the hub's internals: the API
//! server's own `/metrics` (`apiserver_request_total`), the hub's `/metrics`, `/proc/<pid>/status`,
//! the MQTT commands the drones receive and a watch on the objects.

use crate::prom::{Scrape, label};
use crate::rollout_drones::Fleet;
use crate::rollout_report::{Row, print_table};
use anyhow::{Context, Result, bail};
use flightnode_tests::agent::binary;
use flightnode_tests::apiserver::ApiServer;
use flightnode_tests::fleet::{Proc, free_port, http_get, rss_kib};
use flightnode_tests::load;
use flightnode_tests::mosquitto::Mosquitto;
use futures_util::{StreamExt, TryStreamExt};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "flightnode";
pub(crate) const FROM: &str = "1.0.0";
pub(crate) const TO: &str = "2.0.0";
const CRD: &str = include_str!("../../../../hub/deploy/crd.yaml");
const RBAC: &str = include_str!("../../../../hub/deploy/rbac.yaml");
/// API groups whose requests are counted (the hub's and nothing of the server's own).
pub(crate) const GROUPS: [&str; 3] = ["edge.drone.io", "coordination.k8s.io", "events.k8s.io"];

/// What one `rollout` run does.
#[derive(Debug, Clone)]
pub(crate) struct RolloutPlan {
    /// Drones of the measured row (the baseline row has a tenth).
    pub(crate) drones: usize,
    /// The hub's `--api-qps` / `--api-burst` (heartbeat status writes).
    pub(crate) api_qps: f64,
    pub(crate) api_burst: u32,
    /// Heartbeat interval of the drones and the hub.
    pub(crate) interval: Duration,
    /// Soak of the first two waves.
    pub(crate) soak: String,
    /// The rollout's `spec.dispatchRate.maximumPerMinute` (the hub's default of 600 would make a
    /// 10,000-drone run take 17 minutes of dispatching alone).
    pub(crate) max_per_minute: u32,
    /// Longest wait for Complete.
    pub(crate) timeout: Duration,
}

pub(crate) fn rollout_bench(plan: &RolloutPlan) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for n in [(plan.drones / 10).max(1), plan.drones] {
        rows.push(rt.block_on(run(n, plan))?);
    }
    print_table(plan, &rows);
    Ok(())
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("edge.drone.io", "v1", kind))
}

/// The API server with the committed CRDs and Roles, both Roles bound to the restricted user.
async fn cluster() -> Result<(ApiServer, Client)> {
    let Some(api) = ApiServer::start().await? else {
        bail!(
            "rollout needs the real API server: set {}",
            flightnode_tests::apiserver::ENV_DIR
        );
    };
    let admin = api.admin_client().await?;
    let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    api.apply_yaml(&admin, &ns, None).await?;
    api.apply_yaml(&admin, CRD, Some(NS)).await?;
    api.apply_yaml(&admin, RBAC, Some(NS)).await?;
    for role in ["flightnode-hub", "flightnode-controller"] {
        let binding = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {role}-as-bench}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {role}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {}}}]\n",
            flightnode_tests::apiserver::RESTRICTED_USER
        );
        api.apply_yaml(&admin, &binding, Some(NS)).await?;
    }
    let restricted = api.restricted_client().await?;
    for (resource, verb) in [("flightnodes/status", "patch"), ("flightnodes", "patch")] {
        api.wait_allowed(&restricted, NS, "edge.drone.io", resource, verb)
            .await?;
    }
    Ok((api, admin))
}

/// Creates the drones as an operator would: server-side apply, field manager `kubectl`.
async fn create_drones(admin: &Client, n: usize) -> Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &resource("FlightNode"));
    futures_util::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = load::drone_id(i);
                let body = serde_json::json!({
                    "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
                    "metadata": { "name": name, "labels": { "fleet": "bench" } },
                    "spec": { "hardwareId": "cc-sim-v1" },
                });
                api.patch(&name, &PatchParams::apply("kubectl"), &Patch::Apply(body))
                    .await
                    .with_context(|| format!("create FlightNode {name}"))
            }
        })
        .buffer_unordered(16)
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// When the bench's watch first delivered each fact about one FlightNode.
#[derive(Debug, Default, Clone)]
struct Seen {
    online: bool,
    spec: Option<Instant>,
    /// `status.firmwareSync` naming an upgrade id for the target: (id, when).
    record: Option<(String, Instant)>,
    synced: Option<(String, Instant)>,
}

type Watched = Arc<Mutex<HashMap<String, Seen>>>;

/// Watches the FlightNodes (as admin) and notes, per object, when each fact first showed.
fn watch_nodes(admin: &Client) -> (Watched, tokio::task::JoinHandle<()>) {
    use kube::runtime::{WatchStreamExt, watcher};
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &resource("FlightNode"));
    let seen: Watched = Arc::default();
    let out = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures_util::pin_mut!(stream);
        while let Some(next) = stream.next().await {
            let Ok(obj) = next else { continue };
            let at = Instant::now();
            let name = obj.metadata.name.clone().unwrap_or_default();
            let d = &obj.data;
            let sync = &d["status"]["firmwareSync"];
            let online = d["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Online" && c["status"] == "True"));
            let mut seen = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let s = seen.entry(name).or_default();
            s.online = online;
            if s.spec.is_none() && d["spec"]["firmware"]["version"] == TO {
                s.spec = Some(at);
            }
            if let (Some(id), true) = (sync["upgradeId"].as_str(), sync["version"] == TO) {
                if s.record.as_ref().is_none_or(|(old, _)| old != id) {
                    s.record = Some((id.to_owned(), at));
                }
                if sync["reason"] == "Synced" && s.synced.as_ref().is_none_or(|(old, _)| old != id) {
                    s.synced = Some((id.to_owned(), at));
                }
            }
        }
    });
    (seen, task)
}

/// The rollout's `status` as the bench's watch last saw it.
type RolloutStatus = Arc<Mutex<serde_json::Value>>;

fn watch_rollout(admin: &Client) -> (RolloutStatus, tokio::task::JoinHandle<()>) {
    use kube::runtime::{WatchStreamExt, watcher};
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &resource("FirmwareRollout"));
    let status: RolloutStatus = Arc::default();
    let out = Arc::clone(&status);
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures_util::pin_mut!(stream);
        while let Some(next) = stream.next().await {
            let Ok(obj) = next else { continue };
            *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = obj.data["status"].clone();
        }
    });
    (status, task)
}

/// Whether `status` has condition `kind` True.
fn condition_true(status: &serde_json::Value, kind: &str) -> bool {
    status["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == kind && c["status"] == "True"))
}

/// The rollout: waves 1 %, 10 % (each soaking `soak`), 100 %; no `maxConcurrent`, default gates,
/// at most `per_minute` dispatches a minute.
fn rollout_body(soak: &str, per_minute: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "edge.drone.io/v1", "kind": "FirmwareRollout",
        "metadata": { "name": "bench", "namespace": NS },
        "spec": {
            "version": TO,
            "url": format!("http://fw.example/{TO}.fnb"),
            "selector": { "matchLabels": { "fleet": "bench" } },
            "waves": [
                { "percent": 1, "soak": soak },
                { "percent": 10, "soak": soak },
                { "percent": 100 },
            ],
            "dispatchRate": { "maximumPerMinute": per_minute },
        },
    })
}

async fn apiserver_metrics(admin: &Client) -> Result<Scrape> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    Ok(Scrape::parse(&admin.request_text(req).await?))
}

fn hub_metrics(http_port: u16) -> Result<Scrape> {
    Ok(Scrape::parse(&http_get(http_port, "/metrics")?))
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `done` holds, polling every 200 ms; fails with `what` after `timeout`.
async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn run(n: usize, plan: &RolloutPlan) -> Result<Row> {
    eprintln!("rollout, {n} drones: API server, CRDs, Roles");
    let (api, admin) = cluster().await?;
    let broker = Mosquitto::start()?;
    eprintln!("rollout, {n} drones: creating FlightNodes");
    create_drones(&admin, n).await?;
    let (seen, node_watch) = watch_nodes(&admin);
    let (rollout_status, rollout_watch) = watch_rollout(&admin);
    let tmp = tempfile::tempdir()?;
    let (grpc_port, http_port) = (free_port()?, free_port()?);
    let mut cmd = std::process::Command::new(binary("flightnode-hub")?);
    cmd.args([
        "serve",
        "--insecure",
        "--store",
        "kube",
        "--namespace",
        NS,
        "--controllers",
    ])
    .args(["--identity", "bench-hub", "--mqtt-url", &broker.url()])
    .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
    .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
    .args(["--api-qps", &plan.api_qps.to_string()])
    .args(["--api-burst", &plan.api_burst.to_string()])
    .args(["--heartbeat-interval", &format!("{}s", plan.interval.as_secs())])
    .env("KUBECONFIG", api.restricted_kubeconfig())
    .env("RUST_LOG", "warn");
    let mut hub = Proc::spawn(cmd, &tmp.path().join("hub.log"))?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse()?;
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if t.elapsed() > Duration::from_secs(30) || !hub.running() {
            bail!("hub did not listen: {}", hub.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = hub.pid().context("hub gone")?;
    let clients = load::pool(addr, 12).await?;
    let fleet = Fleet::start(broker.port(), &clients, n, FROM, plan.interval).await?;
    eprintln!("rollout, {n} drones: waiting for every FlightNode to show Online");
    let online_wait = plan.interval * 3 + Duration::from_secs_f64(n as f64 / plan.api_qps * 3.0);
    wait_for("every drone Online", online_wait, || {
        let s = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.values().filter(|s| s.online).count() >= n
    })
    .await
    .with_context(|| hub.log())?;

    let (rss_before_kib, _) = rss_kib(pid).context("hub gone")?;
    let api_before = apiserver_metrics(&admin).await?;
    let hub_before = hub_metrics(http_port)?;
    let loads = Arc::new(Mutex::new(Vec::<f64>::new()));
    let loads_w = Arc::clone(&loads);
    let load_task = tokio::spawn(async move {
        loop {
            loads_w
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(load1());
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    eprintln!("rollout, {n} drones: applying the FirmwareRollout");
    let started = Instant::now();
    let rollouts: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &resource("FirmwareRollout"));
    rollouts
        .patch(
            "bench",
            &PatchParams::apply("kubectl"),
            &Patch::Apply(rollout_body(&plan.soak, plan.max_per_minute)),
        )
        .await
        .context("apply the FirmwareRollout")?;
    let complete = wait_for("the rollout Complete", plan.timeout, || {
        condition_true(
            &rollout_status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            "Complete",
        )
    })
    .await;
    let took = started.elapsed();
    let mut all_synced = None;
    if let Err(e) = &complete {
        // Measured as far as it got: the row says so.
        eprintln!("rollout, {n} drones: {e}; hub log tail:\n{}", tail(&hub.log()));
    } else {
        // The last drones' Synced records follow Complete by up to a node pass (over a minute
        // at 10k drones).
        if wait_for("every dispatched drone Synced", Duration::from_mins(5), || {
            let s = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.values().filter(|s| s.synced.is_some()).count() >= n
        })
        .await
        .is_ok()
        {
            all_synced = Some(started.elapsed());
        }
    }
    let final_status = rollout_status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let api_after = apiserver_metrics(&admin).await?;
    let hub_after = hub_metrics(http_port)?;
    load_task.abort();
    let (_, hwm_kib) = rss_kib(pid).context("hub gone")?;
    hub.stop();
    node_watch.abort();
    rollout_watch.abort();

    let api_delta = api_after.minus(&api_before);
    let hub_delta = hub_after.minus(&hub_before);
    let mut requests = BTreeMap::new();
    for (labels, v) in api_delta.samples("apiserver_request_total") {
        let group = label(labels, "group").unwrap_or_default();
        if v <= 0.0 || !GROUPS.contains(&group) {
            continue;
        }
        let verb = label(labels, "verb").unwrap_or_default().to_owned();
        let mut res = label(labels, "resource").unwrap_or_default().to_owned();
        if let Some(sub) = label(labels, "subresource").filter(|s| !s.is_empty()) {
            res = format!("{res}/{sub}");
        }
        *requests.entry((verb, res)).or_insert(0.0) += v;
    }
    let upgrades = fleet
        .tally
        .upgrades
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut first_cmd: HashMap<usize, (&str, Instant)> = HashMap::new();
    for u in &upgrades {
        first_cmd.entry(u.drone).or_insert((&u.upgrade_id, u.at));
    }
    let signed_ms = |later: Instant, earlier: Instant| -> i64 {
        if later >= earlier {
            i64::try_from(later.duration_since(earlier).as_micros()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from(earlier.duration_since(later).as_micros()).unwrap_or(i64::MAX)
        }
    };
    let (mut spec_to_cmd, mut cmd_to_record, mut cmd_to_synced, mut spec_to_synced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut never_synced = 0;
    for (i, (id, at)) in &first_cmd {
        let Some(s) = seen.get(&load::drone_id(*i)) else {
            continue;
        };
        if let Some(spec) = s.spec {
            spec_to_cmd.push(signed_ms(*at, spec));
        }
        if let Some((rid, r)) = &s.record
            && rid == id
        {
            cmd_to_record.push(signed_ms(*r, *at));
        }
        match &s.synced {
            Some((sid, t)) if sid == id => {
                cmd_to_synced.push(signed_ms(*t, *at));
                if let Some(spec) = s.spec {
                    spec_to_synced.push(signed_ms(*t, spec));
                }
            }
            _ => never_synced += 1,
        }
    }
    for v in [
        &mut spec_to_cmd,
        &mut cmd_to_record,
        &mut cmd_to_synced,
        &mut spec_to_synced,
    ] {
        v.sort_unstable();
    }
    let loads = loads
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let row = Row {
        drones: n,
        complete: complete.is_ok(),
        succeeded: final_status["counts"]["succeeded"].as_u64().unwrap_or(0),
        wave: final_status["wave"].as_str().unwrap_or_default().to_owned(),
        dispatched: first_cmd.len(),
        commands: upgrades.len(),
        took,
        all_synced,
        rollout_step: hub_delta.histogram(
            "flightnode_hub_reconcile_duration_seconds",
            &[("controller", "rollout")],
        ),
        node_pass: hub_delta.histogram(
            "flightnode_hub_reconcile_duration_seconds",
            &[("controller", "node")],
        ),
        requests,
        heartbeat_writes: hub_delta.sum("flightnode_hub_status_writes_total", &[]),
        hwm_kib,
        rss_before_kib,
        spec_to_cmd,
        cmd_to_record,
        cmd_to_synced,
        spec_to_synced,
        never_synced,
        load_max: loads.iter().copied().fold(0.0, f64::max),
        load_mean: loads.iter().sum::<f64>() / loads.len().max(1) as f64,
        heartbeat_errors: fleet.tally.errors.load(std::sync::atomic::Ordering::Relaxed),
    };
    drop(fleet);
    Ok(row)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
