//! systemd integration (`Type=notify`): READY, WATCHDOG and STATUS. Without `NOTIFY_SOCKET` every
//! call is a no-op, so the daemon runs the same outside systemd.

use sd_notify::NotifyState;
use std::time::Duration;

/// READY=1 with a first status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=… (shown by `systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// WATCHDOG=1.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// How often to ping the watchdog: half of `WatchdogSec`, or `None` when it is off.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("systemd notify failed: {e}");
    }
}
