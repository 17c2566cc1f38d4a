//! A flight controller for the flight gate tests: `tests/fc-standin/fc_standin.py`, built on
//! pymavlink, streaming HEARTBEAT, EXTENDED_SYS_STATE, BATTERY_STATUS and SYS_STATUS over UDP to
//! the agent's `udpin` port, scripted from here (`arm`, `takeoff`, `land`, `battery 12`, ...).
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

/// The running stand-in; killed on drop.
pub struct Vehicle {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl Vehicle {
    /// Starts streaming to `127.0.0.1:port`. `flags`: `--armed`, `--in-air`, `--battery N`.
    pub fn start(port: u16, flags: &[&str]) -> Result<Self> {
        let mut child = Command::new(python())
            .arg(script())
            .arg(format!("udpout:127.0.0.1:{port}"))
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", python().display(), script().display()))?;
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
        let mut v = Self {
            child,
            stdin,
            lines,
            port,
        };
        v.expect("ready").context(
            "the pymavlink stand-in did not start: run ./test.sh (it installs pymavlink) \
             or set FLIGHTNODE_PYMAVLINK_PYTHON",
        )?;
        Ok(v)
    }

    /// The agent's port it streams to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn expect(&mut self, want: &str) -> Result<()> {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line == want => return Ok(()),
                Ok(line) if line.starts_with("error") => bail!("stand-in: {line}"),
                Ok(_) => {}
                Err(_) => bail!("stand-in never said {want:?}"),
            }
        }
    }

    /// Runs one command (`arm`, `disarm`, `takeoff`, `land`, `battery N`, `silence`, `resume`)
    /// and returns once a burst carrying it was sent.
    pub fn send(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.expect(&format!("ok {command}"))
    }
}

impl Drop for Vehicle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
