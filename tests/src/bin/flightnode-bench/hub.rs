//! `hub`: N simulated drones over gRPC against the real hub, vs a no-op `HubService`.

use anyhow::{Context, Result, bail};
use flightnode_tests::agent::binary;
use std::process::Command;
use std::time::Instant;

/// One row of the hub table.
struct HubRow {
    target: String,
    drones: usize,
    paced: flightnode_tests::load::Outcome,
    flood: flightnode_tests::load::Outcome,
    kib_per_drone: Option<f64>,
    writes_per_s: Option<f64>,
    max_writes_1s: Option<usize>,
    phase_p50_ms: Option<f64>,
    phase_p99_ms: Option<f64>,
    phase_missing: usize,
    phase_exact: usize,
}

const QPS: f64 = 20.0;
const BURST: u32 = 40;

/// What one `hub` run does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HubPlan {
    pub(crate) seconds: u64,
    pub(crate) interval: u64,
    pub(crate) wave: flightnode_tests::load::Wave,
    pub(crate) channels: usize,
}

impl HubPlan {
    /// The paced fleet with its upgrade wave.
    async fn paced(
        &self,
        clients: &[flightnode_proto::v1::hub_service_client::HubServiceClient<tonic::transport::Channel>],
        n: usize,
    ) -> flightnode_tests::load::Outcome {
        let secs = std::time::Duration::from_secs;
        flightnode_tests::load::paced(clients, n, secs(self.interval), secs(self.seconds), self.wave).await
    }

    /// The closed-loop flood.
    async fn flood(
        &self,
        clients: &[flightnode_proto::v1::hub_service_client::HubServiceClient<tonic::transport::Channel>],
        n: usize,
    ) -> flightnode_tests::load::Outcome {
        let secs = std::time::Duration::from_secs(FLOOD_SECS);
        flightnode_tests::load::flood(clients, n, FLOOD_CONCURRENCY, secs).await
    }
}
const FLOOD_CONCURRENCY: usize = 512;
const FLOOD_SECS: u64 = 5;

pub(crate) fn hub_bench(drones: &[usize], plan: HubPlan) -> Result<()> {
    let HubPlan {
        seconds,
        interval,
        wave,
        channels,
    } = plan;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &n in drones {
        rows.push(rt.block_on(noop_run(n, plan))?);
        rows.push(rt.block_on(hub_run(n, plan))?);
    }
    println!(
        "hub under N simulated drones: heartbeat every {interval} s for {seconds} s; a wave of {} drones walks 5 upgrade \
         phases {} ms apart, starts spread over {} s from {} s in ({:.1} phase changes/s); \
         flood = {FLOOD_CONCURRENCY} concurrent callers for {FLOOD_SECS} s; {channels} HTTP/2 connections; \
         --api-qps {QPS} --api-burst {BURST}",
        wave.drones,
        wave.step.as_millis(),
        wave.spread.as_secs(),
        wave.start_at.as_secs(),
        wave.changes_per_sec()
    );
    println!(
        "{:<34} {:>7} {:>9} {:>8} {:>8} {:>10} {:>8} {:>8} {:>9} {:>9} {:>11}",
        "target",
        "drones",
        "paced/s",
        "p50 ms",
        "p99 ms",
        "flood/s",
        "p50 ms",
        "p99 ms",
        "KiB/drone",
        "writes/s",
        "max 1s win"
    );
    for r in &rows {
        let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        println!(
            "{:<34} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>10.0} {:>8.2} {:>8.2} {:>9} {:>9} {:>11}",
            r.target,
            r.drones,
            r.paced.rate(),
            r.paced.percentile_ms(50.0),
            r.paced.percentile_ms(99.0),
            r.flood.rate(),
            r.flood.percentile_ms(50.0),
            r.flood.percentile_ms(99.0),
            opt(r.kib_per_drone, 2),
            opt(r.writes_per_s, 1),
            r.max_writes_1s
                .map_or("-".to_owned(), |m| format!("{m} / {}", f64::from(BURST) + QPS)),
        );
    }
    for r in rows.iter().filter(|r| r.phase_p99_ms.is_some()) {
        println!(
            "{} drones: phase change -> a status write showing it (or a later phase): p50 {:.0} ms, p99 {:.0} ms, \
             {} never shown; {} of {} phases written as such (the others superseded before a token let them out); \
             heartbeat errors {} paced, {} flood",
            r.drones,
            r.phase_p50_ms.unwrap_or(0.0),
            r.phase_p99_ms.unwrap_or(0.0),
            r.phase_missing,
            r.phase_exact,
            r.paced.phase_sends.len(),
            r.paced.errors,
            r.flood.errors
        );
    }
    Ok(())
}

async fn noop_run(n: usize, plan: HubPlan) -> Result<HubRow> {
    use flightnode_tests::load;
    let (addr, _noop) = load::start_noop().await?;
    let clients = load::pool(addr, plan.channels).await?;
    eprintln!("no-op hub, {n} drones: paced {} s", plan.seconds);
    let paced = plan.paced(&clients, n).await;
    let flood = plan.flood(&clients, n).await;
    Ok(HubRow {
        target: "baseline: no-op tonic HubService".into(),
        drones: n,
        paced,
        flood,
        kib_per_drone: None,
        writes_per_s: None,
        max_writes_1s: None,
        phase_p50_ms: None,
        phase_p99_ms: None,
        phase_missing: 0,
        phase_exact: 0,
    })
}

async fn hub_run(n: usize, plan: HubPlan) -> Result<HubRow> {
    use flightnode_tests::fake_kube::FakeKube;
    use flightnode_tests::fleet::{Proc, free_port, rss_kib};
    use flightnode_tests::load;
    use std::time::Duration;
    let HubPlan {
        seconds,
        interval,
        channels,
        ..
    } = plan;
    let tmp = tempfile::tempdir()?;
    let fake = FakeKube::start().await?;
    for i in 0..n {
        fake.insert("fleet", &load::drone_id(i), "cc-sim-v1");
    }
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: fleet\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            fake.url()
        ),
    )?;
    let (grpc_port, http_port) = (free_port()?, free_port()?);
    let mut cmd = Command::new(binary("flightnode-hub")?);
    cmd.args([
        "serve",
        "--insecure",
        "--store",
        "kube",
        "--namespace",
        "fleet",
        "--grpc-addr",
        &format!("127.0.0.1:{grpc_port}"),
        "--http-addr",
        &format!("127.0.0.1:{http_port}"),
        "--api-qps",
        &QPS.to_string(),
        "--api-burst",
        &BURST.to_string(),
        "--heartbeat-interval",
        &format!("{interval}s"),
        "--ack-wait",
        "100ms",
    ])
    .env("KUBECONFIG", &kubeconfig)
    .env("RUST_LOG", "warn");
    let mut hub = Proc::spawn(cmd, &tmp.path().join("hub.log"))?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse()?;
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("hub did not listen: {}", hub.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = hub.pid().context("hub gone")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, _) = rss_kib(pid).context("hub gone")?;
    let clients = load::pool(addr, channels).await?;
    eprintln!("flightnode-hub (kube sink on the fake API), {n} drones: paced {seconds} s");
    let start = Instant::now();
    let paced = plan.paced(&clients, n).await;
    let paced_end = Instant::now();
    let (rss1, _) = rss_kib(pid).context("hub gone")?;
    // Let queued transition writes drain before judging phase delays (bounded).
    let walkers: std::collections::HashSet<&str> =
        paced.phase_sends.iter().map(|(d, _, _)| d.as_str()).collect();
    let mut waited = 0;
    while waited < 30 {
        let done: std::collections::HashSet<String> = fake
            .status_writes()
            .iter()
            .filter(|w| w.body["status"]["firmware"]["committedVersion"] == "2.0.0")
            .map(|w| w.name.clone())
            .collect();
        if walkers.iter().all(|d| done.contains(*d)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += 1;
    }
    let writes = fake.status_writes();
    let ok_times: Vec<Instant> = writes
        .iter()
        .filter(|w| w.at >= start && w.at <= paced_end)
        .map(|w| w.at)
        .collect();
    let all_times: Vec<Instant> = writes.iter().map(|w| w.at).collect();
    let writes_per_s = ok_times.len() as f64 / paced_end.duration_since(start).as_secs_f64();
    let max_1s = load::max_in_window(&all_times, Duration::from_secs(1));
    // Phase change -> the first write at or after the send that shows this phase or a later one
    // of the walk (latest wins: a write may skip a phase that was already superseded).
    let walk_index = |w: &flightnode_tests::fake_kube::StatusWrite| -> Option<usize> {
        let status = &w.body["status"];
        let phase = status["phase"].as_str()?;
        if phase == "Idle" {
            // Idle before the walk is not progress; idle on the new version is its end.
            let committed = status["firmware"]["committedVersion"].as_str();
            return (committed == Some("2.0.0")).then_some(load::PHASES.len() - 1);
        }
        load::PHASES.iter().position(|p| load::status_phase(p) == phase)
    };
    let mut delays = Vec::new();
    let mut missing = 0;
    let mut exact = 0;
    let mut by_name: std::collections::HashMap<&str, Vec<(Instant, Option<usize>)>> =
        std::collections::HashMap::new();
    for w in &writes {
        by_name
            .entry(w.name.as_str())
            .or_default()
            .push((w.at, walk_index(w)));
    }
    for (name, phase, sent) in &paced.phase_sends {
        let k = load::PHASES
            .iter()
            .position(|p| load::status_phase(p) == *phase)
            .unwrap_or(0);
        let ws = by_name.get(name.as_str()).map_or(&[][..], Vec::as_slice);
        if ws.iter().any(|(at, i)| at >= sent && *i == Some(k)) {
            exact += 1;
        }
        match ws.iter().find(|(at, i)| at >= sent && i.is_some_and(|i| i >= k)) {
            Some((at, _)) => {
                let micros = at.duration_since(*sent).as_micros();
                delays.push(u64::try_from(micros).unwrap_or(u64::MAX));
            }
            None => missing += 1,
        }
    }
    delays.sort_unstable();
    eprintln!("flightnode-hub, {n} drones: flood {FLOOD_SECS} s");
    let flood = plan.flood(&clients, n).await;
    if !fake.violations().is_empty() {
        eprintln!("fake API contract violations: {:?}", &fake.violations()[..1]);
    }
    hub.stop();
    Ok(HubRow {
        target: "flightnode-hub serve --store kube".into(),
        drones: n,
        paced,
        flood,
        kib_per_drone: Some(rss1.saturating_sub(rss0) as f64 / n as f64),
        writes_per_s: Some(writes_per_s),
        max_writes_1s: Some(max_1s),
        phase_p50_ms: Some(load::percentile(&delays, 50.0) as f64 / 1000.0),
        phase_p99_ms: Some(load::percentile(&delays, 99.0) as f64 / 1000.0),
        phase_missing: missing,
        phase_exact: exact,
    })
}
