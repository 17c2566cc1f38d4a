//! The fleet harness: a broker, the hub, N drones (real `flightnode-agent run` processes with
//! their own state dir and file slots), a bundle server and a signing key, all on loopback.
//! Everything started here is stopped on drop, also when a test fails.

use crate::agent::{binary, run_ok};
use crate::http_server::BundleServer;
use crate::mosquitto::Mosquitto;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Hardware id of every simulated drone.
pub const HARDWARE: &str = "cc-sim-v1";

pub use crate::poll::wait_until;

/// A free loopback port.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// Which MQTT broker the fleet uses.
pub enum Broker {
    /// Debian's mosquitto (tests).
    Mosquitto(Mosquitto),
    /// The hub's embedded broker (`flightnode-hub serve --embedded-broker`: the demo).
    Embedded {
        /// Its MQTT port on loopback.
        port: u16,
    },
}

impl Broker {
    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match self {
            Broker::Mosquitto(m) => m.url(),
            Broker::Embedded { port } => format!("mqtt://127.0.0.1:{port}"),
        }
    }
}

/// A child process killed on drop, with its log in a file.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id().cast_signed(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGSTOP to `pid`, a child of this process not waited for yet: for a task that must stop a
/// process the instant it sees something (a [`Hub`] held elsewhere: [`Hub::pid`]).
pub fn pause_child(pid: u32) -> Result<()> {
    signal_child(pid, libc::SIGSTOP)
}

/// Sends `signal` to `pid`, a child of this process not waited for yet (so the pid is still its
/// own).
fn signal_child(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory effects; the caller passes its own child's pid.
    if unsafe { libc::kill(pid.cast_signed(), signal) } != 0 {
        bail!(
            "signal {signal} to pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Where `serve --store kube` writes: a kubeconfig (its user's rights are the hub's) and the
/// namespace of the FlightNodes.
#[derive(Debug, Clone)]
pub struct KubeStore {
    /// The kubeconfig the hub uses (the Role's user).
    pub kubeconfig: PathBuf,
    /// Where the FlightNodes live.
    pub namespace: String,
}

/// `flightnode-hub serve` on the local store (or, with `kube`, on a Kubernetes API server).
pub struct Hub {
    /// Where drones send heartbeats.
    pub grpc_port: u16,
    /// The local API (FlightNodes, FirmwareRollouts) and `/metrics`.
    pub http_port: u16,
    /// `--data-dir`: the local store.
    pub data_dir: PathBuf,
    /// Serve gRPC in plaintext (`--insecure`, the default); clear it and pass `--tls-cert`,
    /// `--tls-key` and `--client-ca` in `extra` for mutual TLS.
    pub insecure: bool,
    /// More `serve` arguments.
    pub extra: Vec<String>,
    /// `--store kube` with this kubeconfig and namespace instead of the local store (the local
    /// HTTP API, [`Hub::flightnodes`] and friends, is not served then).
    pub kube: Option<KubeStore>,
    proc: Option<Proc>,
    log: PathBuf,
}

impl Hub {
    /// A hub (not started yet) on free loopback ports, its store in `dir/hub` and its log in
    /// `dir/hub.log`, with `extra` serve flags; plaintext gRPC unless `insecure` is cleared.
    pub fn new(dir: &Path, extra: Vec<String>) -> Result<Hub> {
        Ok(Hub {
            grpc_port: free_port()?,
            http_port: free_port()?,
            data_dir: dir.join("hub"),
            insecure: true,
            extra,
            kube: None,
            proc: None,
            log: dir.join("hub.log"),
        })
    }

    fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(binary("flightnode-hub")?);
        cmd.arg("serve");
        match &self.kube {
            Some(k) => {
                cmd.args(["--store", "kube", "--namespace", &k.namespace])
                    .env("KUBECONFIG", &k.kubeconfig);
            }
            None => {
                cmd.args(["--store", "local", "--data-dir"]).arg(&self.data_dir);
            }
        }
        if self.insecure {
            cmd.arg("--insecure");
        }
        cmd.args(["--grpc-addr", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--http-addr", &format!("127.0.0.1:{}", self.http_port)])
            .args(&self.extra)
            .env("RUST_LOG", "info");
        Ok(cmd)
    }

    /// Starts (or restarts) the hub and waits for `/readyz`.
    pub fn start(&mut self) -> Result<()> {
        self.proc = Some(Proc::spawn(self.command()?, &self.log)?);
        let port = self.http_port;
        if !wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            http_get(port, "/readyz").is_ok()
        }) {
            bail!("the hub did not become ready:\n{}", self.log());
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.stop();
        }
    }

    /// gRPC endpoint for agents.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// SIGSTOP: the process stops where it is, sockets open, clocks running on without it (a
    /// paused VM, a stalled node). Killing it on drop still works.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Hub::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("the hub is not running");
        };
        signal_child(pid, signal)
    }

    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// The FlightNode object of `name` from the hub's local API, if it exists.
    pub fn flightnode(&self, name: &str) -> Option<Value> {
        let body = http_get(
            self.http_port,
            &format!("/apis/edge.drone.io/v1/namespaces/default/flightnodes/{name}"),
        )
        .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// Sets `spec.firmwareVersion` (what `kubectl patch` does in a cluster).
    pub fn set_desired_version(&self, name: &str, version: &str) -> Result<()> {
        let path = format!("/apis/edge.drone.io/v1/namespaces/default/flightnodes/{name}");
        let body = format!(r#"{{"spec":{{"firmwareVersion":"{version}"}}}}"#);
        http_request(
            self.http_port,
            "PATCH",
            &path,
            "application/merge-patch+json",
            &body,
        )?;
        Ok(())
    }

    /// The durable phase-transition events of `name`.
    pub fn events(&self, name: &str) -> Result<Vec<Value>> {
        let body = http_get(
            self.http_port,
            &format!("/apis/edge.drone.io/v1/namespaces/default/flightnodes/{name}/events"),
        )?;
        let list: Value = serde_json::from_str(&body)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The FirmwareRollout `name` from the hub's local API, if it exists.
    pub fn rollout(&self, name: &str) -> Option<Value> {
        let body = http_get(
            self.http_port,
            &format!("/apis/edge.drone.io/v1/namespaces/default/firmwarerollouts/{name}"),
        )
        .ok()?;
        serde_json::from_str(&body).ok()
    }

    /// The events of rollout `name` (oldest first).
    pub fn rollout_events(&self, name: &str) -> Result<Vec<Value>> {
        let body = http_get(
            self.http_port,
            &format!("/apis/edge.drone.io/v1/namespaces/default/firmwarerollouts/{name}/events"),
        )?;
        let list: Value = serde_json::from_str(&body)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// `flightnode-hub apply -f` of `yaml` against this hub.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let file = tempfile::Builder::new().suffix(".yaml").tempfile()?;
        std::fs::write(file.path(), yaml)?;
        let server = format!("http://127.0.0.1:{}", self.http_port);
        run_ok(
            &binary("flightnode-hub")?,
            &[
                "apply",
                "-f",
                &file.path().display().to_string(),
                "--server",
                &server,
            ],
        )?;
        Ok(())
    }

    /// All FlightNodes.
    pub fn flightnodes(&self) -> Result<Vec<Value>> {
        let body = http_get(self.http_port, "/apis/edge.drone.io/v1/flightnodes")?;
        let list: Value = serde_json::from_str(&body)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }
}

/// A minimal HTTP/1.1 request on loopback; returns the body of a 200.
pub fn http_request(port: u16, method: &str, path: &str, content_type: &str, body: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).unwrap_or("0");
    if status != "200" {
        bail!("{method} {path}: HTTP {status}: {body}");
    }
    Ok(body.to_owned())
}

/// A minimal HTTP/1.1 GET on loopback (no client dependency; the hub's local API is plain HTTP).
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).unwrap_or("0");
    if status != "200" {
        bail!("GET {path}: HTTP {status}");
    }
    // Bodies may be chunked; undo it.
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

/// One simulated drone: a state dir, file slots, `agent.toml`, and its `run` process.
pub struct Drone {
    /// Device id (`drone-1`, ...).
    pub id: String,
    /// Its state dir, slots and logs.
    pub dir: PathBuf,
    /// Its `agent.toml`.
    pub config: PathBuf,
    proc: Option<Proc>,
    agent: PathBuf,
}

impl Drone {
    /// Starts `flightnode-agent run`.
    pub fn start(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.dir.join("state/agent.sock"));
        let mut cmd = Command::new(&self.agent);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info");
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("agent.log"))?);
        let socket = self.dir.join("state/agent.sock");
        if !wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            socket.exists()
        }) {
            bail!("drone {} did not start:\n{}", self.id, self.log());
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.stop();
        }
    }

    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// Process id of `run`.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `flightnode-agent status --json` (through the running daemon, or the store).
    pub fn status(&self) -> Result<Value> {
        let out = run_ok(
            &self.agent,
            &["--config", &self.config.display().to_string(), "status", "--json"],
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Bytes of slot `a` or `b`.
    pub fn slot(&self, slot: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("slots/{slot}.img"))).unwrap_or_default()
    }
}

/// What to start.
pub struct FleetOptions {
    /// How many drones.
    pub drones: usize,
    /// Use the hub's embedded broker instead of mosquitto.
    pub embedded_broker: bool,
    /// Device id per drone index (default `drone-<index + 1>`).
    pub device_id: fn(usize) -> String,
    /// Health command per drone index (default `true`).
    pub health: fn(usize) -> String,
    /// Extra `agent.toml` text for every drone.
    pub agent_extra: String,
    /// Extra `agent.toml` text for drone `i` (after `agent_extra`), e.g. a `[flight]` section.
    pub drone_extra: Vec<String>,
    /// Extra `flightnode-hub serve` flags.
    pub hub_args: Vec<String>,
    /// Agent binary (default: the workspace's).
    pub agent_bin: Option<PathBuf>,
    /// Serve the hub on a Kubernetes API server instead of its local store.
    pub kube: Option<KubeStore>,
    /// The drones also obey unsigned commands (`insecure_accept_unsigned`): for tests of the
    /// plain forms an operator publishes with `mosquitto_pub`.
    pub unsigned_commands: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            drones: 1,
            embedded_broker: false,
            device_id: |i| format!("drone-{}", i + 1),
            health: |_| "true".into(),
            agent_extra: String::new(),
            drone_extra: Vec::new(),
            hub_args: vec!["--offline-after".into(), "6s".into()],
            agent_bin: None,
            kube: None,
            unsigned_commands: false,
        }
    }
}

/// The whole system on loopback.
pub struct Fleet {
    /// Everything of this fleet lives here (removed on drop).
    pub dir: tempfile::TempDir,
    /// The MQTT broker.
    pub broker: Broker,
    /// The hub.
    pub hub: Hub,
    /// The drones, `drone-1` first.
    pub drones: Vec<Drone>,
    /// Serves the bundles made with [`Fleet::bundle`].
    pub bundles: BundleServer,
    /// The agent binary the drones run.
    pub agent: PathBuf,
    /// The drones obey unsigned commands too.
    pub unsigned_commands: bool,
}

impl Fleet {
    /// Starts broker, hub and drones; makes a signing key.
    pub fn start(opts: FleetOptions) -> Result<Fleet> {
        let dir = tempfile::Builder::new().prefix("flightnode-fleet-").tempdir()?;
        let agent = match opts.agent_bin {
            Some(p) => p,
            None => binary("flightnode-agent")?,
        };
        run_ok(
            &agent,
            &[
                "keygen",
                "--out-dir",
                &dir.path().join("keys").display().to_string(),
            ],
        )?;
        // The hub's command key: the hub signs every command with it, the drones obey only it.
        run_ok(
            &agent,
            &[
                "keygen",
                "--out-dir",
                &dir.path().join("keys/command").display().to_string(),
            ],
        )?;
        let broker = if opts.embedded_broker {
            Broker::Embedded { port: free_port()? }
        } else {
            Broker::Mosquitto(Mosquitto::start()?)
        };
        let mut hub_args = opts.hub_args;
        if let Broker::Embedded { port } = &broker {
            hub_args.extend(["--embedded-broker".into(), format!("127.0.0.1:{port}")]);
        }
        // Where `serve --controllers` publishes commands (unused without it).
        hub_args.extend(["--mqtt-url".into(), broker.url()]);
        hub_args.extend([
            "--command-key".into(),
            dir.path().join("keys/command/release.key").display().to_string(),
        ]);
        let mut hub = Hub::new(dir.path(), hub_args)?;
        hub.kube.clone_from(&opts.kube);
        hub.start()?;
        let bundles = BundleServer::start_blocking()?;
        let mut fleet = Fleet {
            broker,
            hub,
            drones: Vec::new(),
            bundles,
            agent,
            dir,
            unsigned_commands: opts.unsigned_commands,
        };
        for i in 0..opts.drones {
            let extra = format!(
                "{}\n{}",
                opts.agent_extra,
                opts.drone_extra.get(i).map_or("", String::as_str)
            );
            let drone = fleet.make_drone(&(opts.device_id)(i), &(opts.health)(i), &extra)?;
            fleet.drones.push(drone);
        }
        for d in &mut fleet.drones {
            d.start()?;
        }
        // A command published before a drone's first subscription would be lost (the broker
        // has no session for it yet), so a test may publish only once all of them are in.
        if let Broker::Mosquitto(m) = &fleet.broker {
            for d in &mut fleet.drones {
                let id = d.id.clone();
                m.wait_subscribed(&id, Duration::from_mins(1), || {
                    (!d.running()).then(|| format!("the agent exited:\n{}", d.log()))
                })?;
            }
        }
        Ok(fleet)
    }

    /// Writes the dir and `agent.toml` of drone `id` (not started; [`Fleet::start`] makes its
    /// own drones this way), for a test that prepares its storage first.
    pub fn make_drone(&self, id: &str, health: &str, extra: &str) -> Result<Drone> {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(dir.join("slots"))?;
        std::fs::write(dir.join("slots/a.img"), b"factory firmware 1.0.0")?;
        let config = dir.join("agent.toml");
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        std::fs::write(
            &config,
            format!(
                "device_id = \"{id}\"\nhardware = \"{HARDWARE}\"\nstate_dir = {state}\ntrusted_keys = [{key}]\n\
                 factory_version = \"1.0.0\"\n[slots]\nbackend = \"file\"\na = {a}\nb = {b}\n\
                 [health]\ncommand = {health:?}\ntimeout = \"30s\"\n\
                 [download]\nidle_timeout = \"3s\"\nretries = 8\nbackoff = \"200ms\"\ncheckpoint_bytes = 65536\n\
                 [mqtt]\nurl = \"{mqtt}\"\nmax_backoff = \"1s\"\n\
                 [hub]\nendpoint = \"{hub}\"\nheartbeat_interval = \"1s\"\n\
                 [commands]\nhub_keys = [{command_key}]\ninsecure_accept_unsigned = {unsigned}\n{extra}\n",
                unsigned = self.unsigned_commands,
                state = q(dir.join("state")),
                command_key = q(self.command_pub()),
                key = q(self.dir.path().join("keys/release.pub")),
                a = q(dir.join("slots/a.img")),
                b = q(dir.join("slots/b.img")),
                mqtt = self.broker.url(),
                hub = self.hub.endpoint(),
            ),
        )?;
        Ok(Drone {
            id: id.to_owned(),
            dir,
            config,
            proc: None,
            agent: self.agent.clone(),
        })
    }

    /// Makes a signed bundle of a `len`-byte image for `version` and serves it at `/NAME.fnb`.
    pub fn bundle(&self, name: &str, version: &str, len: usize) -> Result<(PathBuf, String)> {
        let image = self.dir.path().join(format!("{name}.img"));
        let mut x: u32 = version
            .bytes()
            .fold(2_166_136_261, |h, b| (h ^ u32::from(b)).wrapping_mul(16_777_619));
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        std::fs::write(&image, bytes)?;
        let out = self.dir.path().join(format!("{name}.fnb"));
        run_ok(
            &self.agent,
            &[
                "bundle",
                "create",
                "--key",
                &self.dir.path().join("keys/release.key").display().to_string(),
                "--image",
                &image.display().to_string(),
                "--version",
                version,
                "--compatible",
                HARDWARE,
                "--output",
                &out.display().to_string(),
            ],
        )?;
        let path = format!("/{name}.fnb");
        self.bundles.put_file(&path, &out)?;
        Ok((out, self.bundles.url(&path)))
    }

    /// The hub's command key (PKCS#8 PEM): what `flightnode-hub --command-key` signs with.
    pub fn command_key(&self) -> PathBuf {
        self.dir.path().join("keys/command/release.key")
    }

    /// The public half the drones list in `[commands] hub_keys`.
    pub fn command_pub(&self) -> PathBuf {
        self.dir.path().join("keys/command/release.pub")
    }

    /// `flightnode-hub upgrade --device ID ARGS…` (publishes the MQTT command); ARGS are
    /// `--url URL` or `--bundle FILE --base-url URL`, plus options.
    pub fn hub_upgrade(&self, device: &str, extra: &[&str]) -> Result<()> {
        let hub = binary("flightnode-hub")?;
        let mut args = vec!["upgrade", "--device", device];
        let mqtt = self.broker.url();
        args.extend(["--mqtt-url", &mqtt]);
        let key = self.command_key().display().to_string();
        args.extend(["--command-key", &key]);
        args.extend(extra);
        run_ok(&hub, &args)?;
        Ok(())
    }

    /// Polls the hub until `pred` holds for FlightNode `name`, or fails with what it last saw.
    pub fn wait_flightnode(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = None;
        let mut reached = false;
        wait_until(timeout, Duration::from_millis(200), || {
            // Keep the last object seen for the error message, across brief hub outages.
            if let Some(fnode) = self.hub.flightnode(name) {
                reached = pred(&fnode);
                last = Some(fnode);
            }
            reached
        });
        if let (true, Some(fnode)) = (reached, last.clone()) {
            return Ok(fnode);
        }
        bail!(
            "FlightNode {name} never reached the expected state; last seen:\n{last:#?}\nhub log:\n{}",
            self.hub.log()
        )
    }
}

/// The condition `type` of a FlightNode.
pub fn condition<'a>(fnode: &'a Value, kind: &str) -> Option<&'a Value> {
    fnode["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
