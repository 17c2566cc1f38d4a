//! The real-API-server harness of the controller tests: a kube-apiserver with the committed CRDs
//! and Role (skipped without `FLIGHTNODE_K8S_DIR`), drones created as an operator would, their
//! statuses written the way the hub writes heartbeat statuses (the real `KubeSink`), and a
//! [`CommandSink`] that records commands instead of publishing them.

use flightnode_hub::api::flightnode::{FirmwareSync, FlightNode, FlightNodeStatus};
use flightnode_hub::api::rollout::FirmwareRollout;
use flightnode_hub::controller::mqtt::CommandSink;
use flightnode_hub::controller::reconcile::{ControllerConfig, Controllers};
use flightnode_hub::decide::status::{Liveness, SpecView, from_heartbeat, with_conditions};
use flightnode_hub::metrics::Metrics;
use flightnode_hub::store::fleet::KubeFleet;
use flightnode_hub::store::kube::KubeSink;
use flightnode_hub::store::sink::{StatusSink, WriteRequest};
use flightnode_proto::mqtt::Command;
use flightnode_proto::v1;
use flightnode_tests::apiserver::ApiServer;
use futures_util::future::BoxFuture;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NS: &str = "flightnode";

/// Records every command instead of publishing it.
#[derive(Default)]
pub struct Recorded(pub Mutex<Vec<(String, Command)>>);

impl Recorded {
    pub fn all(&self) -> Vec<(String, Command)> {
        self.0.lock().unwrap().clone()
    }
    /// Versions of the upgrade commands per device, in order.
    pub fn versions(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (device, cmd) in self.all() {
            if let Command::Upgrade(u) = cmd {
                let v = u.version.map(|v| v.to_string()).unwrap_or_default();
                out.entry(device).or_default().push(v);
            }
        }
        out
    }
    /// Canceled upgrade ids per device.
    pub fn cancels(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (device, cmd) in self.all() {
            if let Command::Cancel { upgrade_id } = cmd {
                out.entry(device).or_default().push(upgrade_id);
            }
        }
        out
    }
    /// Upgrade ids per device, in order.
    pub fn upgrades(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (device, cmd) in self.all() {
            if let Command::Upgrade(u) = cmd {
                out.entry(device).or_default().push(u.upgrade_id);
            }
        }
        out
    }
}

impl CommandSink for Recorded {
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, flightnode_hub::Result<()>> {
        self.0.lock().unwrap().push((device_id.to_owned(), cmd.clone()));
        Box::pin(async { Ok(()) })
    }
}

/// A server with the committed CRDs and Role, the Role bound to the restricted user.
pub async fn cluster() -> anyhow::Result<Option<(ApiServer, Client, Client)>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(api) = ApiServer::start().await? else {
        return Ok(None);
    };
    let admin = api.admin_client().await?;
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    api.apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: flightnode}\n",
        None,
    )
    .await?;
    for file in ["crd.yaml", "rbac.yaml"] {
        let yaml = std::fs::read_to_string(deploy.join(file))?;
        api.apply_yaml(&admin, &yaml, Some(NS)).await?;
    }
    // The test user runs both jobs (heartbeats and controllers): it gets both Roles.
    for role in ["flightnode-hub", "flightnode-controller"] {
        api.apply_yaml(
            &admin,
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {role}-as-test-user}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {role}}}\n\
                 subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: flight-controller}}]\n"
            ),
            Some(NS),
        )
        .await?;
    }
    let hub = api.restricted_client().await?;
    api.wait_allowed(&hub, NS, "edge.drone.io", "flightnodes/status", "patch")
        .await?;
    Ok(Some((api, admin, hub)))
}

/// Creates drones as an operator would (`kubectl apply`, its own field manager).
pub async fn create_drones(admin: &Client, names: &[String]) -> anyhow::Result<()> {
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    for name in names {
        let body = serde_json::json!({
            "apiVersion": "edge.drone.io/v1", "kind": "FlightNode",
            "metadata": { "name": name, "labels": { "fleet": "test" } },
            "spec": { "hardwareId": "hw-x1" },
        });
        nodes
            .patch(name, &PatchParams::apply("kubectl"), &Patch::Apply(body))
            .await?;
    }
    Ok(())
}

/// What a drone reports, written as the hub writes heartbeat statuses.
#[derive(Clone, Default)]
pub struct Report {
    /// Committed version.
    pub version: String,
    /// Upgrade in flight (phase `downloading`).
    pub current: Option<String>,
    /// Last upgrade: (id, result, error code).
    pub last: Option<(String, &'static str, &'static str)>,
    /// Silent for a minute: `Online` False.
    pub offline: bool,
    /// Flights since commit and their airborne seconds (a drone with a MAVLink link).
    pub flights: Option<(u32, u64)>,
}

pub fn status_of(name: &str, r: &Report) -> FlightNodeStatus {
    let mut hb = flightnode_proto::sample::idle_heartbeat(name, &r.version);
    if let (Some((flights, secs)), Some(fw)) = (r.flights, hb.firmware.as_mut()) {
        fw.flights = Some(flights);
        fw.airborne_seconds = Some(secs);
    }
    if let Some(id) = &r.current {
        hb.upgrade = Some(v1::CurrentUpgrade {
            upgrade_id: id.clone(),
            phase: "downloading".into(),
            ..Default::default()
        });
    }
    if let Some((id, result, code)) = &r.last {
        hb.last_upgrade = Some(v1::LastUpgrade {
            upgrade_id: id.clone(),
            result: (*result).into(),
            error_code: (*code).into(),
            finished_unix: 1_800_000_000,
            ..Default::default()
        });
    }
    let now = flightnode_hub::decide::status::rfc3339(time::OffsetDateTime::now_utc());
    let mut s = with_conditions(
        from_heartbeat(&hb),
        if r.offline {
            Liveness::Offline { silent_secs: 60 }
        } else {
            Liveness::Online
        },
        &SpecView::default(),
        &[],
        &now,
    );
    s.last_heartbeat_time = Some(now);
    s
}

pub async fn report(sink: &KubeSink, name: &str, r: &Report) -> anyhow::Result<()> {
    let req = WriteRequest {
        name: name.to_owned(),
        device_id: name.to_owned(),
        hardware_id: "hw-x1".into(),
        status: status_of(name, r),
        events: Vec::new(),
    };
    sink.write_status(&req)
        .await
        .map_err(|e| anyhow::anyhow!("status of {name}: {e}"))
}

pub async fn controllers(
    hub: &Client,
    commands: Arc<Recorded>,
    identity: &str,
) -> anyhow::Result<Controllers> {
    let store = KubeFleet::start(hub.clone(), NS, identity).await?;
    Ok(Controllers::new(
        Arc::new(store),
        commands,
        Arc::new(Metrics::new()),
        ControllerConfig::default(),
    ))
}

/// Every FlightNode and FirmwareRollout in [`NS`], read fresh from the API server.
pub async fn lists(admin: &Client) -> anyhow::Result<(Vec<FlightNode>, Vec<FirmwareRollout>)> {
    let nodes: Api<FlightNode> = Api::namespaced(admin.clone(), NS);
    let rollouts: Api<FirmwareRollout> = Api::namespaced(admin.clone(), NS);
    Ok((
        nodes.list(&ListParams::default()).await?.items,
        rollouts.list(&ListParams::default()).await?.items,
    ))
}

/// What a test that timed out prints: each drone's firmwareSync record.
pub fn sync_records(nodes: &[FlightNode]) -> Vec<(String, Option<FirmwareSync>)> {
    nodes
        .iter()
        .map(|n| {
            (
                n.name_any(),
                n.status.as_ref().and_then(|s| s.firmware_sync.clone()),
            )
        })
        .collect()
}

/// Steps until `done` holds on a fresh read (watch caches lag writes a little), for at most a
/// minute; returns that read. A timeout names every drone's firmwareSync record.
pub async fn step_until<F>(
    c: &Controllers,
    admin: &Client,
    what: &str,
    done: F,
) -> anyhow::Result<(Vec<FlightNode>, Vec<FirmwareRollout>)>
where
    F: Fn(&[FlightNode], &[FirmwareRollout]) -> bool,
{
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        c.step().await;
        let (n, r) = lists(admin).await?;
        if done(&n, &r) {
            return Ok((n, r));
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for: {what}\ndrones: {:#?}", sync_records(&n));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

pub fn sync_reason(nodes: &[FlightNode], name: &str) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.name_any() == name)?
        .status
        .as_ref()?
        .firmware_sync
        .as_ref()
        .map(|s| s.reason.clone())
}
