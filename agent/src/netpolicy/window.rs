//! `download.window`: the hours of local time in which bundles may be downloaded.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A daily window `HH:MM-HH:MM` in local time; the end is exclusive, and an end at or before the
/// start crosses midnight (`22:00-06:00` is ten hours a night). Equal ends are refused: it is
/// unclear whether that means always or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    /// Minutes after local midnight the window opens.
    pub start: u16,
    /// Minutes after local midnight it closes.
    pub end: u16,
}

impl Window {
    /// Whether minute-of-day `minute` (0..1440, local) is inside.
    pub fn contains(self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

fn hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.trim().len() == 5).then_some(h * 60 + m)
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("download.window {s:?} is not HH:MM-HH:MM (local time, 24-hour clock)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (hhmm(a).ok_or_else(bad)?, hhmm(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!(
                "download.window {s:?} opens and closes at the same minute; leave it out to allow every hour"
            ));
        }
        Ok(Window { start, end })
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

unsafe extern "C" {
    // POSIX; glibc and musl have it, the libc crate does not declare it.
    fn tzset();
}

/// Minutes since local midnight now, by the system's time zone (`TZ`, else /etc/localtime);
/// UTC when the local time cannot be had.
pub fn local_minute_of_day() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: zeroed `tm` is a valid out-parameter; localtime_r writes only into it. tzset reads
    // TZ and /etc/localtime, which localtime_r (unlike localtime) need not do by itself.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe {
        tzset();
        !libc::localtime_r(&raw const t, &raw mut tm).is_null()
    };
    if ok {
        u16::try_from(tm.tm_hour * 60 + tm.tm_min).unwrap_or(0)
    } else {
        u16::try_from(now % 86_400 / 60).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Result<Window, String> {
        Window::try_from(s.to_owned())
    }

    #[test]
    fn a_window_across_midnight_holds_the_night() {
        let night = w("22:00-06:00").unwrap();
        for (minute, inside) in [
            (0, true),
            (22 * 60 - 1, false),
            (22 * 60, true),
            (23 * 60 + 59, true),
            (5 * 60 + 59, true),
            (6 * 60, false),
            (12 * 60, false),
        ] {
            assert_eq!(night.contains(minute), inside, "{minute}");
        }
        let day = w("09:30-17:00").unwrap();
        assert!(!day.contains(9 * 60 + 29) && day.contains(9 * 60 + 30));
        assert!(day.contains(16 * 60 + 59) && !day.contains(17 * 60));
        assert_eq!(night.to_string(), "22:00-06:00");
    }

    #[test]
    fn malformed_windows_are_refused_with_the_value() {
        for bad in [
            "",
            "22:00",
            "24:00-06:00",
            "22:60-06:00",
            "2:00-06:00",
            "10:00-10:00",
            "ten-six",
        ] {
            let err = w(bad).unwrap_err();
            assert!(err.contains("download.window"), "{bad}: {err}");
        }
    }

    #[test]
    fn local_time_is_a_minute_of_the_day() {
        assert!(local_minute_of_day() < 1440);
    }
}
