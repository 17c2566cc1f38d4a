//! Child processes that must not hang the agent: the hooks and the bootloader tools
//! (`fw_setenv`, `grub-editenv`, boot scripts). Each runs in its own process group and is waited
//! for with a deadline; past it the whole group is SIGKILLed, so a tool stuck on a dead flash
//! chip, or a script's forgotten `sleep`, cannot keep the agent from reporting.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A child that exited by itself.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it printed, when stdout was piped (else empty).
    pub stdout: Vec<u8>,
    /// What it printed, when stderr was piped (else empty).
    pub stderr: Vec<u8>,
}

/// Why a child did not exit by itself.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// It could not be started.
    #[error("could not be started")]
    Spawn(#[source] std::io::Error),
    /// Waiting for it failed.
    #[error("waiting for it failed")]
    Wait(#[source] std::io::Error),
    /// It ran past the deadline; its process group was killed.
    #[error("did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// What it had printed on stderr by then (when piped).
        stderr: Vec<u8>,
    },
}

/// A pipe drained by a thread into a buffer that can be read at any time.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Drain {
    fn start(mut pipe: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                if let Ok(mut b) = sink.lock() {
                    b.extend_from_slice(&chunk[..n]);
                }
            }
        });
        Self { buf, thread }
    }

    fn take(&self) -> Vec<u8> {
        self.buf
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

/// Runs `cmd` in a new process group, feeding it `stdin` (else /dev/null), and waits at most
/// `timeout`. Piped stdout/stderr (set by the caller) are collected; inherited ones are not.
///
/// Past the deadline the whole group gets SIGKILL. A grandchild that left the group and still
/// holds a pipe cannot block us either: output is read by threads we stop waiting for.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Finished, ChildError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .process_group(0);
    let mut child = cmd.spawn().map_err(ChildError::Spawn)?;
    let deadline = Instant::now() + timeout;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A thread, so a tool that never reads its input cannot block us on a full pipe.
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = child.stdout.take().map(Drain::start);
    let err = child.stderr.take().map(Drain::start);
    let take = |d: &Option<Drain>| d.as_ref().map(Drain::take).unwrap_or_default();

    // Short sleeps first: most tools here finish within milliseconds.
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: plain syscall on the process group we created for this child.
                unsafe { libc::kill(-(child.id().cast_signed()), libc::SIGKILL) };
                let _ = child.wait();
                return Err(ChildError::Timeout {
                    timeout,
                    stderr: take(&err),
                });
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(ChildError::Wait(e)),
        }
    };
    // The pipes reach EOF once every holder exits; wait for that, but not past the deadline.
    while [&out, &err]
        .iter()
        .any(|d| d.as_ref().is_some_and(|d| !d.thread.is_finished()))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Finished {
        status,
        stdout: take(&out),
        stderr: take(&err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    #[test]
    fn output_and_status_are_collected() {
        let f = run(
            &mut sh("cat; echo oops >&2; exit 3"),
            Some(&b"in\n"[..]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(f.stdout, b"in\n");
        assert_eq!(f.stderr, b"oops\n");
        assert_eq!(f.status.code(), Some(3));
    }

    #[test]
    fn a_hanging_group_is_killed_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo started >&2; sleep 60 & echo $! > {}; wait",
            pidfile.display()
        );
        let err = run(&mut sh(&script), None, Duration::from_millis(500)).unwrap_err();
        match err {
            ChildError::Timeout { stderr, .. } => assert_eq!(stderr, b"started\n"),
            other => panic!("{other}"),
        }
        // The backgrounded grandchild was in the group and died too.
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Dead means gone or a zombie waiting for a reaper that is not ours.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        };
        while alive() {
            assert!(Instant::now() < deadline, "grandchild {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
