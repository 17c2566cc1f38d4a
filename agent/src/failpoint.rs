//! Test-only crash points: `FLIGHTNODE_FAILPOINT=<name>` makes the agent SIGKILL itself there.
//!
//! Compiled only into debug builds (which is what `cargo test` runs); release builds have none.
//! Names are the journal steps (`verified`, `staged`, `switching`, …), `pointer_renamed` (after the
//! `current` rename, before its directory fsync), `download@N`, which fires once at least N image
//! bytes were written, and `grubenv-synced`/`grubenv-renamed` inside the GRUB backend's write (new
//! file fsynced but not renamed; renamed but directory not fsynced), and `command_queued` in the
//! daemon (an MQTT install accepted and kept in the store, not yet handed to the engine), and
//! `install_taken` (the engine thread took an install up, before the engine saved anything).

/// Dies with SIGKILL when the armed failpoint is `name`. Armed as `hold:<name>`, it holds the
/// calling thread there instead, until the file `FLIGHTNODE_FAILPOINT_RELEASE` names exists (at
/// most 2 min): a test can then do something in that exact window.
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var("FLIGHTNODE_FAILPOINT") {
        if v == name {
            die(name);
        } else if v.strip_prefix("hold:") == Some(name) {
            hold(name);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
fn hold(name: &str) {
    let release = std::env::var_os("FLIGHTNODE_FAILPOINT_RELEASE").map(std::path::PathBuf::from);
    eprintln!("failpoint {name}: holding");
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
    while release.as_ref().is_some_and(|r| !r.exists()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("failpoint {name}: released");
}

/// Dies with SIGKILL when `download@N` is armed and `written >= N`.
#[inline]
pub fn download(written: u64) {
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var("FLIGHTNODE_FAILPOINT")
        && let Some(n) = v.strip_prefix("download@").and_then(|n| n.parse::<u64>().ok())
        && written >= n
    {
        die(&v);
    }
    #[cfg(not(debug_assertions))]
    let _ = written;
}

#[cfg(debug_assertions)]
fn die(name: &str) {
    eprintln!("failpoint {name}: SIGKILL");
    // SAFETY: sending a signal to ourselves.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}
