//! The fleet page (`/ui`) on a real kube-apiserver (`FLIGHTNODE_K8S_DIR`, skipped without it,
//! and without `chromium`): the page reads the controllers' watch caches. A `--store kube
//! --controllers` hub, two real agents and a paused rollout: the JSON and the page in a real
//! headless browser show both drones and the rollout; a hub without `--controllers` answers the
//! JSON with 503 and says why. The local store's page is `ui.rs`.

use flightnode_tests::apiserver::ApiServer;
use flightnode_tests::browser::{self, Browser};
use flightnode_tests::fleet::{Fleet, FleetOptions, Hub, KubeStore, http_get, http_request, wait_until};
use flightnode_tests::fleet_page;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(3);

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

const NS: &str = "flightnode";

/// A real API server with the committed CRDs and Roles, both Roles bound to the restricted user
/// the hub runs as, and `drones` FlightNodes an operator registered (the Roles have no `create`).
fn cluster(rt: &tokio::runtime::Runtime, drones: usize) -> Option<(ApiServer, kube::Client)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = rt.block_on(ApiServer::start()).unwrap()?;
    let admin = rt.block_on(api.admin_client()).unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/deploy");
    rt.block_on(async {
        let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
        api.apply_yaml(&admin, &ns, None).await?;
        for file in ["crd.yaml", "rbac.yaml"] {
            let yaml = std::fs::read_to_string(deploy.join(file))?;
            api.apply_yaml(&admin, &yaml, Some(NS)).await?;
        }
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
        for i in 1..=drones {
            let node = format!(
                "apiVersion: edge.drone.io/v1\nkind: FlightNode\nmetadata: {{name: drone-{i}}}\n\
                 spec: {{hardwareId: {}}}\n",
                flightnode_tests::fleet::HARDWARE
            );
            api.apply_yaml(&admin, &node, Some(NS)).await?;
        }
        anyhow::Ok(())
    })
    .unwrap();
    Some((api, admin))
}

#[test]
fn on_a_real_api_server_the_page_reads_the_controllers_caches() {
    let Some(chromium) = browser::find() else {
        eprintln!("SKIPPED: no `chromium` on PATH (Debian package chromium; or set FLIGHTNODE_CHROMIUM)");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some((api, admin)) = cluster(&rt, 2) else {
        return;
    };
    let kube = KubeStore {
        kubeconfig: api.restricted_kubeconfig(),
        namespace: NS.into(),
    };
    let fleet = Fleet::start(FleetOptions {
        drones: 2,
        kube: Some(kube.clone()),
        hub_args: vec![
            "--offline-after".into(),
            "60s".into(),
            "--controllers".into(),
            "--reconcile-interval".into(),
            "1s".into(),
        ],
        ..FleetOptions::default()
    })
    .unwrap();
    // Paused: it dispatches nothing, and the page shows it with its state.
    let rollout = "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {name: fleet}\n\
         spec: {version: \"2.0.0\", url: \"http://127.0.0.1:9/none.fnb\", paused: true}\n";
    rt.block_on(api.apply_yaml(&admin, rollout, Some(NS))).unwrap();

    let port = fleet.hub.http_port;
    let mut last = Value::Null;
    let shown = wait_until(WAIT, Duration::from_millis(200), || {
        let Ok(body) = http_get(port, "/ui/api/fleet") else {
            return false;
        };
        last = serde_json::from_str(&body).unwrap_or(Value::Null);
        let drones: BTreeMap<&str, &str> = last["drones"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .map(|d| (text(d, "/name"), text(d, "/version")))
                    .collect()
            })
            .unwrap_or_default();
        last["store"] == "kube"
            && drones == BTreeMap::from([("drone-1", "1.0.0"), ("drone-2", "1.0.0")])
            && last["rollouts"][0]["name"] == "fleet"
            && last["rollouts"][0]["paused"] == true
    });
    assert!(
        shown,
        "the kube-store hub never showed both drones and the rollout; last: {last:#}\nhub log:\n{}",
        fleet.hub.log()
    );

    let mut b = Browser::start(&chromium, 1180, 600).unwrap();
    b.open(&format!("http://127.0.0.1:{port}/ui")).unwrap();
    let loaded = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let page = fleet_page::drones(&mut b).unwrap();
        page.len() == 2
            && page.values().all(|r| r.version == "1.0.0")
            && b.eval("document.getElementById('store').textContent")
                .is_ok_and(|s| s == "store: kube")
            && fleet_page::rollout_state(&mut b, "fleet").is_ok_and(|r| r.is_some())
    });
    assert!(
        loaded,
        "the page never showed the kube store's fleet: {:?}; chromium:\n{}",
        fleet_page::drones(&mut b),
        b.log()
    );

    // A drone-facing replica without the controllers has no caches to read: it says so.
    let dir = fleet.dir.path().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let mut plain = Hub::new(&dir, vec![]).unwrap();
    plain.kube = Some(kube);
    plain.start().unwrap();
    let err = http_request(plain.http_port, "GET", "/ui/api/fleet", "text/plain", "")
        .expect_err("a hub without --controllers has no fleet to show");
    let err = format!("{err:#}");
    assert!(err.contains("HTTP 503") && err.contains("--controllers"), "{err}");
    http_get(plain.http_port, "/ui").unwrap();
}
