//! The time TUF expiry is checked against.
//!
//! A drone's clock may be wrong (no RTC battery, a GPS fix not yet taken), and a wrong clock
//! either refuses good metadata or accepts expired metadata. [`trusted_now`] is the one place
//! the agent asks for that time; a trusted clock (GPS or hub-signed time with a persisted floor)
//! replaces its body, and every expiry check follows.

use chrono::{DateTime, Utc};

/// The time every TUF role's `expires` is compared with. For now the system clock.
pub fn trusted_now() -> DateTime<Utc> {
    Utc::now()
}
