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
    #[error("{hook} `{command}` failed ({status}){}", said(output))]
    Failed {
        /// Which hook.
        hook: Hook,
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// The end of what it printed ([`tail`]): why it failed, in its own words.
        output: String,
    },
    /// It ran past its timeout and was killed.
    #[error(
        "{hook} `{command}` did not finish within {timeout:?} and was killed{}",
        said(output)
    )]
    Timeout {
        /// Which hook.
        hook: Hook,
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
        /// The end of what it had printed by then.
        output: String,
    },
}

/// Lines and characters of a hook's output kept in its error: the error travels in the drone's
/// status and heartbeats up to its FlightNode (`status.lastUpgrade.errorMessage`), where an
/// operator reads why a drone rolled back.
const TAIL_LINES: usize = 5;
const TAIL_CHARS: usize = 400;

/// The last [`TAIL_LINES`] non-empty lines of `output`, at most [`TAIL_CHARS`] characters (the
/// end kept), joined with " | ".
pub fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ");
    let count = joined.chars().count();
    if count <= TAIL_CHARS {
        joined
    } else {
        let kept: String = joined.chars().skip(count - TAIL_CHARS).collect();
        format!("…{kept}")
    }
}

fn said(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; it said: {output}")
    }
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
/// Its output (stdout and stderr, in order) is collected: the end of it goes into the error when
/// the hook fails, and all of it to the agent's stderr once the hook ends, so it lands in the
/// journal next to the agent's own lines.
pub fn run(hook: Hook, command: &str, env: &HookEnv<'_>, timeout: Duration) -> Result<(), HookError> {
    tracing::info!(slot = %env.slot, %command, "running {hook}");
    let mut cmd = Command::new("/bin/sh");
    // NB: stdout joins stderr in the shell, so both come in order through one pipe, and a timeout
    // (which keeps only stderr) still has everything printed so far.
    cmd.arg("-c")
        .arg(if matches!(hook, Hook::Apply) {
            format!("exec 1>&2; {command} \"$@\"")
        } else {
            format!("exec 1>&2; {command}")
        })
        .arg("flightnode-hook")
        .arg(env.path)
        .env("FLIGHTNODE_SLOT", env.slot.as_str())
        .env("FLIGHTNODE_SLOT_PATH", env.path)
        .env("FLIGHTNODE_VERSION", env.version)
        .env("FLIGHTNODE_AGENT_PID", std::process::id().to_string())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let forward = |output: &[u8]| {
        use std::io::Write;
        // NB: best effort: the journal copy must not turn a hook's result into an error.
        let _ = std::io::stderr().lock().write_all(output);
    };
    match child::run(&mut cmd, None, timeout) {
        Ok(f) if f.status.success() => {
            forward(&f.stderr);
            Ok(())
        }
        Ok(f) => {
            forward(&f.stderr);
            Err(HookError::Failed {
                hook,
                command: command.to_owned(),
                status: f.status.to_string(),
                output: tail(&f.stderr),
            })
        }
        Err(ChildError::Timeout { stderr, .. }) => {
            forward(&stderr);
            Err(HookError::Timeout {
                hook,
                command: command.to_owned(),
                timeout,
                output: tail(&stderr),
            })
        }
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

    /// The end of a failing hook's output, stdout and stderr in order, is in its error: that is
    /// what reaches the FlightNode as the reason a drone rolled back.
    #[test]
    fn a_failing_hook_says_why_in_its_error() {
        let p = Path::new("/x");
        let script =
            "for i in 1 2 3 4 5 6; do echo \"line $i\"; done; echo 'gps: no 3D fix after 30 s' >&2; exit 1";
        let err = run(Hook::Health, script, &env(p), Duration::from_secs(10)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.ends_with("; it said: line 3 | line 4 | line 5 | line 6 | gps: no 3D fix after 30 s"),
            "{text}"
        );
        let err = run(
            Hook::Health,
            "echo 'waiting for the camera'; sleep 30",
            &env(p),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
        assert!(
            err.to_string().ends_with("it said: waiting for the camera"),
            "{err}"
        );
        // Long output keeps its end.
        let long = tail("x".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), TAIL_CHARS + 1);
        assert!(long.starts_with('…'));
        assert_eq!(tail(b"\n\n"), "");
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
