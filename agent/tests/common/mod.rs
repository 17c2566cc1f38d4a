//! A simulated device for the agent's integration tests: a temp dir with keys, `agent.toml`, file
//! slots and hook scripts, driven through the real `flightnode-agent` binary.
#![allow(dead_code, reason = "each test binary uses a different part of it")]

use flightnode_tests::fleet::wait_until;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub mod flight;

pub const BIN: &str = env!("CARGO_BIN_EXE_flightnode-agent");
pub const HARDWARE: &str = "cc-test-v1";

pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

pub fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run flightnode-agent")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Extra config appended to the generated `agent.toml`.
#[derive(Default)]
pub struct Options {
    pub health: Option<String>,
    /// `health.timeout`; 20 s when `None`.
    pub health_timeout: Option<String>,
    pub extra: String,
    pub factory_version: Option<String>,
}

impl Device {
    pub fn new(opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        let o = agent(&["keygen", "--out-dir", &p.join("keys").display().to_string()]);
        assert!(o.status.success(), "keygen: {}", text(&o));
        std::fs::create_dir_all(p.join("slots")).unwrap();
        std::fs::write(p.join("slots/a.img"), b"factory image").unwrap();
        let apply = p.join("apply.sh");
        std::fs::write(
            &apply,
            format!(
                "#!/bin/sh\necho \"$FLIGHTNODE_SLOT $FLIGHTNODE_VERSION $1\" >> {}\n",
                p.join("applied.log").display()
            ),
        )
        .unwrap();
        make_executable(&apply);
        let health = opts.health.unwrap_or_else(|| "true".into());
        let health_timeout = opts.health_timeout.unwrap_or_else(|| "20s".into());
        let config = p.join("agent.toml");
        let factory = opts.factory_version.unwrap_or_else(|| "1.0.0".into());
        std::fs::write(
            &config,
            format!(
                r#"device_id = "drone-test"
hardware = "{HARDWARE}"
state_dir = "{state}"
trusted_keys = ["{key}"]
factory_version = "{factory}"
[slots]
backend = "file"
a = "{a}"
b = "{b}"
[health]
command = '{health}'
timeout = "{health_timeout}"
[download]
idle_timeout = "2s"
retries = 2
backoff = "100ms"
checkpoint_bytes = 65536
{extra}
"#,
                state = p.join("state").display(),
                key = p.join("keys/release.pub").display(),
                a = p.join("slots/a.img").display(),
                b = p.join("slots/b.img").display(),
                extra = if opts.extra.contains("[activation]") {
                    opts.extra.clone()
                } else {
                    format!(
                        "[activation]\napply_command = \"{}\"\n{}",
                        apply.display(),
                        opts.extra
                    )
                },
            ),
        )
        .unwrap();
        Device { dir, config }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn key(&self) -> PathBuf {
        self.path("keys/release.key")
    }

    /// Runs a subcommand with this device's config.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run flightnode-agent")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// Writes an image of `len` pseudo-random bytes and bundles it as `version`.
    pub fn bundle(&self, name: &str, version: &str, len: usize, extra: &[&str]) -> PathBuf {
        let image = self.path(&format!("{name}.img"));
        std::fs::write(&image, image_bytes(version, len)).unwrap();
        self.bundle_image(name, &image, version, extra)
    }

    pub fn bundle_image(&self, name: &str, image: &Path, version: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(&format!("{name}.fnb"));
        let key = self.key().display().to_string();
        let mut args = vec![
            "bundle",
            "create",
            "--key",
            &key,
            "--image",
            image.to_str().unwrap(),
            "--version",
            version,
            "--output",
            out.to_str().unwrap(),
        ];
        if !extra.contains(&"--compatible") {
            args.extend(["--compatible", HARDWARE]);
        }
        args.extend(extra);
        let o = agent(&args);
        assert!(o.status.success(), "bundle create: {}", text(&o));
        out
    }

    pub fn status(&self) -> Value {
        let o = self.run(&["status", "--json"]);
        assert!(o.status.success(), "status: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("status JSON")
    }

    /// Where `current` points.
    pub fn pointer(&self) -> PathBuf {
        std::fs::read_link(self.path("state/current")).expect("current pointer")
    }

    pub fn slot_bytes(&self, slot: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("slots/{slot}.img"))).unwrap_or_default()
    }

    /// The log of the last [`Daemon`] started on this device.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// Waits (at most a minute) until the daemon's log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        assert!(
            wait_until(Duration::from_mins(1), Duration::from_millis(50), || {
                self.log().contains(needle)
            }),
            "the daemon never logged {needle:?}:\n{}",
            self.log()
        );
    }

    pub fn applied(&self) -> String {
        std::fs::read_to_string(self.path("applied.log")).unwrap_or_default()
    }

    /// The device is consistent and bootable: the active slot is good, holds the committed
    /// version, and the pointer names it.
    pub fn assert_bootable(&self) {
        let s = self.status();
        let active = s["active_slot"].as_str().unwrap().to_owned();
        assert_eq!(
            s["slots"][&active]["state"], "good",
            "active slot must be good: {s:#}"
        );
        assert_eq!(s["slots"][&active]["version"], s["committed_version"], "{s:#}");
        if s["phase"] == "idle" {
            assert_eq!(self.pointer(), self.path(&format!("slots/{active}.img")), "{s:#}");
        }
    }
}

pub fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Deterministic pseudo-random image content, different per version.
pub fn image_bytes(version: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = version.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A `flightnode-agent run` process; killed on drop.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Starts the daemon with extra environment and waits for its control socket.
    pub fn start_with(dev: &Device, env: &[(&str, &str)]) -> Daemon {
        // A killed daemon leaves its socket file behind; wait for the new one.
        let _ = std::fs::remove_file(dev.path("state/agent.sock"));
        let log = std::fs::File::create(dev.path("daemon.log")).unwrap();
        let mut cmd = dev.cmd(&["run"]);
        cmd.stdout(std::process::Stdio::null()).stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !dev.path("state/agent.sock").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon never opened its control socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Daemon(child)
    }

    pub fn start(dev: &Device) -> Daemon {
        Self::start_with(dev, &[])
    }

    /// Starts the daemon and waits until it subscribed to its upgrade topic. The broker keeps
    /// nothing for a client it never saw: a command published before that first subscription
    /// is lost, which on a loaded machine can happen well after the control socket is up.
    pub fn start_subscribed(dev: &Device) -> Daemon {
        let d = Self::start_with(dev, &[("RUST_LOG", "info,flightnode_agent::mqtt=debug")]);
        dev.wait_log("mqtt: subscribed");
        d
    }

    /// Waits for the daemon to end; `None` when it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, Duration::from_millis(100), || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// SIGTERM, then waits (at most 30 s) for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id().cast_signed(), libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "SIGTERM must stop the daemon"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// One device directory per bootloader the reboot-mode tests run against: the U-Boot, GRUB and
/// script simulators, and real U-Boot under qemu (absent only with FLIGHTNODE_SKIP_UBOOT_QEMU=1).
pub fn sims(dir: &Path) -> Vec<flightnode_tests::boot_sim::SimBoot> {
    use flightnode_tests::boot_sim::SimBoot;
    let mk = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut sims = vec![
        SimBoot::uboot(&mk("uboot")).unwrap(),
        SimBoot::grub(&mk("grub")).unwrap(),
        SimBoot::script(&mk("script")).unwrap(),
    ];
    sims.extend(SimBoot::uboot_qemu(&mk("uboot-qemu")).unwrap());
    sims
}
