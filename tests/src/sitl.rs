//! A real autopilot for the flight-gate tests: ArduPilot Copter SITL (software in the loop: the
//! real flight code and MAVLink stack with its own physics), one per test, and a pymavlink pilot
//! (`tests/sitl/pilot.py`) that flies it from a second port.
//!
//! SITL is not part of the project: it is found through [`ENV_DIR`] (`FLIGHTNODE_ARDUPILOT_DIR`),
//! else in `../shared/ardupilot` beside the checkout, a directory holding `start-sitl.sh` and
//! `arducopter.xz`. Without it, [`Sitl::start`] prints `SKIPPED` and why, and returns `None`.
//!
//! Each SITL runs in its own temp dir and instance number (its ports are 5760 + 10 × instance
//! and up; each TCP port serves one client at a time, so the agent gets SERIAL0 and the pilot
//! SERIAL1), with no dataflash logs. A small shell guard started with it keeps its stdin from
//! here: when the test ends, even by SIGKILL, the guard's stdin closes and it stops the autopilot.

use crate::fc_standin::Scripted;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// Environment variable naming the directory with `start-sitl.sh`.
pub const ENV_DIR: &str = "FLIGHTNODE_ARDUPILOT_DIR";

/// The ArduPilot directory: [`ENV_DIR`], else `../shared/ardupilot` beside the checkout.
pub fn ardupilot_dir() -> Option<PathBuf> {
    let dir = std::env::var_os(ENV_DIR).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/ardupilot"),
        PathBuf::from,
    );
    dir.join("start-sitl.sh").is_file().then_some(dir)
}

/// Instance numbers handed out in this process; the pid spreads concurrent test binaries.
static NEXT: AtomicU16 = AtomicU16::new(0);

/// Whether the ports of SITL instance `n` are free right now.
fn ports_free(n: u16) -> bool {
    let base = 5760 + 10 * n;
    [base, base + 2, base + 3]
        .iter()
        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        && std::net::UdpSocket::bind(("127.0.0.1", 5501 + 10 * n)).is_ok()
}

/// A running ArduCopter SITL; stopped on drop.
pub struct Sitl {
    guard: Child,
    instance: u16,
    dir: tempfile::TempDir,
}

impl Sitl {
    /// Starts SITL at `speedup` (sim seconds per wall second), on the ground, disarmed, in
    /// STABILIZE. `None` (after printing why) when ArduPilot is not available.
    pub fn start(speedup: u32) -> Result<Option<Sitl>> {
        Self::start_with(speedup, "", &[])
    }

    /// [`Sitl::start`] with extra parameter lines (`NAME VALUE`, applied at boot) and Lua
    /// scripts copied into the autopilot's `scripts/` (they run when `params` hold
    /// `SCR_ENABLE 1`).
    pub fn start_with(speedup: u32, params: &str, scripts: &[PathBuf]) -> Result<Option<Sitl>> {
        let Some(ardupilot) = ardupilot_dir() else {
            eprintln!(
                "SKIPPED: no ArduPilot SITL (start-sitl.sh) in {ENV_DIR} or ../shared/ardupilot beside the checkout"
            );
            return Ok(None);
        };
        let dir = tempfile::tempdir().context("SITL temp dir")?;
        let defaults = dir.path().join("test.parm");
        // No dataflash log: about 4 MB per flight that nobody reads.
        std::fs::write(&defaults, format!("LOG_BACKEND_TYPE 0\n{params}\n"))
            .with_context(|| format!("write {}", defaults.display()))?;
        // ArduPilot keeps the instance in a byte (its ports wrap above 255).
        let spread = u16::try_from(std::process::id() % 200).unwrap_or(0);
        let mut last_error = String::new();
        // A few tries: another test may take the ports between the check and the start.
        for _ in 0..3 {
            let instance = 10 + (spread + NEXT.fetch_add(1, Ordering::Relaxed)) % 240;
            if !ports_free(instance) {
                continue;
            }
            let scripts_dir = dir.path().join(format!("inst{instance}/scripts"));
            std::fs::create_dir_all(&scripts_dir)
                .with_context(|| format!("create {}", scripts_dir.display()))?;
            for script in scripts {
                let name = script
                    .file_name()
                    .context("a Lua script path without a file name")?;
                std::fs::copy(script, scripts_dir.join(name))
                    .with_context(|| format!("copy {} into {}", script.display(), scripts_dir.display()))?;
            }
            // The guard starts SITL, then waits for its stdin to close and stops it. A start that
            // failed (not listening in time) may leave the autopilot running: stopped as well.
            let mut guard = Command::new("bash")
                .arg("-c")
                .arg(concat!(
                    r#"dir=$2; stop() { kill $(cat "$dir/pids" 2>/dev/null) 2>/dev/null; rm -f "$dir/pids"; }; "#,
                    r#""$1/start-sitl.sh" "$dir" "$3" || { stop; exit 1; }; read -r _; stop"#
                ))
                .arg("sitl-guard")
                .arg(&ardupilot)
                .arg(dir.path())
                .arg(instance.to_string())
                .env("SITL_SPEEDUP", speedup.to_string())
                .env("SITL_DEFAULTS", &defaults)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("run {}/start-sitl.sh", ardupilot.display()))?;
            let stdout = guard.stdout.take().context("SITL guard stdout")?;
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .context("read start-sitl.sh output")?;
            if line.starts_with("ready ") {
                return Ok(Some(Sitl { guard, instance, dir }));
            }
            // Lost a race for the ports, or SITL cannot run here.
            let out = guard.wait_with_output().context("wait for start-sitl.sh")?;
            last_error = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        bail!("ArduPilot SITL did not start: {last_error}")
    }

    /// The agent's `flight.mavlink` address: SERIAL0.
    pub fn agent_address(&self) -> String {
        format!("tcpout:127.0.0.1:{}", 5760 + 10 * self.instance)
    }

    /// Starts a pilot on SERIAL1 (returns once it heard the autopilot).
    pub fn pilot(&self) -> Result<Pilot> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sitl/pilot.py");
        let address = format!("tcp:127.0.0.1:{}", 5762 + 10 * self.instance);
        Ok(Pilot(Scripted::start(&script, &[address])?))
    }

    /// The autopilot's own output (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("inst{}/sitl.log", self.instance)))
            .unwrap_or_default()
    }
}

impl Drop for Sitl {
    fn drop(&mut self) {
        // Closing the guard's stdin makes it stop the autopilot.
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// The pilot flying the SITL copter.
pub struct Pilot(Scripted);

impl Pilot {
    /// GUIDED, arm (retried until the autopilot allows it) and take off to `metres`.
    pub fn take_off(&mut self, metres: u32) -> Result<()> {
        self.0
            .send_within(&format!("takeoff {metres}"), Duration::from_mins(3))
    }

    /// Tries to arm (in GUIDED) until the autopilot refuses with a STATUSTEXT holding `text`;
    /// an error if it arms instead (it is disarmed again) or never says so.
    pub fn arm_refused(&mut self, text: &str) -> Result<()> {
        self.0
            .send_within(&format!("refused {text}"), Duration::from_mins(3))
    }

    /// LAND, and wait until the autopilot disarmed itself after touchdown.
    pub fn land(&mut self) -> Result<()> {
        self.0.send_within("land", Duration::from_mins(4))
    }
}
