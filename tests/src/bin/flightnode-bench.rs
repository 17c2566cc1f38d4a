//! `flightnode-bench`: measurements that print tables, each against a baseline measured in the
//! same run. Build with `cargo build --release --workspace` first; see README "Measurements".
//!
//! - `install [--size-mib 256] [--runs 3]`: bundle download + verify + write into a file slot over
//!   loopback HTTP, vs `curl | tee >(sha256sum) > slot` and a minimal Rust GET + sha256 + write;
//!   plus raw single-core sha256 throughput, the physical limit.
//! - `footprint [--idle-secs 60] [--size-mib 64]`: idle and peak RSS of `flightnode-agent run`
//!   connected to mosquitto and the hub, idle and during an install, next to a `mosquitto_sub`
//!   connected to the same broker; stripped binary sizes.
//! - `hub [--drones 1000,10000] [--seconds 40] [--interval 10] [--wave 50] [--wave-secs 20] [--channels 12]`:
//!   N simulated drones over gRPC against a real `flightnode-hub serve --store kube` whose API
//!   server is the fake Kubernetes API, vs the same generator against a no-op tonic
//!   `HubService` (the transport's ceiling); `--wave` drones upgrade, their starts spread over
//!   `--wave-secs` from a quarter into the run; the drones share `--channels` HTTP/2
//!   connections (one per drone measures what connections cost).

use anyhow::{Context, Result, bail};
use flightnode_tests::agent::{binary, run_ok};
use flightnode_tests::http_server::BundleServer;
use sha2::Digest;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("install") => install(flag("--size-mib", 256), flag("--runs", 3)),
        Some("footprint") => footprint(flag("--idle-secs", 60), flag("--size-mib", 64)),
        Some("hub") => {
            let drones: Vec<usize> = args
                .iter()
                .position(|a| a == "--drones")
                .and_then(|i| args.get(i + 1))
                .map_or_else(
                    || vec![1000, 10000],
                    |v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
                );
            let seconds = flag("--seconds", 40);
            let wave = flightnode_tests::load::Wave {
                drones: usize::try_from(flag("--wave", 50))?,
                start_at: std::time::Duration::from_secs(seconds / 4),
                spread: std::time::Duration::from_secs(flag("--wave-secs", 20)),
                step: std::time::Duration::from_millis(500),
            };
            let plan = HubPlan {
                seconds,
                interval: flag("--interval", 10),
                wave,
                channels: usize::try_from(flag("--channels", 12).max(1))?,
            };
            hub_bench(&drones, plan)
        }
        _ => {
            eprintln!("usage: flightnode-bench install [--size-mib N] [--runs N]");
            eprintln!("       flightnode-bench footprint [--idle-secs N] [--size-mib N]");
            eprintln!(
                "       flightnode-bench hub [--drones 1000,10000] [--seconds 40] [--interval 10] [--wave 50] [--wave-secs 20] [--channels 12]"
            );
            std::process::exit(2);
        }
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1_048_576.0 / secs.max(1e-9)
}

/// Median of the runs.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn install(size_mib: u64, runs: u64) -> Result<()> {
    let agent = binary("flightnode-agent")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let size = size_mib * 1_048_576;
    eprintln!("preparing a {size_mib} MiB image and bundle in {}", dir.display());
    run_ok(
        &agent,
        &["keygen", "--out-dir", &dir.join("keys").display().to_string()],
    )?;
    let image = dir.join("image");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
    }
    let bundle = dir.join("fw.fnb");
    run_ok(
        &agent,
        &[
            "bundle",
            "create",
            "--key",
            &dir.join("keys/release.key").display().to_string(),
            "--image",
            &image.display().to_string(),
            "--version",
            "2.0.0",
            "--compatible",
            "bench-hw",
            "--output",
            &bundle.display().to_string(),
        ],
    )?;
    let server = BundleServer::start_blocking()?;
    server.put_file("/fw.fnb", &bundle)?;
    let url = server.url("/fw.fnb");
    let bundle_len = std::fs::metadata(&bundle)?.len();

    // Raw sha256 on one core: the ceiling for any verifying installer.
    let data = std::fs::read(&image)?;
    let t = Instant::now();
    let digest = sha2::Sha256::digest(&data);
    let sha_rate = mib_s(size, t.elapsed().as_secs_f64());
    drop(data);
    std::hint::black_box(digest);

    let (mut ours, mut curl, mut minimal) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // flightnode: full verify (signature, manifest, sha256), checkpoints, fsync, switch.
        let dev = dir.join(format!("dev{run}"));
        std::fs::create_dir_all(dev.join("slots"))?;
        let config = dev.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"bench\"\nhardware = \"bench-hw\"\nstate_dir = {:?}\ntrusted_keys = [{:?}]\n[slots]\nbackend = \"file\"\na = {:?}\nb = {:?}\n",
                dev.join("state").display().to_string(),
                dir.join("keys/release.pub").display().to_string(),
                dev.join("slots/a.img").display().to_string(),
                dev.join("slots/b.img").display().to_string()
            ),
        )?;
        let t = Instant::now();
        run_ok(
            &agent,
            &["--config", &config.display().to_string(), "install", &url],
        )?;
        ours.push(mib_s(size, t.elapsed().as_secs_f64()));
        std::fs::remove_dir_all(&dev)?;

        // Baseline 1: the shell pipeline.
        let slot = dir.join("curl-slot");
        let t = Instant::now();
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "curl -s {url} | tee >(sha256sum > /dev/null) > {}",
                slot.display()
            ))
            .status();
        if let Ok(st) = st
            && st.success()
        {
            curl.push(mib_s(size, t.elapsed().as_secs_f64()));
        }
        let _ = std::fs::remove_file(&slot);

        // Baseline 2: minimal Rust: GET, sha256, write, one fsync at the end.
        let t = Instant::now();
        minimal_copy(server.addr(), "/fw.fnb", &dir.join("min-slot"), bundle_len)?;
        minimal.push(mib_s(size, t.elapsed().as_secs_f64()));
        std::fs::remove_file(dir.join("min-slot"))?;
    }
    let ours = median(ours);
    let minimal = median(minimal);
    println!("install of a {size_mib} MiB image over loopback HTTP, median of {runs} runs");
    println!("{:<48} {:>10} {:>12}", "pipeline", "MiB/s", "vs minimal");
    println!(
        "{:<48} {:>10.1} {:>12.2}",
        "flightnode-agent install (verify, fsync, switch)",
        ours,
        ours / minimal
    );
    if !curl.is_empty() {
        let c = median(curl);
        println!(
            "{:<48} {:>10.1} {:>12.2}",
            "curl | tee >(sha256sum) > slot (no fsync)",
            c,
            c / minimal
        );
        println!("ratio flightnode / curl pipeline: {:.2}", ours / c);
    }
    println!(
        "{:<48} {:>10.1} {:>12.2}",
        "minimal Rust GET + sha256 + write + fsync", minimal, 1.0
    );
    println!(
        "{:<48} {:>10.1} {:>12}",
        "raw sha256, one core (the ceiling)", sha_rate, "-"
    );
    Ok(())
}

/// The least an installer can do: one GET, hash every byte, write it, fsync once.
fn minimal_copy(addr: std::net::SocketAddr, path: &str, out: &Path, len: u64) -> Result<()> {
    let mut sock = std::net::TcpStream::connect(addr)?;
    write!(
        sock,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = std::io::BufReader::with_capacity(256 * 1024, sock);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).context("reading headers")?;
        head.push(b[0]);
    }
    let mut f = std::fs::File::create(out)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        got += n as u64;
    }
    f.sync_all()?;
    std::hint::black_box(hasher.finalize());
    if got != len {
        bail!("minimal copy got {got} of {len} bytes");
    }
    Ok(())
}

fn footprint(idle_secs: u64, size_mib: u64) -> Result<()> {
    use flightnode_tests::fleet::{Broker, Fleet, FleetOptions, rss_kib};
    let fleet = Fleet::start(FleetOptions::default())?;
    let drone = &fleet.drones[0];
    let pid = drone.pid().context("the drone is not running")?;
    let Broker::Mosquitto(broker) = &fleet.broker else {
        bail!("footprint runs against mosquitto")
    };
    let sub = broker.subscriber("firmware/#")?;
    eprintln!("idling {idle_secs} s with broker and hub connected");
    std::thread::sleep(std::time::Duration::from_secs(idle_secs));
    let (idle, _) = rss_kib(pid).context("agent gone")?;
    let sub_rss = sub.pid().and_then(rss_kib).map_or(0, |(r, _)| r);
    let (_, url) = fleet.bundle("big", "2.0.0", usize::try_from(size_mib * 1_048_576)?)?;
    broker.publish("firmware/drone-1/upgrade", url.as_bytes(), false)?;
    let t = Instant::now();
    let mut peak = 0;
    while t.elapsed() < std::time::Duration::from_mins(10) {
        if let Some((_, hwm)) = rss_kib(pid) {
            peak = hwm;
        }
        let s = drone.status()?;
        if s["last_upgrade"]["result"] == "committed" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (after, hwm) = rss_kib(pid).context("agent gone")?;
    peak = peak.max(hwm);
    println!("agent footprint (RSS), {idle_secs} s idle then a {size_mib} MiB install");
    println!("{:<52} {:>10}", "process", "RSS MiB");
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, idle (MQTT + hub connected)",
        idle as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, peak during install",
        peak as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "flightnode-agent run, after install",
        after as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "baseline: mosquitto_sub on the same broker",
        sub_rss as f64 / 1024.0
    );
    let agent = binary("flightnode-agent")?;
    println!(
        "{:<52} {:>10.1}",
        "stripped x86_64 binary size (MiB)",
        std::fs::metadata(&agent)?.len() as f64 / 1_048_576.0
    );
    let arm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/aarch64-unknown-linux-musl/release/flightnode-agent");
    match std::fs::metadata(&arm) {
        Ok(m) => println!(
            "{:<52} {:>10.1}",
            "stripped aarch64 binary size (MiB)",
            m.len() as f64 / 1_048_576.0
        ),
        Err(_) => println!("aarch64 binary: run cross/build-aarch64.sh first"),
    }
    Ok(())
}

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
struct HubPlan {
    seconds: u64,
    interval: u64,
    wave: flightnode_tests::load::Wave,
    channels: usize,
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

fn hub_bench(drones: &[usize], plan: HubPlan) -> Result<()> {
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
                delays.push(u64::try_from(at.duration_since(*sent).as_micros()).unwrap_or(u64::MAX));
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
