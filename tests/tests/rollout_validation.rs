//! A FirmwareRollout spec the controller would trip over later (a breaker at 0 %, a wave of
//! 0 drones, count and percent both set, a soak that is no duration…) is refused when it is
//! applied, with a message naming the field: by the CRD's schema on the real kube-apiserver
//! (`FLIGHTNODE_K8S_DIR`; skipped with a message without it) and by the hub's local store behind
//! `flightnode-hub apply -f`, from one table (`hub/tests/fixtures/invalid_rollouts.yaml`).

use flightnode_tests::apiserver::ApiServer;
use flightnode_tests::fleet::{Fleet, FleetOptions};
use flightnode_tests::release::workspace_root;
use serde_json::{Value, json};

struct Case {
    why: String,
    spec: Value,
    names: String,
}

fn cases() -> Vec<Case> {
    let path = workspace_root().join("hub/tests/fixtures/invalid_rollouts.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let list: Vec<Value> = serde_saphyr::from_str(&text).unwrap();
    assert!(!list.is_empty());
    list.into_iter()
        .map(|c| Case {
            why: c["why"].as_str().unwrap().to_owned(),
            spec: c["spec"].clone(),
            names: c["names"].as_str().unwrap().to_owned(),
        })
        .collect()
}

/// A valid rollout named `name`, with `patch`'s top-level keys replacing those of its spec. JSON,
/// which is YAML too.
fn rollout(name: &str, patch: &Value) -> String {
    let mut spec = json!({
        "version": "2.0.0",
        "url": "http://fw.example/v2.fnb",
        "waves": [{"count": 1, "soak": "10m"}, {"percent": 50, "soak": "1h30m"}],
        "droneTimeout": "30m",
        "maxConcurrent": 5,
        "gates": {"minBatteryPercent": 40, "flightStates": ["disarmed"]},
        "failurePolicy": {"rules": [{"kind": "any", "thresholdPercent": 25, "minFinished": 1}]},
    });
    if let (Some(spec), Some(patch)) = (spec.as_object_mut(), patch.as_object()) {
        for (k, v) in patch {
            spec.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "edge.drone.io/v1",
        "kind": "FirmwareRollout",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
    .to_string()
}

#[test]
fn the_local_store_refuses_what_the_controller_would_trip_over() {
    let fleet = Fleet::start(FleetOptions {
        drones: 0,
        ..FleetOptions::default()
    })
    .unwrap();
    fleet.hub.apply(&rollout("valid", &json!({}))).unwrap();
    for (i, case) in cases().iter().enumerate() {
        let name = format!("bad-{i}");
        let err = match fleet.hub.apply(&rollout(&name, &case.spec)) {
            Ok(()) => panic!("{}: the local store accepted {}", case.why, case.spec),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&case.names),
            "{}: the refusal does not name {:?}: {err}",
            case.why,
            case.names
        );
        assert!(fleet.hub.rollout(&name).is_none(), "{}: stored anyway", case.why);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_schema_refuses_what_the_controller_would_trip_over() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(api) = ApiServer::start().await? else {
        return Ok(());
    };
    let admin = api.admin_client().await?;
    let crd = std::fs::read_to_string(workspace_root().join("hub/deploy/crd.yaml"))?;
    api.apply_yaml(&admin, &crd, None).await?;
    api.apply_yaml(&admin, &rollout("valid", &json!({})), None)
        .await?;
    for (i, case) in cases().iter().enumerate() {
        let yaml = rollout(&format!("bad-{i}"), &case.spec);
        let err = match api.apply_yaml(&admin, &yaml, None).await {
            Ok(_) => panic!("{}: the API server accepted {}", case.why, case.spec),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&case.names) && err.contains("Invalid"),
            "{}: the refusal does not name {:?}: {err}",
            case.why,
            case.names
        );
    }
    Ok(())
}
