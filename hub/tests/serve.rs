//! `serve` end to end on loopback: mTLS identity checks, the local store's Kubernetes-shaped
//! API and event log, and the binary as another process would start it.

mod common;

use common::{config, heartbeat, with_phase};
use flightnode_hub::cmd::serve::{Bound, ServeOptions, StoreKind};
use flightnode_proto::v1::hub_service_client::HubServiceClient;
use flightnode_tests::pki::Pki;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn start(opts: ServeOptions) -> Bound {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = flightnode_hub::cmd::serve::serve(
            opts,
            move |b| {
                let _ = tx.send(b);
            },
            std::future::pending(),
        )
        .await;
        if let Err(e) = r {
            eprintln!("serve: {e}");
        }
    });
    rx.await.expect("hub started")
}

fn options(data_dir: &Path) -> ServeOptions {
    ServeOptions {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        store: StoreKind::Local,
        data_dir: data_dir.to_owned(),
        namespace: Some("default".into()),
        tls_cert: None,
        tls_key: None,
        client_ca: None,
        insecure: true,
        hub: config(100.0, 100),
        write_timeout: Duration::from_secs(5),
        controllers: None,
        ui_tokens: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_a_drone_speaks_only_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), "flightnode test CA").unwrap();
    let client = pki.client("drone-1").unwrap();
    let mut opts = options(&dir.path().join("data"));
    opts.insecure = false;
    opts.tls_cert = Some(pki.server_cert.clone());
    opts.tls_key = Some(pki.server_key.clone());
    opts.client_ca = Some(pki.ca.clone());
    let bound = start(opts).await;
    let url = format!("https://localhost:{}", bound.grpc.port());

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("localhost");
    let with_identity = tls.clone().identity(Identity::from_pem(
        std::fs::read(&client.cert).unwrap(),
        std::fs::read(&client.key).unwrap(),
    ));
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(with_identity)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HubServiceClient::new(channel);

    client
        .heartbeat(heartbeat("drone-1", "1.0.0"))
        .await
        .expect("own heartbeat accepted");
    let err = client.heartbeat(heartbeat("drone-2", "1.0.0")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = client.heartbeat(heartbeat("a/b", "1.0.0")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let mut flood = heartbeat("drone-1", "1.0.0");
    flood.agent_version = "x".repeat(70 * 1024);
    let err = client.heartbeat(flood).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "message cap: {err}");

    // No client certificate: refused (in the handshake, or by the service).
    let refused = async {
        let channel = Channel::from_shared(url.clone())
            .ok()?
            .tls_config(tls)
            .ok()?
            .connect()
            .await
            .ok()?;
        HubServiceClient::new(channel)
            .heartbeat(heartbeat("drone-1", "1.0.0"))
            .await
            .ok()
    }
    .await;
    assert!(
        refused.is_none(),
        "a heartbeat without a client certificate was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_serves_objects_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(options(dir.path())).await;
    let mut client = HubServiceClient::connect(format!("http://{}", bound.grpc))
        .await
        .unwrap();
    let hb = with_phase(heartbeat("drone-7", "1.0.0"), "downloading", 1);
    assert_eq!(
        client.heartbeat(hb.clone()).await.unwrap().into_inner().acked_seq,
        1
    );
    let hb = with_phase(with_phase(hb, "staged", 2), "switching", 3);
    assert_eq!(client.heartbeat(hb).await.unwrap().into_inner().acked_seq, 3);

    let http = format!("http://{}", bound.http);
    let kube = flightnode_hub::store::kube::client_for_url(&http).unwrap();
    let nodes = flightnode_hub::cmd::get::list(&kube, None).await.unwrap();
    assert_eq!(nodes.len(), 1);
    let status = nodes[0].status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Switching"));
    assert_eq!(nodes[0].spec.hardware_id, "hw-x1");

    let req = |method: &str, path: &str, body: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(body.as_bytes().to_vec())
            .unwrap()
    };
    let path = "/apis/edge.drone.io/v1/namespaces/default/flightnodes/drone-7";
    let events: serde_json::Value = serde_json::from_str(
        &kube
            .request_text(req("GET", &format!("{path}/events"), ""))
            .await
            .unwrap(),
    )
    .unwrap();
    let phases: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Downloading", "Staged", "Switching"]);

    // Desired version via a merge patch: FirmwareSynced follows.
    let patched = kube
        .request_text(req("PATCH", path, r#"{"spec":{"firmwareVersion":"2.0.0"}}"#))
        .await
        .unwrap();
    assert!(patched.contains("2.0.0"));
    let mut synced = String::new();
    for _ in 0..100 {
        let node: serde_json::Value =
            serde_json::from_str(&kube.request_text(req("GET", path, "")).await.unwrap()).unwrap();
        synced = node["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "FirmwareSynced"))
            .map(|c| {
                format!(
                    "{}/{}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default();
        if synced == "False/Pending" {
            assert_eq!(node["status"]["observedGeneration"], 2);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(synced, "False/Pending");

    let metrics = kube.request_text(req("GET", "/metrics", "")).await.unwrap();
    assert!(
        metrics.contains("flightnode_hub_status_write_duration_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flightnode_hub_heartbeats_received_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert_eq!(kube.request_text(req("GET", "/readyz", "")).await.unwrap(), "ok");
}

#[test]
fn the_binary_serves_and_get_prints_a_table() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_flightnode-hub");
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--insecure",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
            .expect("listening line")
    };
    let (grpc, http) = (addr("grpc="), addr("http="));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = HubServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.heartbeat(heartbeat("drone-9", "1.4.0")).await.unwrap();
    });
    // An idle heartbeat is answered before its status write lands: poll for the row.
    let get = || {
        Command::new(bin)
            .args(["get", "--server", &format!("http://{http}")])
            .output()
            .unwrap()
    };
    let mut out = None;
    flightnode_tests::fleet::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let o = out.insert(get());
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("drone-9")
    });
    let out = out.expect("wait_until asks at least once");
    let _ = child.kill();
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut s);
        s
    };
    let _ = child.wait();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.starts_with("NAME"), "{table}");
    let row = table.lines().find(|l| l.starts_with("drone-9")).expect(&table);
    assert!(
        row.contains("True") && row.contains("Idle") && row.contains("1.4.0"),
        "{row}"
    );
    assert!(stderr.contains("INSECURE"), "--insecure says so loudly: {stderr}");
}
