//! A flight controller for the flight gate tests: `tests/fc-standin/fc_standin.py`, built on
//! pymavlink, streaming HEARTBEAT, EXTENDED_SYS_STATE, BATTERY_STATUS and SYS_STATUS over UDP to
//! the agent's `udpin` port, scripted from here (`arm`, `takeoff`, `land`, `battery 12`, ...).
//! It also makes the faults a real autopilot cannot: a lost link, a second MAVLink system
//! (`--sysid 2`), MAVLink 1 (`--mavlink1`), no landed state (`--no-landed-state`).
//!
//! The Python comes from `FLIGHTNODE_PYMAVLINK_PYTHON`, else the venv `./test.sh` makes in
//! `target/pymavlink-venv`, else `python3` on `PATH`.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The stand-in script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fc-standin/fc_standin.py")
}

/// The Python interpreter that has pymavlink.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FLIGHTNODE_PYMAVLINK_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pymavlink-venv/bin/python3");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}

/// A free UDP port on loopback for the agent's `udpin` link.
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// A pymavlink script driven one command a line on stdin, answering `ready`, `ok <command>` or
/// `error ...` on stdout; killed on drop.
pub struct Scripted {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Scripted {
    /// Starts `script args` with the pymavlink Python and waits for its `ready`.
    pub fn start(script: &std::path::Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(python())
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", python().display(), script.display()))?;
        let stdin = child.stdin.take().context("stand-in stdin")?;
        let stdout = child.stdout.take().context("stand-in stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut v = Self { child, stdin, lines };
        v.expect("ready", Duration::from_secs(30)).with_context(|| {
            format!(
                "{} did not start: run ./test.sh (it installs pymavlink) \
                 or set FLIGHTNODE_PYMAVLINK_PYTHON",
                script.display()
            )
        })?;
        Ok(v)
    }

    fn expect(&mut self, want: &str, timeout: Duration) -> Result<()> {
        self.expect_collecting(want, timeout).map(|_| ())
    }

    /// Waits for the line `want`; the lines before it.
    fn expect_collecting(&mut self, want: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return Ok(before),
                Ok(line) if line.starts_with("error") => bail!("pymavlink script: {line}"),
                Ok(line) => before.push(line),
                Err(_) => bail!("pymavlink script never said {want:?} within {timeout:?}"),
            }
        }
    }

    /// Runs one command and returns the lines it printed before `ok <command>`.
    pub fn send_collecting(&mut self, command: &str, timeout: Duration) -> Result<Vec<String>> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.expect_collecting(&format!("ok {command}"), timeout)
    }

    /// Runs one command and returns once the script answered `ok <command>` (within `timeout`).
    pub fn send_within(&mut self, command: &str, timeout: Duration) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.expect(&format!("ok {command}"), timeout)
    }
}

/// An arm-authorisation answer as the stand-in saw it: (result, progress, result_param2).
pub type AuthAck = (u8, u8, i32);

/// The running stand-in; killed on drop.
pub struct Vehicle {
    script: Scripted,
    port: u16,
}

impl Vehicle {
    /// Starts streaming to `127.0.0.1:port`. `flags`: `--armed`, `--in-air`, `--battery N`,
    /// `--sysid N`, `--mavlink1`, `--no-landed-state`, `--charging`.
    pub fn start(port: u16, flags: &[&str]) -> Result<Self> {
        let mut args = vec![format!("udpout:127.0.0.1:{port}")];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        Ok(Self {
            script: Scripted::start(&script(), &args)?,
            port,
        })
    }

    /// The agent's port it streams to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Asks for arm authorisation as PX4 does: the agent's answer, `(result, progress,
    /// result_param2)` (`None`: no answer within 5 s), and the STATUSTEXTs that came with it.
    pub fn authorize(&mut self) -> Result<(Option<AuthAck>, Vec<String>)> {
        let lines = self
            .script
            .send_collecting("authorize", Duration::from_secs(30))?;
        let mut ack = None;
        let mut texts = Vec::new();
        for line in lines {
            if let Some(t) = line.strip_prefix("text ") {
                texts.push(t.to_owned());
            } else if let Some(a) = line.strip_prefix("ack ") {
                let n: Vec<&str> = a.split(' ').collect();
                if let [r, p, p2] = n[..] {
                    ack = Some((r.parse()?, p.parse()?, p2.parse()?));
                }
            }
        }
        Ok((ack, texts))
    }

    /// The last arming lock code the agent sent (`-1`: none yet).
    pub fn armlock(&mut self) -> Result<i32> {
        let lines = self.script.send_collecting("armlock", Duration::from_secs(30))?;
        lines
            .iter()
            .find_map(|l| l.strip_prefix("armlock "))
            .context("the stand-in printed no armlock line")?
            .parse()
            .context("armlock value")
    }

    /// Runs one command (`arm`, `disarm`, `takeoff`, `land`, `battery N`, `silence`, `resume`,
    /// `version X.Y.Z`) and returns once a burst carrying it was sent.
    pub fn send(&mut self, command: &str) -> Result<()> {
        self.script.send_within(command, Duration::from_secs(30))
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
