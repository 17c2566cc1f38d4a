//! The fleet page (`/ui`) on a real kube-apiserver (`FLIGHTNODE_K8S_DIR`, skipped without it,
//! and without `chromium`): the page reads the controllers' watch caches. A `--store kube
//! --controllers` hub, two real agents and a paused rollout: the JSON and the page in a real
//! headless browser show both drones and the rollout; a hub without `--controllers` answers the
//! JSON with 503 and says why. The local store's page is `ui.rs`.
//!
//! The page acts only for a signed-in user the API server vouches for: signed in with the
//! admin's token it pauses a rollout and the rollout's history names `admin`; the restricted
//! token's user may not patch rollouts, so its resume is refused with 403, the page says why and
//! the rollout is unchanged; not signed in, the page has no action buttons and a POST without a
//! token is 401. `FLIGHTNODE_UI_SCREENSHOTS=DIR` keeps the page with the refusal shown
//! (`fleet-page-refused.png`) in DIR.

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

/// A real API server with the committed CRDs and Roles, both Roles and the token reviewer's
/// ClusterRole bound to the restricted user the hub runs as, and `drones` FlightNodes an operator
/// registered (the Roles have no `create`).
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
        let reviewer = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
             metadata: {name: flightnode-ui-reviewer-as-test-user}\n\
             roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flightnode-ui-reviewer}\n\
             subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: flight-controller}]\n";
        api.apply_yaml(&admin, reviewer, None).await?;
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

/// Signs the page in with `token`, as a person pastes it into the box.
fn sign_in(b: &mut Browser, token: &str) {
    b.eval(&format!(
        "document.getElementById('signout').click(); \
         document.getElementById('token').value = {}; \
         document.getElementById('signin').requestSubmit(); true",
        serde_json::json!(token)
    ))
    .unwrap();
}

/// Whether the sign-in box is shown (as rendered, not only its attribute).
fn sign_in_shown(b: &mut Browser) -> bool {
    b.eval("getComputedStyle(document.getElementById('signin')).display !== 'none'")
        .is_ok_and(|v| v == true)
}

/// The number of action buttons on the page, and the last action's `[class, text]`.
fn actions(b: &mut Browser) -> (u64, String, String) {
    let v = b
        .eval(
            "[document.querySelectorAll('#rollouts .actions button').length, \
              document.getElementById('action').className, \
              document.getElementById('action').textContent]",
        )
        .unwrap_or(Value::Null);
    (
        v[0].as_u64().unwrap_or(0),
        v[1].as_str().unwrap_or("").to_owned(),
        v[2].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn on_a_real_api_server_the_page_acts_only_for_a_user_the_api_server_allows() {
    let Some(chromium) = browser::find() else {
        eprintln!("SKIPPED: no `chromium` on PATH (Debian package chromium; or set FLIGHTNODE_CHROMIUM)");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One registered drone and no agent: the rollout dispatches and then waits, so it stays in
    // progress for the whole test.
    let Some((api, admin)) = cluster(&rt, 1) else {
        return;
    };
    let fleet = Fleet::start(FleetOptions {
        drones: 0,
        kube: Some(KubeStore {
            kubeconfig: api.restricted_kubeconfig(),
            namespace: NS.into(),
        }),
        hub_args: vec!["--controllers".into(), "--reconcile-interval".into(), "1s".into()],
        ..FleetOptions::default()
    })
    .unwrap();
    let rollout = "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata: {name: fleet}\n\
         spec: {version: \"2.0.0\", url: \"http://127.0.0.1:9/none.fnb\"}\n";
    rt.block_on(api.apply_yaml(&admin, rollout, Some(NS))).unwrap();
    let gvk = kube::core::GroupVersionKind::gvk("edge.drone.io", "v1", "FirmwareRollout");
    let resource = kube::discovery::ApiResource::from_gvk_with_plural(&gvk, "firmwarerollouts");
    let rollouts: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(admin.clone(), NS, &resource);
    let get = || serde_json::to_value(rt.block_on(rollouts.get("fleet")).unwrap()).unwrap();
    let history = |r: &Value| -> Vec<(String, String)> {
        r["status"]["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| (text(h, "/action").to_owned(), text(h, "/by").to_owned()))
            .collect()
    };

    let port = fleet.hub.http_port;
    let mut b = Browser::start(&chromium, 1180, 600).unwrap();
    b.open(&format!("http://127.0.0.1:{port}/ui")).unwrap();
    let loaded = wait_until(WAIT, Duration::from_millis(200), || {
        fleet_page::rollout_state(&mut b, "fleet").is_ok_and(|r| r.is_some()) && sign_in_shown(&mut b)
    });
    assert!(
        loaded,
        "the page never showed the rollout and the sign-in box; chromium:\n{}\nhub log:\n{}",
        b.log(),
        fleet.hub.log()
    );

    // Not signed in: nothing to click, and the endpoint itself wants a token.
    assert_eq!(actions(&mut b).0, 0, "action buttons without signing in");
    let path = format!("/ui/api/rollouts/{NS}/fleet/pause");
    let err = format!(
        "{:#}",
        http_request(port, "POST", &path, "application/json", "").expect_err("a POST without a token")
    );
    assert!(err.contains("HTTP 401") && err.contains("not signed in"), "{err}");
    // The open GET endpoints still only read.
    assert_ne!(get()["spec"]["paused"], true);

    // The controller saw the rollout as created, so the pause is an edit of its own.
    assert!(
        wait_until(
            WAIT,
            Duration::from_millis(200),
            || get()["status"]["observedGeneration"] == 1
        ),
        "the controller never observed the rollout:\n{}",
        fleet.hub.log()
    );
    // The admin's token: the page pauses the rollout, and its history names the admin.
    sign_in(&mut b, "kube-admin");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            actions(&mut b).0 == 5 && !sign_in_shown(&mut b)
        }),
        "no action buttons after signing in: {:?}; chromium:\n{}",
        actions(&mut b),
        b.log()
    );
    b.eval(
        "document.querySelector('#rollouts .rollout[data-name=fleet] button[data-verb=pause]').click(); true",
    )
    .unwrap();
    let mut last = (0, String::new(), String::new());
    let done = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        last = actions(&mut b);
        last.1 == "action ok"
    });
    assert!(
        done,
        "the page never said the pause was done: {last:?}\nhub log:\n{}",
        fleet.hub.log()
    );
    assert!(
        last.2.contains("fleet paused") && last.2.contains("admin"),
        "{last:?}"
    );
    assert_eq!(get()["spec"]["paused"], true);
    let mut seen = Vec::new();
    let recorded = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        seen = history(&get());
        seen.contains(&("Paused".to_owned(), "admin".to_owned()))
    });
    assert!(recorded, "the history does not name the admin's pause: {seen:?}");
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
            fleet_page::rollout_state(&mut b, "fleet")
                .is_ok_and(|r| r.is_some_and(|(state, _)| state == "Halted: Paused"))
        }),
        "the page never showed the pause: {:?}",
        fleet_page::rollout_state(&mut b, "fleet")
    );

    // The restricted token: a user the API server knows, without rights on rollouts. Refused
    // with 403; the page says why; the rollout is unchanged.
    let before = get();
    sign_in(&mut b, "flight-controller");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            actions(&mut b).0 == 5 && !sign_in_shown(&mut b)
        }),
        "no action buttons after signing in again"
    );
    b.eval("document.querySelector('#rollouts .rollout[data-name=fleet] button[data-verb=resume]').click(); true")
        .unwrap();
    let refused = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        last = actions(&mut b);
        last.1 == "action error"
    });
    assert!(refused, "the page never showed the refusal: {last:?}");
    assert!(
        last.2.contains("HTTP 403")
            && last
                .2
                .contains("flight-controller may not patch firmwarerollouts")
            && last.2.contains("flightnode-operator"),
        "{last:?}"
    );
    if let Some(dir) = std::env::var_os("FLIGHTNODE_UI_SCREENSHOTS") {
        b.screenshot(&std::path::Path::new(&dir).join("fleet-page-refused.png"))
            .unwrap();
    }
    let after = get();
    assert_eq!(
        after["spec"]["paused"], true,
        "the refused resume resumed the rollout"
    );
    assert_eq!(after["metadata"]["generation"], before["metadata"]["generation"]);
    assert_eq!(
        after["metadata"]["annotations"], before["metadata"]["annotations"],
        "the refused action wrote to the rollout"
    );

    // A token the API server does not know: 401, also from the endpoint itself.
    let err = format!(
        "{:#}",
        http_request_bearer(port, &path, "no-such-token").expect_err("an unknown token")
    );
    assert!(
        err.contains("HTTP 401") && err.contains("does not accept this token"),
        "{err}"
    );
}

/// A POST with `Authorization: Bearer TOKEN`.
fn http_request_bearer(port: u16, path: &str, token: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("0");
    anyhow::ensure!(status == "200", "POST {path}: HTTP {status}: {body}");
    Ok(body.to_owned())
}
