//! A real Debian `mosquitto` on a free loopback port, for end-to-end tests.
//!
//! [`Mosquitto::start`] runs a plain broker (`allow_anonymous true`); [`Mosquitto::start_tls`]
//! runs one configured from `systemd/mosquitto.conf.example` and `systemd/mosquitto-acl.example`
//! (mutual TLS, CN = username, per-device ACLs), with only the paths, the port and the log
//! settings changed. Both keep persistence on in their temp dir, so [`Mosquitto::restart`] keeps
//! sessions and queued QoS 1 messages; [`Mosquitto::wipe_persistence`] (while stopped) makes the
//! next start forget them.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! use flightnode_tests::mosquitto::Mosquitto;
//! let mut broker = Mosquitto::start()?;              // or Mosquitto::start_tls()?
//! let url = broker.url();                             // mqtt://127.0.0.1:PORT (mqtts:// for TLS)
//! broker.publish("firmware/d1/upgrade", b"https://fw/1.fnb", false)?; // QoS 1, as `hub` in TLS
//! let status = broker.subscribe_once("firmware/d1/status", std::time::Duration::from_secs(20))?;
//! broker.restart()?;                                  // same port, sessions kept
//! # let _ = (url, status); Ok(()) }
//! ```
//!
//! TLS material ([`Pki`]) lives in the broker's temp dir: [`Mosquitto::client_cert`] issues a client
//! certificate with CN = the given id (device id, or `hub`); [`Pki::foreign_client`] one from an
//! unrelated CA. Publishing and subscribing use `mosquitto_pub`/`mosquitto_sub`
//! (package `mosquitto-clients`). Everything stops when the [`Mosquitto`] is dropped.

pub use crate::pki::{ClientCert, Pki};
use anyhow::{Context, Result, anyhow, bail};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The example broker config, rendered for tests by [`Mosquitto::start_tls`].
pub const EXAMPLE_CONF: &str = include_str!("../../systemd/mosquitto.conf.example");
/// The example ACL, used verbatim by [`Mosquitto::start_tls`].
pub const EXAMPLE_ACL: &str = include_str!("../../systemd/mosquitto-acl.example");
/// The operator identity of the example ACL.
pub const HUB_IDENTITY: &str = "hub";

/// The `mosquitto` binary: on `PATH` or in `/usr/sbin`.
pub fn mosquitto_binary() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.push(PathBuf::from("/usr/local/sbin"));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "mosquitto not found on PATH or in /usr/sbin: apt-get install mosquitto mosquitto-clients"
            )
        })
}

fn client_tool(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found on PATH: apt-get install mosquitto-clients"))
}

/// Which broker config.
enum Mode {
    Plain,
    Tls(Box<Pki>),
}

/// A running (or stopped) mosquitto; stopped on drop.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    mode: Mode,
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    hub: Option<ClientCert>,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Replaces the value of every line whose first word is a key of `set`; each key must occur.
fn render(example: &str, set: &[(&str, String)]) -> Result<String> {
    let mut out = String::new();
    let mut seen = vec![false; set.len()];
    for line in example.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        match set.iter().position(|(k, _)| *k == key) {
            Some(i) if !line.trim_start().starts_with('#') => {
                if !seen[i] {
                    let _ = writeln!(out, "{key} {}", set[i].1);
                }
                seen[i] = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        bail!("the example config has no {:?} line", set[i].0);
    }
    Ok(out)
}

impl Mosquitto {
    /// A plain broker: `listener PORT 127.0.0.1`, `allow_anonymous true`, persistence on.
    pub fn start() -> Result<Self> {
        Self::launch(Mode::Plain)
    }

    /// The example TLS config: mutual TLS with a generated [`Pki`], CN = username, the example ACL.
    pub fn start_tls() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fn-pki-").tempdir()?;
        let pki = Pki::generate(dir.path(), "flightnode test fleet CA")?;
        // Keep the PKI in the broker's own dir: move it there after launch picks one.
        let mut broker = Self::launch_with(Mode::Tls(Box::new(pki)), Some(dir))?;
        broker.hub = Some(broker.client_cert(HUB_IDENTITY)?);
        Ok(broker)
    }

    fn launch(mode: Mode) -> Result<Self> {
        Self::launch_with(mode, None)
    }

    fn launch_with(mode: Mode, dir: Option<tempfile::TempDir>) -> Result<Self> {
        let dir = match dir {
            Some(d) => d,
            None => tempfile::Builder::new().prefix("fn-mosquitto-").tempdir()?,
        };
        let mut m = Mosquitto {
            conf: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            port: 0,
            dir,
            mode,
            child: None,
            hub: None,
        };
        mosquitto_binary()?;
        // A free port can be taken between probing and binding; try a few.
        let mut last = None;
        for _ in 0..5 {
            m.port = free_port()?;
            m.write_config()?;
            match m.spawn() {
                Ok(()) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("mosquitto did not start")))
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir.path();
        let persistence = format!("{}/", d.join("db").display());
        std::fs::create_dir_all(d.join("db"))?;
        let mut text = match &self.mode {
            Mode::Plain => format!(
                "per_listener_settings false\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location {persistence}\n\
                 log_dest file {log}\n\
                 log_type all\n\
                 connection_messages true\n\
                 listener {port} 127.0.0.1\n",
                log = self.log.display(),
                port = self.port,
            ),
            Mode::Tls(pki) => {
                let acl = d.join("flightnode.acl");
                std::fs::write(&acl, EXAMPLE_ACL)?;
                let mut text = render(
                    EXAMPLE_CONF,
                    &[
                        ("listener", format!("{} 127.0.0.1", self.port)),
                        ("persistence_location", persistence),
                        ("log_dest", format!("file {}", self.log.display())),
                        ("log_type", "all".into()),
                        ("cafile", pki.ca.display().to_string()),
                        ("certfile", pki.server_cert.display().to_string()),
                        ("keyfile", pki.server_key.display().to_string()),
                        ("acl_file", acl.display().to_string()),
                    ],
                )?;
                text.push('\n');
                text
            }
        };
        // Run as root, mosquitto would switch to the `mosquitto` user and lose the temp dir.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            text.push_str("user root\n");
        }
        std::fs::write(&self.conf, text)?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = mosquitto_binary()?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("stderr.log"))?,
            ))
            .spawn()
            .context("spawn mosquitto")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "mosquitto exited with {status} on port {}:\n{}\n{}",
                    self.port,
                    self.log(),
                    std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_child();
                bail!(
                    "mosquitto did not listen on port {} within 10 s:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The port (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://127.0.0.1:PORT` for the TLS broker.
    pub fn url(&self) -> String {
        match self.mode {
            Mode::Plain => format!("mqtt://127.0.0.1:{}", self.port),
            Mode::Tls(_) => format!("mqtts://127.0.0.1:{}", self.port),
        }
    }

    /// The broker's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TLS material (TLS broker only).
    pub fn pki(&self) -> Option<&Pki> {
        match &self.mode {
            Mode::Tls(p) => Some(p),
            Mode::Plain => None,
        }
    }

    /// CA certificate path (TLS broker only).
    pub fn ca(&self) -> Option<PathBuf> {
        self.pki().map(|p| p.ca.clone())
    }

    /// Issues a client certificate with CN = `id` (TLS broker only).
    pub fn client_cert(&self, id: &str) -> Result<ClientCert> {
        self.pki()
            .ok_or_else(|| anyhow!("client certificates need Mosquitto::start_tls"))?
            .client(id)
    }

    /// The broker log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (mosquitto saves its persistence file), SIGKILL after 5 s.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait()?;
        Ok(())
    }

    /// SIGSTOP: the broker keeps its sockets open but answers nothing (a hung broker or a dead
    /// link); [`thaw`](Self::thaw) resumes it, [`kill`](Self::kill) ends it.
    pub fn freeze(&mut self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&mut self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("mosquitto is not running"))?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL: no persistence save (sessions since the last autosave are lost).
    pub fn kill(&mut self) -> Result<()> {
        self.kill_child();
        Ok(())
    }

    /// Starts the stopped broker again on the same port and config.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // The old socket may linger briefly; retry a few times.
        let mut last = None;
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last.unwrap_or_else(|| anyhow!("mosquitto did not start again")))
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again): sessions and queued messages kept.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Deletes the persistence file (broker must be stopped): the next start knows no session.
    pub fn wipe_persistence(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("stop the broker before wiping its persistence");
        }
        let db = self.dir.path().join("db");
        std::fs::remove_dir_all(&db)?;
        std::fs::create_dir_all(&db)?;
        Ok(())
    }

    fn client_args(&self, as_client: Option<&ClientCert>) -> Result<Vec<String>> {
        let mut args = vec!["-p".to_owned(), self.port.to_string()];
        match &self.mode {
            Mode::Plain => {
                args.extend(["-h".to_owned(), "127.0.0.1".to_owned()]);
                if let Some(c) = as_client {
                    args.extend(["-u".to_owned(), c.id.clone()]);
                }
            }
            Mode::Tls(pki) => {
                let c = as_client
                    .or(self.hub.as_ref())
                    .ok_or_else(|| anyhow!("no client certificate"))?;
                args.extend([
                    "-h".to_owned(),
                    "localhost".to_owned(),
                    "--cafile".to_owned(),
                    pki.ca.display().to_string(),
                    "--cert".to_owned(),
                    c.cert.display().to_string(),
                    "--key".to_owned(),
                    c.key.display().to_string(),
                ]);
            }
        }
        Ok(args)
    }

    /// Publishes `payload` with QoS 1 (as `hub` on the TLS broker).
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> Result<()> {
        self.publish_as(None, topic, payload, retain)
    }

    /// Publishes `payload` with QoS 1 as `client` (`None`: anonymous, or `hub` on the TLS broker).
    pub fn publish_as(
        &self,
        client: Option<&ClientCert>,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Result<()> {
        let file = tempfile::NamedTempFile::new_in(self.dir.path())?;
        std::fs::write(file.path(), payload)?;
        let mut cmd = Command::new(client_tool("mosquitto_pub")?);
        cmd.args(self.client_args(client)?)
            .args(["-q", "1", "-t", topic, "-f"])
            .arg(file.path());
        if retain {
            cmd.arg("-r");
        }
        let out = cmd.output().context("run mosquitto_pub")?;
        if !out.status.success() {
            bail!(
                "mosquitto_pub to {topic} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Subscribes (as `hub` on the TLS broker) and returns the first payload (retained ones
    /// included), or `None` after `timeout`.
    pub fn subscribe_once(&self, topic: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.subscribe_once_as(None, topic, timeout)
    }

    /// Like [`subscribe_once`](Self::subscribe_once) as `client`. A refused subscription or
    /// connection also gives `None` (see the broker [`log`](Self::log) for which).
    pub fn subscribe_once_as(
        &self,
        client: Option<&ClientCert>,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let secs = timeout.as_secs().max(1).to_string();
        let out = Command::new(client_tool("mosquitto_sub")?)
            .args(self.client_args(client)?)
            .args(["-q", "1", "-C", "1", "-N", "-W", &secs, "-t", topic])
            .stdin(Stdio::null())
            .output()
            .context("run mosquitto_sub")?;
        if out.status.success() && !out.stdout.is_empty() {
            Ok(Some(out.stdout))
        } else {
            Ok(None)
        }
    }

    /// Starts `mosquitto_sub -v` on `topic` (as `hub` on the TLS broker) in the background; its
    /// stdout collects `topic payload` lines. Killed on drop of the returned [`Subscriber`].
    ///
    /// Returns once the broker acknowledged the subscription: the broker keeps nothing
    /// non-retained for a subscriber that is not there yet, so a test publishing right after a
    /// bare spawn could lose its first messages on a loaded machine.
    pub fn subscriber(&self, topic: &str) -> Result<Subscriber> {
        let n = SUB_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("test-sub-{}-{n}", std::process::id());
        let out = self.dir.path().join(format!("{id}.out"));
        let child = Command::new(client_tool("mosquitto_sub")?)
            .args(self.client_args(None)?)
            .args(["-i", &id, "-q", "1", "-v", "-t", topic])
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&out)?))
            .stderr(Stdio::null())
            .spawn()
            .context("spawn mosquitto_sub")?;
        let mut sub = Subscriber { child, out };
        self.wait_subscribed(&id, Duration::from_secs(30), || match sub.child.try_wait() {
            Ok(Some(status)) => Some(format!("mosquitto_sub on {topic} exited ({status})")),
            _ => None,
        })?;
        Ok(sub)
    }

    /// Waits until the broker acknowledged a subscription of client `id` (its log says so), for
    /// at most `timeout`. `gave_up` is asked on each poll and ends the wait with its reason (a
    /// client process that exited, say).
    pub fn wait_subscribed(
        &self,
        id: &str,
        timeout: Duration,
        mut gave_up: impl FnMut() -> Option<String>,
    ) -> Result<()> {
        let acked = format!("Sending SUBACK to {id}");
        let mut why = None;
        let subscribed = crate::poll::wait_until(timeout, Duration::from_millis(20), || {
            if self.log().lines().any(|l| l.ends_with(&acked)) {
                return true;
            }
            why = gave_up();
            why.is_some()
        });
        match why {
            Some(why) => bail!("client {id} never subscribed: {why}"),
            None if !subscribed => bail!(
                "client {id} did not subscribe within {timeout:?}; broker log:\n{}",
                self.log()
            ),
            None => Ok(()),
        }
    }
}

static SUB_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A background `mosquitto_sub -v`.
pub struct Subscriber {
    child: Child,
    out: PathBuf,
}

impl Subscriber {
    /// Process id of the `mosquitto_sub`.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// Everything received so far (`topic payload` lines).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.output().contains(needle)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
