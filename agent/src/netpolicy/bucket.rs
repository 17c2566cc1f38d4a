//! A token bucket for `download.max_rate` / `download.metered_max_rate`: the HTTP task asks it
//! before handing each received chunk on, and sleeps for what it says. Not reading the socket is
//! what slows the sender (TCP flow control), so the link itself carries no more than the rate
//! plus the kernel's receive buffer.

use std::time::{Duration, Instant};

/// Bytes per second with a burst of one second's worth; time comes from the caller, so the
/// tests drive it with a clock of their own.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    /// Tokens (bytes) available; negative = debt the next wait pays off.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` bytes/s (at least 1) at `now`.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        Self {
            rate,
            tokens: rate as f64,
            last: now,
        }
    }

    /// The rate in bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` at `now` and says how long to wait before passing them on. A chunk larger
    /// than the burst is let through after the wait its size costs, never split.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_one_second_then_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert_eq!(b.take(1000, t0), Duration::ZERO, "the burst");
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // After waiting the 500 ms it asked for, the debt is paid, the bucket empty.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(250, t1), Duration::from_millis(250));
    }

    #[test]
    fn a_long_run_averages_the_rate_whatever_the_chunk_sizes() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::new(64 * 1024, t0);
        let mut sent = 0u64;
        for i in 0..2000u64 {
            let chunk = 1000 + (i * 7919) % 30_000;
            now += b.take(chunk, now);
            sent += chunk;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        // Everything after the first second's burst went at the rate.
        let rate = (sent - 64 * 1024) as f64 / secs;
        assert!((rate - 65536.0).abs() < 65536.0 * 0.01, "{rate} B/s");
    }

    #[test]
    fn idle_time_refills_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        assert_eq!(b.take(100, t0), Duration::ZERO);
        let later = t0 + Duration::from_hours(1);
        assert_eq!(b.take(100, later), Duration::ZERO);
        assert_eq!(b.take(50, later), Duration::from_millis(500));
        // A clock that goes back does not mint tokens.
        assert_eq!(b.take(50, t0), Duration::from_secs(1));
    }
}
