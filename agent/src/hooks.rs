//! Running the configured apply, health and reboot commands: `sh -c`, an environment that names the
//! slot, a timeout that kills the whole process group ([`crate::child`]).

use crate::child::{self, ChildError};
use flightnode_proto::Slot;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What a hook is for, used in messages.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    /// `activation.apply_command`.
    Apply,
    /// `health.command`.
    Health,
    /// `activation.reboot_command`.
    Reboot,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Apply => "apply command",
            Hook::Health => "health check",
            Hook::Reboot => "reboot command",
        })
    }
}

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("{hook} `{command}` could not be started")]
    Spawn {
        /// Which hook.
        hook: Hook,
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited non-zero or was killed by a signal.
    #[error("{hook} `{command}` failed ({status})")]
    Failed {
        /// Which hook.
        hook: Hook,
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
    },
    /// It ran past its timeout and was killed.
    #[error("{hook} `{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// Which hook.
        hook: Hook,
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
}

/// The slot a hook is about.
pub struct HookEnv<'a> {
    /// `FLIGHTNODE_SLOT`.
    pub slot: Slot,
    /// `FLIGHTNODE_SLOT_PATH`, also the first argument.
    pub path: &'a Path,
    /// `FLIGHTNODE_VERSION`.
    pub version: &'a str,
}

/// Runs `command` through `sh -c` and waits at most `timeout`. The apply command also gets the slot
/// path as its argument (`$1`); the others read it from `FLIGHTNODE_SLOT_PATH`.
/// Output goes to the agent's stderr, so it lands in the journal next to the agent's own lines.
pub fn run(hook: Hook, command: &str, env: &HookEnv<'_>, timeout: Duration) -> Result<(), HookError> {
    tracing::info!(slot = %env.slot, %command, "running {hook}");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(if matches!(hook, Hook::Apply) {
            format!("{command} \"$@\"")
        } else {
            command.to_owned()
        })
        .arg("flightnode-hook")
        .arg(env.path)
        .env("FLIGHTNODE_SLOT", env.slot.as_str())
        .env("FLIGHTNODE_SLOT_PATH", env.path)
        .env("FLIGHTNODE_VERSION", env.version)
        .env("FLIGHTNODE_AGENT_PID", std::process::id().to_string())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    match child::run(&mut cmd, None, timeout) {
        Ok(f) if f.status.success() => Ok(()),
        Ok(f) => Err(HookError::Failed {
            hook,
            command: command.to_owned(),
            status: f.status.to_string(),
        }),
        Err(ChildError::Timeout { .. }) => Err(HookError::Timeout {
            hook,
            command: command.to_owned(),
            timeout,
        }),
        Err(ChildError::Spawn(source) | ChildError::Wait(source)) => Err(HookError::Spawn {
            hook,
            command: command.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(path: &Path) -> HookEnv<'_> {
        HookEnv {
            slot: Slot::B,
            path,
            version: "1.2.3",
        }
    }

    #[test]
    fn hook_sees_slot_environment_and_argument() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!(
            "echo \"$FLIGHTNODE_SLOT $FLIGHTNODE_VERSION $1\" > {} && true",
            out.display()
        );
        run(
            Hook::Apply,
            &cmd,
            &env(Path::new("/dev/slot-b")),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "b 1.2.3 /dev/slot-b\n");
    }

    #[test]
    fn failing_and_hanging_hooks_are_errors() {
        let p = Path::new("/x");
        let err = run(Hook::Health, "exit 3", &env(p), Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, HookError::Failed { .. }), "{err}");
        let err = run(Hook::Health, "sleep 30", &env(p), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
    }
}
