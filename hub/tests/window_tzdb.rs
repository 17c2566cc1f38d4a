//! Maintenance windows on a hub image without a system time zone database: the test runs itself
//! again in a child process whose `TZDIR` is a directory without zones (what jiff then reads
//! instead of the system's copy), and there the zones still resolve, from the copy compiled into
//! the hub.

use flightnode_hub::api::rollout::{FirmwareRolloutSpec, MaintenanceWindow};
use flightnode_hub::decide::rollout_spec::validate;
use flightnode_hub::decide::window::{State, Windows, time_zone};

/// Set in the child process.
const CHILD: &str = "FLIGHTNODE_TZDB_CHILD";

#[test]
fn time_zones_resolve_without_a_system_database() -> anyhow::Result<()> {
    if std::env::var_os(CHILD).is_none() {
        let empty = tempfile::tempdir()?;
        // NB: jiff skips a TZDIR with no file at all and goes on to the system's directories.
        std::fs::write(empty.path().join("Placeholder"), b"not TZif")?;
        let out = std::process::Command::new(std::env::current_exe()?)
            .args([
                "time_zones_resolve_without_a_system_database",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("TZDIR", empty.path())
            .output()?;
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(out.status.success(), "the child process failed:\n{text}");
        anyhow::ensure!(text.contains("1 passed"), "the child ran no test:\n{text}");
        return Ok(());
    }
    // The system database is out of reach here, or this test proves nothing.
    anyhow::ensure!(
        jiff::tz::db().get("Europe/Berlin").is_err(),
        "jiff still finds a system time zone database"
    );
    let berlin = time_zone("Europe/Berlin").ok_or_else(|| anyhow::anyhow!("no Europe/Berlin"))?;
    let summer: jiff::Timestamp = "2026-07-01T12:00:00Z".parse()?;
    assert_eq!(berlin.to_offset(summer).seconds(), 7200);
    let window = MaintenanceWindow {
        schedule: "0 22 * * 1-5".into(),
        duration: "6h".into(),
        time_zone: "Europe/Berlin".into(),
    };
    let spec = FirmwareRolloutSpec {
        version: "2.0.0".into(),
        url: "http://fw.example/2.0.0.fnb".into(),
        maintenance_windows: vec![window.clone()],
        ..FirmwareRolloutSpec::default()
    };
    assert_eq!(validate(&spec), Ok(()));
    let windows = Windows::of(&[window]).map_err(|(i, e)| anyhow::anyhow!("[{i}]: {e}"))?;
    let saturday: jiff::Timestamp = "2026-12-05T12:00:00Z".parse()?;
    let State::Closed { opens: Some(opens) } = windows.state(saturday.as_second()) else {
        anyhow::bail!("not closed on a Saturday");
    };
    assert_eq!(opens.to_string(), "2026-12-07T22:00:00+01:00[Europe/Berlin]");
    Ok(())
}
