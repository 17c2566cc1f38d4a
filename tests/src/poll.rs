//! Waiting for a condition the tests observe from outside (a file, a port, a log line).

use std::time::{Duration, Instant};

/// Polls `done` every `every` until it holds or `timeout` passes; true when it held.
pub fn wait_until(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}
