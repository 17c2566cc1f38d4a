//! The flight gate against a flight controller nobody here wrote: pymavlink streaming HEARTBEAT,
//! EXTENDED_SYS_STATE and BATTERY_STATUS over UDP (`flightnode_tests::fc_standin`), the daemon
//! with a real mosquitto. No switch, apply or reboot may happen while the vehicle is armed or in
//! the air, and every upgrade ends correctly once it lands.

mod common;
use common::*;
use flightnode_tests::fc_standin::{Vehicle, free_udp_port};
use flightnode_tests::fleet::wait_until;
use flightnode_tests::http_server::BundleServer;
use flightnode_tests::mosquitto::{Mosquitto, Subscriber};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(1);
const POLL: Duration = Duration::from_millis(100);
const STATUS: &str = "firmware/drone-test/status";
const UPGRADE: &str = "firmware/drone-test/upgrade";

struct Rig {
    broker: Mosquitto,
    dev: Device,
    sub: Subscriber,
    srv: BundleServer,
    port: u16,
}

impl Rig {
    /// A device whose `[flight]` section is `flight` plus `mavlink = udpin:<port>` (unless `flight`
    /// names its own gate), with `extra` config, serving bundle 2.0.0. `@DIR@` in the config
    /// stands for the device's directory.
    fn new(flight: &str, extra: &str, health: &str) -> Rig {
        let broker = Mosquitto::start().unwrap();
        let port = free_udp_port().unwrap();
        let link = if flight.contains("gate_command") {
            String::new()
        } else {
            format!("mavlink = \"udpin:127.0.0.1:{port}\"\n")
        };
        let dev = Device::new(Options {
            health: Some(health.into()),
            extra: format!(
                "{extra}[commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n[flight]\n{link}stale_after = \"1s\"\n{flight}\n",
                broker.url()
            ),
            ..Options::default()
        });
        let config = std::fs::read_to_string(&dev.config).unwrap();
        let config = config.replace("@DIR@", &dev.dir.path().display().to_string());
        std::fs::write(&dev.config, config).unwrap();
        let sub = broker.subscriber(STATUS).unwrap();
        let bundle = dev.bundle("v2", "2.0.0", 200_000, &[]);
        let srv = BundleServer::start_blocking().unwrap();
        srv.put_file("/fw.fnb", &bundle).unwrap();
        Rig {
            broker,
            dev,
            sub,
            srv,
            port,
        }
    }

    fn vehicle(&self, flags: &[&str]) -> Vehicle {
        Vehicle::start(self.port, flags).unwrap()
    }

    fn upgrade(&self, id: &str) {
        let payload = format!(
            r#"{{"type":"upgrade","upgrade_id":"{id}","url":"{}"}}"#,
            self.srv.url("/fw.fnb")
        );
        self.broker.publish(UPGRADE, payload.as_bytes(), false).unwrap();
    }

    fn cancel(&self, id: &str) {
        let payload = format!(r#"{{"type":"cancel","upgrade_id":"{id}"}}"#);
        self.broker.publish(UPGRADE, payload.as_bytes(), false).unwrap();
    }

    /// Waits for a report containing `needle`.
    fn wait(&self, needle: &str) {
        assert!(
            self.sub.wait_for(needle, WAIT),
            "never saw {needle}\nstatus topic:\n{}\ndaemon log:\n{}",
            self.sub.output(),
            self.dev.log()
        );
    }

    fn waiting(&self, reason: &str) {
        self.wait(&format!(r#""phase":"waiting","wait_reason":"{reason}""#));
    }

    /// Nothing reached the vehicle or the running system: no apply, `current` still on slot a.
    fn assert_untouched(&self) {
        assert_eq!(self.dev.applied(), "", "no apply while the gate is closed");
        assert_eq!(self.dev.pointer(), self.dev.path("slots/a.img"));
        let s = self.dev.status();
        assert_eq!(s["active_slot"], "a", "{s:#}");
        assert_eq!(s["committed_version"], "1.0.0", "{s:#}");
    }
}

/// Holds for a moment and checks the upgrade still waits with `reason`: the gate does not leak.
fn still_waiting(rig: &Rig, reason: &str) {
    std::thread::sleep(Duration::from_millis(1500));
    let s = rig.dev.status();
    assert_eq!(s["phase"], "waiting", "{s:#}");
    assert_eq!(s["wait_reason"], reason, "{s:#}");
    rig.assert_untouched();
}

#[test]
fn in_the_air_it_downloads_but_switches_only_once_landed_and_disarmed() {
    let rig = Rig::new("", "", "true");
    let _d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&["--in-air"]);
    rig.upgrade("up-fly");
    rig.waiting("in_air");
    // The download is not gated: the image is complete in slot b, staged, not switched.
    let s = rig.dev.status();
    assert_eq!(s["slots"]["b"]["version"], "2.0.0", "{s:#}");
    assert_eq!(rig.dev.slot_bytes("b"), image_bytes("2.0.0", 200_000));
    still_waiting(&rig, "in_air");

    v.send("land").unwrap();
    rig.waiting("armed");
    still_waiting(&rig, "armed");

    v.send("disarm").unwrap();
    rig.wait(r#""result":"committed""#);
    assert_eq!(rig.dev.applied().lines().count(), 1, "{}", rig.dev.applied());
    assert!(rig.dev.applied().contains("b 2.0.0"));
    assert_eq!(rig.dev.status()["committed_version"], "2.0.0");
    rig.dev.assert_bootable();
}

#[test]
fn armed_mid_download_holds_the_switch() {
    let rig = Rig::new("", "", "true");
    // The download stalls halfway until the vehicle is armed; then it resumes and completes.
    rig.srv.set_fault(
        "/fw.fnb",
        flightnode_tests::http_server::Fault::Stall { after: 100_000 },
    );
    let _d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&[]);
    rig.upgrade("up-arm");
    rig.wait(r#""upgrade_id":"up-arm","phase":"downloading""#);
    v.send("arm").unwrap();
    rig.srv.clear_fault("/fw.fnb");
    rig.waiting("armed");
    still_waiting(&rig, "armed");
    v.send("disarm").unwrap();
    rig.wait(r#""result":"committed""#);
    assert!(rig.dev.applied().contains("b 2.0.0"));
}

#[test]
fn in_the_air_during_a_rollback_it_waits_to_re_apply() {
    // The health check fails once the test says so, after the vehicle took off.
    let rig = Rig::new(
        "",
        "",
        "while [ ! -f @DIR@/fail-now ]; do sleep 0.1; done; exit 1",
    );
    let _d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&[]);
    rig.upgrade("up-rb");
    rig.wait(r#""upgrade_id":"up-rb","phase":"testing""#);
    // "testing" is reported before the apply hook runs: take off only once it has, or the gate
    // would hold the apply instead of the rollback.
    assert!(
        wait_until(WAIT, POLL, || rig.dev.applied().lines().count() == 1),
        "the new slot was never applied"
    );
    v.send("takeoff").unwrap();
    // The health check fails within 0.1 s of `fail-now`: the agent must know it is flying first.
    wait_flight_state(&rig, "in-air", "the agent never saw the takeoff");
    std::fs::write(rig.dev.path("fail-now"), b"").unwrap();
    rig.waiting("in_air");
    std::thread::sleep(Duration::from_millis(1500));
    let s = rig.dev.status();
    assert_eq!(
        (&s["phase"], &s["wait_reason"]),
        (&"waiting".into(), &"in_air".into()),
        "{s:#}"
    );
    assert_eq!(
        rig.dev.applied().lines().count(),
        1,
        "the old slot is not re-applied in the air: {}",
        rig.dev.applied()
    );
    v.send("land").unwrap();
    v.send("disarm").unwrap();
    rig.wait(r#""result":"rolled_back""#);
    let applied = rig.dev.applied();
    assert_eq!(applied.lines().count(), 2, "{applied}");
    assert!(
        applied.lines().nth(1).unwrap().starts_with("a 1.0.0"),
        "{applied}"
    );
    rig.dev.assert_bootable();
}

/// Waits until the daemon's log says the flight state changed to `observed` ("disarmed",
/// "in-air" or "unknown": words no other field of that line prints; the log may carry colour
/// codes around the field names).
fn wait_flight_state(rig: &Rig, observed: &str, failure: &str) {
    let changed = || {
        rig.dev
            .log()
            .lines()
            .any(|l| l.contains("flight state changed") && l.contains(observed))
    };
    assert!(wait_until(WAIT, POLL, changed), "{failure}");
}

#[test]
fn lost_link_is_unknown_and_waits_until_the_heartbeat_returns() {
    let rig = Rig::new("", "", "true");
    let _d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&[]);
    // Silence before the first HEARTBEAT arrived would leave the state unknown from the start,
    // with no change to notice: hear the vehicle first.
    wait_flight_state(&rig, "disarmed", "the agent never heard the vehicle");
    v.send("silence").unwrap();
    // The upgrade must arrive after the agent noticed the silence (stale_after), or it would
    // still see the last fresh "disarmed" and switch.
    wait_flight_state(&rig, "unknown", "the agent never noticed the lost link");
    rig.upgrade("up-lost");
    rig.waiting("flight_state_unknown");
    still_waiting(&rig, "flight_state_unknown");
    v.send("resume").unwrap();
    rig.wait(r#""result":"committed""#);
}

#[test]
fn low_battery_waits() {
    let rig = Rig::new("min_battery_percent = 30", "", "true");
    let _d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&["--battery", "12"]);
    rig.upgrade("up-bat");
    rig.waiting("battery_low");
    still_waiting(&rig, "battery_low");
    v.send("battery 80").unwrap();
    rig.wait(r#""result":"committed""#);
}

#[test]
fn max_wait_ends_with_flight_gate_timeout_and_the_old_firmware_untouched() {
    let rig = Rig::new("max_wait = \"3s\"", "", "true");
    let _d = Daemon::start_subscribed(&rig.dev);
    let _v = rig.vehicle(&["--in-air"]);
    rig.upgrade("up-late");
    rig.waiting("in_air");
    rig.wait(r#""result":"failed","error":{"code":"flight_gate_timeout""#);
    rig.assert_untouched();
    let s = rig.dev.status();
    assert_eq!(s["phase"], "idle");
    assert_eq!(s["last_upgrade"]["error"]["code"], "flight_gate_timeout", "{s:#}");
    rig.dev.assert_bootable();
}

#[test]
fn cancel_while_waiting_ends_canceled() {
    let rig = Rig::new("", "", "true");
    let _d = Daemon::start_subscribed(&rig.dev);
    let _v = rig.vehicle(&["--in-air"]);
    rig.upgrade("up-stop");
    rig.waiting("in_air");
    rig.cancel("up-stop");
    rig.wait(r#""upgrade_id":"up-stop","phase":"idle","progress":null,"result":"canceled""#);
    rig.assert_untouched();
    rig.dev.assert_bootable();
}

#[test]
fn kill_9_while_waiting_comes_back_waiting() {
    let rig = Rig::new("", "", "true");
    let mut d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&["--in-air"]);
    rig.upgrade("up-cut");
    rig.waiting("in_air");
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    drop(d);
    let _d = Daemon::start_subscribed(&rig.dev);
    // Persisted: it comes back waiting, and the gate still holds (nothing applied).
    still_waiting(&rig, "in_air");
    v.send("land").unwrap();
    v.send("disarm").unwrap();
    rig.wait(r#""result":"committed""#);
    assert_eq!(rig.dev.applied().lines().count(), 1, "{}", rig.dev.applied());
}

#[test]
fn gate_command_for_boards_without_mavlink() {
    let rig = Rig::new(
        "gate_command = 'test -f @DIR@/safe || { echo armed; exit 1; }'",
        "",
        "true",
    );
    let _d = Daemon::start_subscribed(&rig.dev);
    rig.upgrade("up-cmd");
    rig.waiting("armed");
    still_waiting(&rig, "armed");
    std::fs::write(rig.dev.path("safe"), b"").unwrap();
    rig.wait(r#""result":"committed""#);
}

#[test]
fn reboot_mode_does_not_reboot_in_the_air() {
    let root = tempfile::tempdir().unwrap();
    let sim = flightnode_tests::boot_sim::SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    let marker = root.path().join("rebooted");
    let rig = Rig::new(
        "",
        &format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"touch {}; kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            marker.display(),
            sim.boot_toml()
        ),
        "true",
    );
    let mut d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&["--in-air"]);
    rig.upgrade("up-boot");
    rig.waiting("in_air");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!marker.exists(), "no reboot in the air");
    assert_eq!(rig.dev.status()["phase"], "waiting");
    v.send("land").unwrap();
    v.send("disarm").unwrap();
    let status = d
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the reboot command never ended the daemon:\n{}", rig.dev.log()));
    assert_eq!(status.signal(), Some(9), "the reboot command ends the daemon");
    assert!(marker.exists());
    drop(d);
    assert_eq!(sim.power_on().unwrap(), 'B', "the trial boots the new slot");
    let _d = Daemon::start_subscribed(&rig.dev);
    rig.wait(r#""result":"committed""#);
    assert_eq!(rig.dev.status()["booted_slot"], "b");
}

/// A reboot-mode rig on `sim`: the reboot command touches `rebooted` in the device directory and
/// ends the daemon, as a reboot would.
fn reboot_rig(sim: &flightnode_tests::boot_sim::SimBoot, health: &str) -> Rig {
    Rig::new(
        "",
        &format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"touch @DIR@/rebooted; kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            sim.boot_toml()
        ),
        health,
    )
}

/// One variable of the bootloader's environment, read with the real tool (`None` when unset).
fn boot_var(sim: &flightnode_tests::boot_sim::SimBoot, key: &str) -> Option<String> {
    sim.vars().unwrap().remove(key)
}

/// Issue 21 a: the trial slot came up, a power cut ended its boot during the health check, the
/// bootloader fell back to slot a, and meanwhile the vehicle took off. Slot a's agent must not
/// arm the trial again nor reboot the companion computer until the vehicle has landed.
#[test]
fn a_trial_retry_in_the_air_neither_re_arms_nor_reboots() {
    let root = tempfile::tempdir().unwrap();
    let sim = flightnode_tests::boot_sim::SimBoot::uboot(root.path()).unwrap();
    assert_eq!(sim.power_on().unwrap(), 'A');
    // The first health check on slot b is cut short by a "power cut" (the agent is killed).
    let rig = reboot_rig(
        &sim,
        "if [ \"$FLIGHTNODE_SLOT\" = b ] && [ ! -e @DIR@/cut ]; then touch @DIR@/cut; kill -9 $FLIGHTNODE_AGENT_PID; exit 1; fi; true",
    );
    let rebooted = rig.dev.path("rebooted");
    let mut v = rig.vehicle(&[]);
    let mut d = Daemon::start_subscribed(&rig.dev);
    rig.upgrade("up-retry");
    let ended = |d: &mut Daemon, what: &str| {
        let status = d
            .wait_exit(WAIT)
            .unwrap_or_else(|| panic!("{what} never ended the daemon:\n{}", rig.dev.log()));
        assert_eq!(status.signal(), Some(9), "{what}:\n{}", rig.dev.log());
    };
    ended(&mut d, "the reboot into the trial");
    std::fs::remove_file(&rebooted).unwrap();
    drop(d);
    assert_eq!(sim.power_on().unwrap(), 'B', "the trial boots the new slot");
    // The agent's start on slot b: killed in its health check, before a daemon would be up.
    let o = rig.dev.run(&["resume"]);
    assert_eq!(
        o.status.signal(),
        Some(9),
        "power cut in the health check: {}",
        text(&o)
    );
    assert!(rig.dev.path("cut").exists() && !rebooted.exists());
    v.send("takeoff").unwrap();
    // The one trial attempt is used up: the bootloader returns to slot a, in the air.
    assert_eq!(sim.power_on().unwrap(), 'A');
    let mut d = Daemon::start_subscribed(&rig.dev);
    rig.waiting("in_air");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!rebooted.exists(), "no reboot in the air:\n{}", rig.dev.log());
    assert_eq!(
        boot_var(&sim, "BOOT_B_LEFT").as_deref(),
        Some("0"),
        "the trial is not armed again in the air"
    );
    let s = rig.dev.status();
    assert_eq!(
        (&s["phase"], &s["booted_slot"]),
        (&"waiting".into(), &"a".into()),
        "{s:#}"
    );
    v.send("land").unwrap();
    v.send("disarm").unwrap();
    ended(&mut d, "the reboot into the retried trial");
    assert!(rebooted.exists());
    drop(d);
    assert_eq!(
        sim.power_on().unwrap(),
        'B',
        "the retried trial boots the new slot"
    );
    let _d = Daemon::start_subscribed(&rig.dev);
    rig.wait(r#""result":"committed""#);
    assert_eq!(rig.dev.status()["booted_slot"], "b");
}

/// Issue 21 b: the image is staged and the upgrade waits for a landing when the board is power
/// cycled (on the bench, in the hangar). The next start confirms the slot that runs before it
/// waits again: U-Boot's `BOOT_A_LEFT` is refilled and GRUB's `A_TRY` reset, so the power-ons
/// that follow never run the counter down (GRUB: the very next one would boot the rescue system).
#[test]
fn a_power_cycle_while_waiting_to_switch_confirms_the_running_slot() {
    let root = tempfile::tempdir().unwrap();
    for (name, key, confirmed, tried) in [("uboot", "BOOT_A_LEFT", "3", "2"), ("grub", "A_TRY", "0", "1")] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let sim = if name == "grub" {
            flightnode_tests::boot_sim::SimBoot::grub(&dir)
        } else {
            flightnode_tests::boot_sim::SimBoot::uboot(&dir)
        }
        .unwrap();
        assert_eq!(sim.power_on().unwrap(), 'A', "{name}");
        let rig = reboot_rig(&sim, "true");
        let _v = rig.vehicle(&["--in-air"]);
        let mut d = Daemon::start_subscribed(&rig.dev);
        rig.upgrade("up-cycle");
        rig.waiting("in_air");
        assert_eq!(
            rig.dev.status()["slots"]["b"]["version"],
            "2.0.0",
            "{name}: staged"
        );
        for cycle in 1..=2 {
            d.0.kill().unwrap();
            d.0.wait().unwrap();
            drop(d);
            assert_eq!(sim.power_on().unwrap(), 'A', "{name}: power-on {cycle}");
            assert_eq!(
                boot_var(&sim, key).as_deref(),
                Some(tried),
                "{name}: power-on {cycle}"
            );
            d = Daemon::start_subscribed(&rig.dev);
            let env_confirmed = || boot_var(&sim, key).as_deref() == Some(confirmed);
            assert!(
                wait_until(WAIT, POLL, env_confirmed),
                "{name}: after power-on {cycle} slot a was never confirmed ({key}={:?}):\n{}",
                boot_var(&sim, key),
                rig.dev.log()
            );
            let s = rig.dev.status();
            assert_eq!(
                (&s["phase"], &s["wait_reason"], &s["booted_slot"]),
                (&"waiting".into(), &"in_air".into(), &"a".into()),
                "{name}: {s:#}"
            );
        }
        assert!(!rig.dev.path("rebooted").exists(), "{name}: no reboot in the air");
    }
}

/// Issue 24, flights since commit: a takeoff → landing cycle on the flight controller is one
/// flight of the running image, kept across a `kill -9`, and a committed upgrade starts the new
/// image from zero.
#[test]
fn flights_are_counted_per_image_and_survive_a_kill_9() {
    let rig = Rig::new("", "", "true");
    let mut d = Daemon::start_subscribed(&rig.dev);
    let mut v = rig.vehicle(&[]);
    let flights = |rig: &Rig| {
        let s = rig.dev.status();
        (
            s["flights"]["flights"].as_u64(),
            s["flights"]["airborne_secs"].as_u64(),
        )
    };
    wait_flight_state(&rig, "disarmed", "the vehicle never showed on the ground");
    assert_eq!(flights(&rig), (Some(0), Some(0)), "no flight yet");
    v.send("takeoff").unwrap();
    wait_flight_state(&rig, "in-air", "the vehicle never showed in the air");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(flights(&rig).0, Some(0), "a flight counts once it lands");
    v.send("land").unwrap();
    v.send("disarm").unwrap();
    assert!(
        wait_until(WAIT, POLL, || flights(&rig).0 == Some(1)),
        "the landing was not counted: {:?}\n{}",
        flights(&rig),
        rig.dev.log()
    );
    assert!(flights(&rig).1 >= Some(1), "{:?}", flights(&rig));
    // Kept in the store: a SIGKILL loses nothing.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    drop(d);
    let _d = Daemon::start_subscribed(&rig.dev);
    assert_eq!(flights(&rig).0, Some(1), "the count did not survive kill -9");
    // A new image proves itself from zero.
    rig.upgrade("up-new-image");
    rig.wait(r#""result":"committed""#);
    assert!(
        wait_until(WAIT, POLL, || flights(&rig) == (Some(0), Some(0))),
        "the new image did not start from zero: {:?}",
        flights(&rig)
    );
}

/// PX4's arm authorisation (`COM_ARM_AUTH_REQ 1`, `COM_ARM_AUTH_ID` = the vehicle's system id)
/// against the agent as the authoriser, with the stand-in asking as PX4 does: granted for a few
/// seconds while nothing is installed, denied (with a STATUSTEXT saying why) while the new image
/// is on trial, granted after the commit; denied while the flight controller runs firmware the
/// running image's bundle does not allow, granted once it does. The same lock reaches an
/// ArduPilot script as NAMED_VALUE_INT FN_ARMLK.
#[test]
fn px4_arm_authorization_is_denied_during_an_install_and_for_the_wrong_autopilot() {
    let port = free_udp_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let g = flight::Gated::with(
        &format!("mavlink = \"udpin:127.0.0.1:{port}\"\nstale_after = \"1s\"\n"),
        Options {
            health: Some(format!("while [ ! -e {} ]; do sleep 0.1; done", go.display())),
            health_timeout: Some("10m".into()),
            ..Options::default()
        },
    );
    let mut fc = Vehicle::start(port, &["--px4"]).unwrap();
    g.wait_log_line(&["flight state changed", "disarmed"]);
    let granted = (Some((0, 5, 5)), Vec::<String>::new());
    assert_eq!(fc.authorize().unwrap(), granted, "idle: granted for 5 s");
    assert_eq!(fc.armlock().unwrap(), 0);

    let _install = g.install("2.0.0");
    let trial = || g.dev.status()["arm_lock"]["reason"] == "trial";
    assert!(wait_until(WAIT, POLL, trial), "{:#}", g.dev.status());
    let (ack, texts) = fc.authorize().unwrap();
    assert_eq!(
        ack,
        Some((2, 0, 0)),
        "on trial: denied (MAV_RESULT_DENIED, generic)"
    );
    assert!(
        texts
            .iter()
            .any(|t| t == "flightnode: no arming: 2.0.0 in slot b is on trial"),
        "the pilot is told why: {texts:?}"
    );
    assert!(
        wait_until(WAIT, POLL, || fc.armlock().unwrap() == 3),
        "FN_ARMLK is 3 (trial)"
    );
    std::fs::write(&go, b"").unwrap();
    let committed = || g.dev.status()["committed_version"] == "2.0.0";
    assert!(wait_until(WAIT, POLL, committed), "{:#}", g.dev.status());
    assert!(
        wait_until(WAIT, POLL, || fc.authorize().unwrap() == granted),
        "granted after the commit"
    );

    // 3.0.0 flies only with ArduPilot/PX4 4.7.x; the stand-in reports 4.5.7.
    let bundle = g
        .dev
        .bundle("v3", "3.0.0", 100_000, &["--autopilot", ">=4.7.0, <4.8.0"]);
    let out = g.dev.run(&["install", &bundle.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let mismatch = || g.dev.status()["arm_lock"]["reason"] == "autopilot_mismatch";
    assert!(wait_until(WAIT, POLL, mismatch), "{:#}", g.dev.status());
    assert_eq!(
        g.dev.status()["arm_lock"]["message"],
        "flight controller runs 4.5.7, firmware 3.0.0 needs >=4.7.0, <4.8.0"
    );
    assert_eq!(fc.authorize().unwrap().0, Some((2, 0, 0)));
    // The flight controller is flashed to a fitting version: arming is allowed again.
    fc.send("version 4.7.2").unwrap();
    let fits = || g.dev.status()["arm_lock"].is_null();
    assert!(wait_until(WAIT, POLL, fits), "{:#}", g.dev.status());
    assert!(wait_until(WAIT, POLL, || fc.authorize().unwrap() == granted));
    assert!(wait_until(WAIT, POLL, || fc.armlock().unwrap() == 0));
}
