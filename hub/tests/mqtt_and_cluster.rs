//! `flightnode-hub upgrade`/`cancel` against a real mosquitto, and the opt-in real-cluster test
//! (set `FLIGHTNODE_TEST_KUBECONFIG`).

mod common;

use flightnode_tests::mosquitto::{Mosquitto, mosquitto_binary};
use std::process::Command;
use std::time::Duration;

#[test]
fn upgrade_and_cancel_are_published_on_the_device_topic() {
    // Returns once mosquitto listens and `mosquitto_sub` holds its subscription: the commands
    // are not retained, so a subscriber that is not there yet would miss them.
    let broker = match Mosquitto::start() {
        Ok(b) => b,
        Err(e) if mosquitto_binary().is_err() => {
            eprintln!("SKIP: mosquitto is not installed ({e:#})");
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    let sub = broker.subscriber("firmware/drone-1/upgrade").unwrap();
    let bin = env!("CARGO_BIN_EXE_flightnode-hub");
    let url = broker.url();
    let up = Command::new(bin)
        .args([
            "upgrade",
            "--device",
            "drone-1",
            "--url",
            "http://fw.local/fw-2.0.0.fnb",
            "--mqtt-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let upgrade_id = String::from_utf8_lossy(&up.stdout).trim().to_owned();
    let cancel = Command::new(bin)
        .args([
            "cancel",
            "--device",
            "drone-1",
            "--upgrade-id",
            &upgrade_id,
            "--mqtt-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    flightnode_tests::fleet::wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        sub.output().lines().count() >= 2
    });
    // `mosquitto_sub -v`: "topic payload" per line.
    let output = sub.output();
    let lines: Vec<&str> = output
        .lines()
        .map(|l| l.strip_prefix("firmware/drone-1/upgrade ").unwrap_or(l))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let upgrade = flightnode_proto::mqtt::parse_command(lines[0].as_bytes(), "drone-1").unwrap();
    assert_eq!(upgrade.upgrade_id(), upgrade_id);
    assert!(
        matches!(upgrade, flightnode_proto::mqtt::Command::Upgrade(ref u) if u.url == "http://fw.local/fw-2.0.0.fnb")
    );
    let cancel = flightnode_proto::mqtt::parse_command(lines[1].as_bytes(), "drone-1").unwrap();
    assert_eq!(cancel, flightnode_proto::mqtt::Command::Cancel { upgrade_id });
}

/// Installs the CRD, creates a FlightNode, heartbeats, reads the status back with the kube client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_when_configured() {
    use flightnode_hub::api::flightnode::FlightNode;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

    let Ok(kubeconfig) = std::env::var("FLIGHTNODE_TEST_KUBECONFIG") else {
        eprintln!("SKIP: FLIGHTNODE_TEST_KUBECONFIG is not set");
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "flightnodes.edge.drone.io",
        &PatchParams::apply("flightnode-test").force(),
        &Patch::Apply(FlightNode::crd()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = client.default_namespace().to_owned();
    let api: Api<FlightNode> = Api::namespaced(client.clone(), &ns);
    let name = format!("fn-test-{}", std::process::id());
    api.create(
        &PostParams::default(),
        &flightnode_hub::api::flightnode::new_flightnode(&name, &ns, "hw-x1"),
    )
    .await
    .unwrap();

    let sink = std::sync::Arc::new(flightnode_hub::store::kube::KubeSink::new(
        client.clone(),
        &ns,
        Duration::from_secs(10),
    ));
    let hub = flightnode_hub::heartbeat::hub::Hub::new(
        common::config(5.0, 5),
        sink,
        None,
        std::sync::Arc::new(flightnode_hub::heartbeat::session::SpecCache::default()),
    );
    hub.start();
    hub.heartbeat(&common::heartbeat(&name, "1.0.0")).await;
    let mut phase = None;
    for _ in 0..50 {
        let node = api.get_status(&name).await.unwrap();
        phase = node.status.and_then(|s| s.phase);
        if phase.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = api.delete(&name, &DeleteParams::default()).await;
    assert_eq!(phase.as_deref(), Some("Idle"));
}
