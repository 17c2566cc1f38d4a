//! Exponential back-off: the one rule every retry loop uses (agent downloads, MQTT reconnects,
//! the hub link, the hub's status writes). Pure: the caller brings the randomness for jitter.

use std::time::Duration;

/// The delay before retry `attempt` (1-based; 0 counts as 1): `base`, doubling with each
/// attempt, never above `cap`.
pub fn exponential(base: Duration, attempt: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(cap)
}

/// "Equal jitter": half of `delay` plus `unit` (0..=1, from the caller's RNG) of the other half,
/// so retries of many clients spread out but none comes back sooner than half the delay.
pub fn equal_jitter(delay: Duration, unit: f64) -> Duration {
    let half = delay / 2;
    half + delay.saturating_sub(half).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_up_to_the_cap() {
        let ms = Duration::from_millis;
        let cap = ms(30_000);
        for (attempt, want) in [
            (0, ms(200)),
            (1, ms(200)),
            (2, ms(400)),
            (3, ms(800)),
            (8, ms(25_600)),
            (9, cap),
            (u32::MAX, cap),
        ] {
            assert_eq!(exponential(ms(200), attempt, cap), want, "attempt {attempt}");
        }
        assert_eq!(exponential(Duration::ZERO, 5, cap), Duration::ZERO);
    }

    #[test]
    fn equal_jitter_stays_between_half_and_the_whole_delay() {
        let d = Duration::from_secs(1);
        for (unit, want) in [(0.0, 500), (0.5, 750), (1.0, 1000), (-3.0, 500), (7.0, 1000)] {
            assert_eq!(equal_jitter(d, unit), Duration::from_millis(want), "unit {unit}");
        }
    }
}
