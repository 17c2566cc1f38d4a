//! The time TUF expiry is checked against: the agent's trusted clock ([`crate::clock`]: GPS
//! time, else the hub's signed time, never earlier than the newest trusted time seen), as the
//! `DateTime` tough's metadata carries. A wrong system clock can neither refuse good metadata
//! (a clock a year behind) nor accept expired metadata once a trusted time was heard.

use crate::clock::Clock;
use chrono::{DateTime, Utc};

/// The time every TUF role's `expires` is compared with.
pub fn trusted_now(clock: &Clock) -> DateTime<Utc> {
    let now = clock.now();
    tracing::debug!(
        source = now.source.as_str(),
        unix_ms = now.unix_ms,
        "TUF expiry judged by the trusted clock"
    );
    DateTime::from_timestamp_millis(now.unix_ms).unwrap_or_else(Utc::now)
}
