//! A device behind the flight gate, upgraded with `flightnode-agent install` through its running
//! daemon (no broker needed): what the MAVLink-link and real-autopilot tests drive.

use super::{Daemon, Device, Options};
use flightnode_tests::fleet::wait_until;
use std::process::Child;
use std::time::Duration;

/// Longest wait for anything the agent should do.
pub const WAIT: Duration = Duration::from_mins(1);
const POLL: Duration = Duration::from_millis(100);

/// A device with `[flight]` = `flight`, its daemon running.
pub struct Gated {
    pub dev: Device,
    pub daemon: Daemon,
}

/// An `install` in progress (it returns when the upgrade ended).
pub struct Install {
    child: Child,
    version: String,
}

impl Gated {
    pub fn new(flight: &str) -> Gated {
        Self::with(flight, Options::default())
    }

    /// A device with `[flight]` = `flight` and the rest of `opts`.
    pub fn with(flight: &str, opts: Options) -> Gated {
        let dev = Device::new(Options {
            extra: format!("[flight]\n{flight}\n{}", opts.extra),
            ..opts
        });
        let daemon = Daemon::start_with(&dev, &[("RUST_LOG", "info")]);
        Gated { dev, daemon }
    }

    /// Starts installing a new bundle of `version`.
    pub fn install(&self, version: &str) -> Install {
        let bundle = self.dev.bundle(version, version, 100_000, &[]);
        let out = std::fs::File::create(self.dev.path(&format!("install-{version}.log"))).unwrap();
        let child = self
            .dev
            .cmd(&["install", &bundle.display().to_string()])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Install {
            child,
            version: version.into(),
        }
    }

    /// Waits until the upgrade waits at the gate for `reason`, holds a moment, and checks it still
    /// does and nothing reached the vehicle or the running system.
    pub fn assert_held(&self, reason: &str) {
        let waiting = || {
            let s = self.dev.status();
            s["phase"] == "waiting" && s["wait_reason"] == reason
        };
        assert!(
            wait_until(WAIT, POLL, waiting),
            "the upgrade never waited for {reason}: {:#}\ndaemon log:\n{}",
            self.dev.status(),
            self.dev.log()
        );
        let applied = self.dev.applied();
        // The gate is asked every 200 ms: a leak would show within this.
        std::thread::sleep(Duration::from_millis(1500));
        let s = self.dev.status();
        assert_eq!(
            (&s["phase"], &s["wait_reason"]),
            (&"waiting".into(), &reason.into()),
            "{s:#}\ndaemon log:\n{}",
            self.dev.log()
        );
        assert_eq!(
            self.dev.applied(),
            applied,
            "nothing applied while the gate is closed"
        );
    }

    /// Waits until a line of the daemon's log holds all of `words` (the log may carry colour
    /// codes around field names: match values and messages).
    pub fn wait_log_line(&self, words: &[&str]) {
        let seen = || {
            self.dev
                .log()
                .lines()
                .any(|l| words.iter().all(|w| l.contains(w)))
        };
        assert!(
            wait_until(WAIT, POLL, seen),
            "the daemon never logged {words:?}; daemon log:\n{}",
            self.dev.log()
        );
    }
}

impl Install {
    /// Waits (at most `timeout`) for the install to end committed, and checks it was applied.
    pub fn committed(mut self, g: &Gated, timeout: Duration) {
        let mut done = None;
        wait_until(timeout, POLL, || {
            done = self.child.try_wait().unwrap();
            done.is_some()
        });
        let output = std::fs::read_to_string(g.dev.path(&format!("install-{}.log", self.version)));
        assert!(
            done.is_some_and(|s| s.success()),
            "install {} did not commit ({done:?}): {}\nstatus: {:#}\ndaemon log:\n{}",
            self.version,
            output.unwrap_or_default(),
            g.dev.status(),
            g.dev.log()
        );
        assert_eq!(g.dev.status()["committed_version"], self.version.as_str());
        assert!(
            g.dev.applied().contains(&format!("b {}", self.version))
                || g.dev.applied().contains(&format!("a {}", self.version)),
            "{}",
            g.dev.applied()
        );
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
