//! The MQTT link (`mqtt::run`) against a real mosquitto (flightnode_tests::mosquitto).

use flightnode_agent::config::MqttConfig;
use flightnode_agent::mqtt::{self, Inbound, MqttError};
use flightnode_agent::proto::mqtt::{Command, Running, StatusMessage, UpgradeCommand};
use flightnode_agent::proto::{Phase, Slot, UpgradeResult};
use flightnode_tests::mosquitto::{ClientCert, Mosquitto};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, block_in_place};
use tokio_util::sync::CancellationToken;

/// Generous bound for "eventually".
const EVENTUALLY: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "flightnode_agent=debug".into()),
        )
        .try_init();
}

fn config(url: String) -> MqttConfig {
    MqttConfig {
        url,
        ca: None,
        cert: None,
        key: None,
        username: None,
        password: None,
        keep_alive: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
    }
}

fn tls_config(broker: &Mosquitto, client: Option<&ClientCert>) -> MqttConfig {
    let mut c = config(broker.url());
    c.ca = broker.ca();
    c.cert = client.map(|c| c.cert.clone());
    c.key = client.map(|c| c.key.clone());
    c
}

struct Link {
    inbound: mpsc::Receiver<Inbound>,
    outbound: mpsc::Sender<StatusMessage>,
    connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), MqttError>>,
}

impl Link {
    fn start(cfg: MqttConfig, device_id: &str) -> Link {
        let (in_tx, inbound) = mpsc::channel(16);
        let (outbound, out_rx) = mpsc::channel(16);
        let (conn_tx, connected) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mqtt::run(
            cfg,
            device_id.to_owned(),
            in_tx,
            out_rx,
            conn_tx,
            shutdown.clone(),
        ));
        Link {
            inbound,
            outbound,
            connected,
            shutdown,
            task,
        }
    }

    /// Waits until `connected` is `want`; false on timeout.
    async fn wait_connected(&mut self, want: bool, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.connected.wait_for(|c| *c == want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn next(&mut self) -> Inbound {
        tokio::time::timeout(EVENTUALLY, self.inbound.recv())
            .await
            .expect("nothing arrived on inbound within 20 s")
            .expect("inbound closed")
    }

    async fn nothing_within(&mut self, d: Duration) -> Option<Inbound> {
        tokio::time::timeout(d, self.inbound.recv()).await.ok().flatten()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let res = tokio::time::timeout(EVENTUALLY, self.task)
            .await
            .expect("link did not stop within 20 s")
            .expect("link task panicked");
        assert!(res.is_ok(), "{res:?}");
    }
}

fn status(device: &str, seq: u64, result: Option<UpgradeResult>) -> StatusMessage {
    StatusMessage {
        device_id: device.into(),
        seq,
        timestamp: 1_700_000_000_000 + seq,
        upgrade_id: Some("up-1".into()),
        phase: if result.is_some() {
            Phase::Idle
        } else {
            Phase::Downloading
        },
        wait_reason: None,
        progress: None,
        result,
        error: None,
        running: Running {
            version: "1.0.0".into(),
            slot: Slot::A,
        },
    }
}

fn upgrade(id: &str, url: &str) -> Command {
    Command::Upgrade(UpgradeCommand {
        upgrade_id: id.into(),
        url: url.into(),
        version: None,
        allow_downgrade: false,
    })
}

fn expect_command(got: Inbound) -> Command {
    match got {
        Inbound::Command(c) => c.command,
        other @ Inbound::Malformed { .. } => panic!("expected a command, got {other:?}"),
    }
}

fn expect_malformed(got: Inbound, what: &str) -> String {
    match got {
        Inbound::Malformed { reason, .. } => reason,
        other @ Inbound::Command(_) => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

/// Reads the retained status as `hub`/anonymous; None if there is none within `timeout`.
fn retained_status(broker: &Mosquitto, device: &str, timeout: Duration) -> Option<StatusMessage> {
    let topic = format!("firmware/{device}/status");
    let raw = block_in_place(|| broker.subscribe_once(&topic, timeout)).expect("mosquitto_sub");
    raw.map(|r| serde_json::from_slice(&r).expect("status JSON"))
}

/// Polls until the retained status has `seq`.
fn wait_retained_seq(broker: &Mosquitto, device: &str, seq: u64) -> StatusMessage {
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        let got = retained_status(broker, device, Duration::from_secs(2));
        if let Some(s) = got.as_ref().filter(|s| s.seq == seq) {
            return s.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retained status never reached seq {seq}; last {got:?}\n{}",
            broker.log()
        );
    }
}

fn publish(broker: &Mosquitto, topic: &str, payload: &[u8]) {
    block_in_place(|| broker.publish(topic, payload, false)).expect("mosquitto_pub");
}

fn connections_of(broker: &Mosquitto, device: &str) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {device} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_arrive_and_garbage_is_malformed_without_breaking_the_link() {
    init_tracing();
    let broker = Mosquitto::start().expect("mosquitto");
    let dev = "drone-cmd";
    let topic = format!("firmware/{dev}/upgrade");
    let mut link = Link::start(config(broker.url()), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());

    // A bare URL, the form existing operators publish.
    publish(&broker, &topic, b"https://fw.example/fw-1.4.0.fnb\n");
    let cmd = expect_command(link.next().await);
    match &cmd {
        Command::Upgrade(u) => {
            assert_eq!(u.url, "https://fw.example/fw-1.4.0.fnb");
            assert!(u.upgrade_id.starts_with("u-"));
        }
        other @ Command::Cancel { .. } => panic!("{other:?}"),
    }

    // JSON.
    let json = upgrade("up-7", "https://fw.example/fw-1.5.0.fnb");
    publish(&broker, &topic, json.to_json(Some(dev)).as_bytes());
    assert_eq!(expect_command(link.next().await), json);

    // Garbage that reaches the parser.
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("non-UTF-8", b"\xff\xfe\xfd".to_vec()),
        ("over the command cap", vec![b'a'; 100 * 1024]),
        ("deeply nested JSON", deep.into_bytes()),
        (
            "wrong types",
            br#"{"type":"upgrade","upgrade_id":7,"url":["x"]}"#.to_vec(),
        ),
        (
            "other device",
            upgrade("up-8", "https://fw.example/x.fnb")
                .to_json(Some("drone-other"))
                .into_bytes(),
        ),
        ("unknown type", br#"{"type":"reboot"}"#.to_vec()),
        ("not a URL", b"ftp://fw.example/x.fnb".to_vec()),
    ];
    for (what, payload) in &garbage {
        publish(&broker, &topic, payload);
        let reason = expect_malformed(link.next().await, what);
        if *what == "over the command cap" {
            assert!(reason.contains("cap"), "{reason}");
        }
        if *what == "other device" {
            assert!(reason.contains("drone-other"), "{reason}");
        }
    }

    // 1 MiB: above the MQTT packet limit. Reported as malformed, and no reconnect loop.
    publish(&broker, &topic, &vec![b'x'; 1024 * 1024]);
    let reason = expect_malformed(link.next().await, "1 MiB");
    assert!(reason.contains("limit"), "{reason}");
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());

    // The link still works: a valid command after all that garbage arrives.
    let after = upgrade("up-9", "https://fw.example/fw-1.6.0.fnb");
    publish(&broker, &topic, after.to_json(None).as_bytes());
    assert_eq!(expect_command(link.next().await), after);

    // And it stays connected: no redelivery of the 1 MiB message, no reconnects.
    let before = connections_of(&broker, dev);
    assert!(before >= 1, "{}", broker.log());
    let extra = link.nothing_within(Duration::from_secs(4)).await;
    assert_eq!(extra, None, "unexpected inbound after the garbage");
    assert_eq!(connections_of(&broker, dev), before, "{}", broker.log());
    assert!(*link.connected.borrow());

    // Status still goes out.
    link.outbound.send(status(dev, 1, None)).await.unwrap();
    wait_retained_seq(&broker, dev, 1);

    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_is_retained_and_survives_a_broker_restart_that_lost_the_session() {
    init_tracing();
    let mut broker = Mosquitto::start().expect("mosquitto");
    let dev = "drone-status";
    let topic = format!("firmware/{dev}/upgrade");
    let mut link = Link::start(config(broker.url()), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());

    // Retained: a subscriber that comes later still gets it.
    link.outbound.send(status(dev, 1, None)).await.unwrap();
    let got = wait_retained_seq(&broker, dev, 1);
    assert_eq!(got, status(dev, 1, None));

    // Broker goes away and comes back without its persistence: the session is gone.
    block_in_place(|| broker.stop()).unwrap();
    assert!(link.wait_connected(false, EVENTUALLY).await);
    block_in_place(|| broker.wipe_persistence()).unwrap();

    // Reports made during the outage, the final one last.
    for seq in 2..6 {
        link.outbound.send(status(dev, seq, None)).await.unwrap();
    }
    let final_report = status(dev, 6, Some(UpgradeResult::Committed));
    link.outbound.send(final_report.clone()).await.unwrap();
    // Give the link time to retry a few times against the closed port.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!*link.connected.borrow());

    block_in_place(|| broker.start_again()).unwrap();
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());
    assert_eq!(wait_retained_seq(&broker, dev, 6), final_report);

    // It subscribed again: a command reaches it.
    let cmd = upgrade("up-after-restart", "https://fw.example/b.fnb");
    publish(&broker, &topic, cmd.to_json(None).as_bytes());
    assert_eq!(expect_command(link.next().await), cmd);

    // A plain restart (persistence kept) also goes false -> true, and commands still arrive.
    let mut conn = link.connected.clone();
    block_in_place(|| broker.restart()).unwrap();
    // `connected` may already be back to true; it must have been false in between.
    let saw_false = tokio::time::timeout(EVENTUALLY, async {
        loop {
            if !*conn.borrow_and_update() {
                return true;
            }
            if conn.changed().await.is_err() {
                return false;
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(saw_false, "connected never went false across a broker restart");
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());
    let cmd = upgrade("up-after-restart-2", "https://fw.example/c.fnb");
    publish(&broker, &topic, cmd.to_json(None).as_bytes());
    assert_eq!(expect_command(link.next().await), cmd);

    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_in_flight_when_the_broker_dies_is_sent_again() {
    init_tracing();
    let mut broker = Mosquitto::start().expect("mosquitto");
    let dev = "drone-inflight";
    let mut link = Link::start(config(broker.url()), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());

    // The broker hangs: the report goes out on the socket but is never acknowledged...
    block_in_place(|| broker.freeze()).unwrap();
    let final_report = status(dev, 7, Some(UpgradeResult::RolledBack));
    link.outbound.send(final_report.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...then dies without saving anything, and comes back knowing no session.
    block_in_place(|| broker.kill()).unwrap();
    block_in_place(|| broker.wipe_persistence()).unwrap();
    assert!(link.wait_connected(false, EVENTUALLY).await);
    block_in_place(|| broker.start_again()).unwrap();
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());
    assert_eq!(wait_retained_seq(&broker, dev, 7), final_report);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_sent_while_the_agent_was_offline_arrives_when_it_comes_back() {
    init_tracing();
    let mut broker = Mosquitto::start().expect("mosquitto");
    let dev = "drone-offline";
    let topic = format!("firmware/{dev}/upgrade");

    // First run: the broker learns the persistent session and its subscription.
    let mut link = Link::start(config(broker.url()), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());
    link.stop().await;

    // Offline: a QoS 1 command is queued for the session.
    let cmd = upgrade("up-offline", "https://fw.example/offline.fnb");
    publish(&broker, &topic, cmd.to_json(Some(dev)).as_bytes());

    let mut link = Link::start(config(broker.url()), dev);
    assert_eq!(expect_command(link.next().await), cmd);
    assert!(link.wait_connected(true, EVENTUALLY).await);
    link.stop().await;

    // Offline again, and the broker restarts meanwhile (it keeps sessions on disk).
    let cmd = upgrade("up-offline-2", "https://fw.example/offline-2.fnb");
    publish(&broker, &topic, cmd.to_json(None).as_bytes());
    block_in_place(|| broker.restart()).unwrap();
    let mut link = Link::start(config(broker.url()), dev);
    assert_eq!(expect_command(link.next().await), cmd);
    // Delivered once: nothing else shows up.
    assert_eq!(link.nothing_within(Duration::from_secs(2)).await, None);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_with_the_example_acl() {
    init_tracing();
    let broker = Mosquitto::start_tls().expect("mosquitto with TLS");
    let dev = "drone-tls";
    let cert = broker.client_cert(dev).unwrap();
    let mut link = Link::start(tls_config(&broker, Some(&cert)), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());

    // The hub (CN = hub) can command the drone, and read its status.
    let cmd = upgrade("up-tls", "https://fw.example/tls.fnb");
    publish(
        &broker,
        &format!("firmware/{dev}/upgrade"),
        cmd.to_json(None).as_bytes(),
    );
    assert_eq!(expect_command(link.next().await), cmd);
    link.outbound.send(status(dev, 3, None)).await.unwrap();
    assert_eq!(wait_retained_seq(&broker, dev, 3), status(dev, 3, None));

    // Another device's upgrade topic holds a retained command its owner receives...
    let other = "drone-other";
    let other_topic = format!("firmware/{other}/upgrade");
    block_in_place(|| broker.publish(&other_topic, b"https://fw.example/other.fnb", true)).unwrap();
    // (The example ACL lets the hub write upgrade topics, not read them: the owner checks.)
    let other_cert = broker.client_cert(other).unwrap();
    let owner_sees =
        block_in_place(|| broker.subscribe_once_as(Some(&other_cert), &other_topic, EVENTUALLY)).unwrap();
    assert_eq!(
        owner_sees.as_deref(),
        Some(&b"https://fw.example/other.fnb"[..]),
        "the owner must receive its retained command\n{}",
        broker.log()
    );
    // ...that this drone cannot read, neither through its link nor by subscribing itself.
    assert_eq!(link.nothing_within(Duration::from_secs(2)).await, None);
    let stolen =
        block_in_place(|| broker.subscribe_once_as(Some(&cert), &other_topic, Duration::from_secs(3)))
            .unwrap();
    assert_eq!(stolen, None, "the ACL let {dev} read {other_topic}");

    // Nor can it write another device's status.
    block_in_place(|| {
        broker.publish_as(
            Some(&cert),
            &format!("firmware/{other}/status"),
            b"{\"forged\":true}",
            true,
        )
    })
    .unwrap();
    assert_eq!(
        retained_status_raw(&broker, other, Duration::from_secs(3)),
        None,
        "the ACL let {dev} write firmware/{other}/status"
    );
    assert!(broker.log().contains("Denied PUBLISH"), "{}", broker.log());

    // The link is unaffected.
    let cmd = upgrade("up-tls-2", "https://fw.example/tls-2.fnb");
    publish(
        &broker,
        &format!("firmware/{dev}/upgrade"),
        cmd.to_json(None).as_bytes(),
    );
    assert_eq!(expect_command(link.next().await), cmd);
    link.stop().await;
}

fn retained_status_raw(broker: &Mosquitto, device: &str, timeout: Duration) -> Option<Vec<u8>> {
    block_in_place(|| broker.subscribe_once(&format!("firmware/{device}/status"), timeout))
        .expect("mosquitto_sub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_the_broker_does_not_trust_never_connect() {
    init_tracing();
    let broker = Mosquitto::start_tls().expect("mosquitto with TLS");
    let dev = "drone-foreign";
    let pki = broker.pki().unwrap();

    // A certificate from another CA.
    let foreign = pki.foreign_client(dev).unwrap();
    let mut link = Link::start(tls_config(&broker, Some(&foreign)), dev);
    assert!(
        !link.wait_connected(true, Duration::from_secs(5)).await,
        "a foreign certificate was accepted\n{}",
        broker.log()
    );
    // mosquitto logs an attempt as "New connection from" or, when the TLS handshake fails before
    // it got that far (seen under load), only as "Client connection from ... failed".
    let log = broker.log();
    let attempts = log.matches("New connection from").count()
        + log
            .lines()
            .filter(|l| l.contains("Client connection from") && l.contains("failed"))
            .count();
    assert!(attempts >= 1, "{}", broker.log());
    assert!(attempts < 40, "{attempts} attempts in 5 s: no backoff?");
    link.stop().await;

    // No client certificate at all.
    let mut link = Link::start(tls_config(&broker, None), dev);
    assert!(!link.wait_connected(true, Duration::from_secs(3)).await);
    link.stop().await;

    // The agent does not trust the broker (CA of another fleet).
    let own = broker.client_cert(dev).unwrap();
    let mut cfg = tls_config(&broker, Some(&own));
    let other_ca =
        flightnode_tests::mosquitto::Pki::generate(&broker.dir().join("other-fleet"), "other fleet").unwrap();
    cfg.ca = Some(other_ca.ca.clone());
    let mut link = Link::start(cfg, dev);
    assert!(!link.wait_connected(true, Duration::from_secs(3)).await);
    link.stop().await;

    // Control: the same device with its own certificate gets in.
    let mut link = Link::start(tls_config(&broker, Some(&own)), dev);
    assert!(link.wait_connected(true, EVENTUALLY).await, "{}", broker.log());
    link.stop().await;
}

#[tokio::test]
async fn unusable_settings_are_refused_before_connecting() {
    let (in_tx, _in_rx) = mpsc::channel(1);
    let (_out_tx, out_rx) = mpsc::channel(1);
    let (conn_tx, _conn_rx) = watch::channel(false);
    let err = mqtt::run(
        config("http://broker:1883".into()),
        "d1".into(),
        in_tx,
        out_rx,
        conn_tx,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("mqtt://"), "{err}");

    let (in_tx, _in_rx) = mpsc::channel(1);
    let (_out_tx, out_rx) = mpsc::channel(1);
    let (conn_tx, _conn_rx) = watch::channel(false);
    let err = mqtt::run(
        config("mqtts://broker".into()),
        "d1".into(),
        in_tx,
        out_rx,
        conn_tx,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("mqtt.ca"), "{err}");
}
