//! The arming interlock: while the agent writes a slot, switches, runs an unconfirmed trial or
//! rolls back, and while the flight controller runs firmware other than what the running image's
//! bundle declares, the vehicle must refuse to arm, and the pilot must see why.
//!
//! [`lock_of`] decides from the persisted state alone, so the lock is the same after a restart.
//! The MAVLink link carries it to the autopilot in two ways (see `docs/src/device/flight-gate.md`):
//! - **ArduPilot**: every [`ANNOUNCE`] (and at once on a change) a NAMED_VALUE_INT
//!   [`LOCK_NAME`] whose value is the [`ArmLockReason::code`] (0: may arm). The Lua script
//!   shipped with the agent turns it into the autopilot's auxiliary arming authorisation, fails
//!   closed when the agent goes silent while it held a lock, and open when none was held.
//! - **PX4**: the agent answers `MAV_CMD_ARM_AUTHORIZATION_REQUEST` as the arm authoriser:
//!   ACCEPTED for [`AUTHORIZED_FOR`], or DENIED with a STATUSTEXT saying why.

use crate::state::DeviceState;
use flightnode_proto::status::{ArmLock, ArmLockReason};
use flightnode_proto::{Phase, Slot};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Name of the NAMED_VALUE_INT that carries the lock (MAVLink names are at most 10 bytes).
pub const LOCK_NAME: &str = "FN_ARMLK";
/// How often the lock is sent while nothing changes; the script fails closed after five of these
/// without a word while a lock was held.
pub const ANNOUNCE: Duration = Duration::from_secs(1);
/// How long an arm authorisation the agent gives a PX4 autopilot holds: long enough to arm,
/// short enough that an install starting right after is not bypassed by an old answer.
pub const AUTHORIZED_FOR: u8 = 5;

/// Why the vehicle must not arm now, or `None`. `autopilot_version` is what the flight
/// controller reports (AUTOPILOT_VERSION), when it does.
pub fn lock_of(state: &DeviceState, autopilot_version: Option<&str>) -> Option<ArmLock> {
    if let Some(u) = &state.upgrade {
        let version = u
            .version()
            .map_or_else(|| "a new image".to_owned(), ToString::to_string);
        let target = slot_name(u.target);
        let running = slot_name(!u.target);
        // Waiting counts as the step it holds back: a download or switch that has not begun
        // leaves the vehicle as it was, one held mid-switch or mid-trial does not.
        let lock = match u.step_phase() {
            Phase::Downloading if u.phase == Phase::Downloading => Some((
                ArmLockReason::Installing,
                format!("installing {version} into slot {target}"),
            )),
            Phase::Switching => Some((
                ArmLockReason::Switching,
                format!("switching to {version} in slot {target}"),
            )),
            Phase::Testing => Some((
                ArmLockReason::Trial,
                format!("{version} in slot {target} is on trial, not yet confirmed"),
            )),
            Phase::RollingBack => Some((
                ArmLockReason::RollingBack,
                format!("rolling back to slot {running}"),
            )),
            Phase::Idle | Phase::Downloading | Phase::Staged | Phase::Waiting => None,
        };
        if let Some((reason, message)) = lock {
            return Some(ArmLock { reason, message });
        }
    }
    let wanted = state.slot(state.active).autopilot.as_ref()?;
    let reported = autopilot_version?;
    // A version the autopilot reports that is no semver is no match either.
    let fits = semver::Version::parse(reported).is_ok_and(|v| wanted.matches(&v));
    (!fits).then(|| ArmLock {
        reason: ArmLockReason::AutopilotMismatch,
        message: format!(
            "flight controller runs {reported}, firmware {} needs {wanted}",
            state.committed_version
        ),
    })
}

fn slot_name(slot: Slot) -> &'static str {
    slot.as_str()
}

/// The lock as the MAVLink link sends it; set by the daemon, read by the link's thread.
#[derive(Debug, Clone, Default)]
pub struct ArmSwitch(Arc<Mutex<Option<ArmLock>>>);

impl ArmSwitch {
    /// Sets the lock (`None`: the vehicle may arm), logging a change.
    pub fn set(&self, lock: Option<ArmLock>) {
        let Ok(mut now) = self.0.lock() else { return };
        if *now != lock {
            if let Some(l) = &lock {
                tracing::warn!(reason = %l.reason, "arming locked: {}", l.message);
            } else {
                tracing::info!("arming unlocked");
            }
            *now = lock;
        }
    }

    /// The lock now.
    pub fn get(&self) -> Option<ArmLock> {
        self.0.lock().ok().and_then(|l| l.clone())
    }
}

/// Keeps `switch` at [`lock_of`] the device state and the autopilot's version until `stop`:
/// on every change of either, and every second besides.
pub async fn keep(
    switch: ArmSwitch,
    mut state: tokio::sync::watch::Receiver<DeviceState>,
    mut flight: tokio::sync::watch::Receiver<super::FlightState>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let autopilot = flight.borrow_and_update().firmware_version.clone();
        switch.set(lock_of(&state.borrow_and_update(), autopilot.as_deref()));
        tokio::select! {
            () = stop.cancelled() => return,
            r = state.changed() => if r.is_err() { return },
            r = flight.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The code the autopilot's script receives: 0 unlocked, else [`ArmLockReason::code`].
pub fn code(lock: Option<&ArmLock>) -> i32 {
    lock.map_or(0, |l| l.reason.code())
}

/// What a ground station shows (STATUSTEXT holds 50 bytes; the rest is cut at a char boundary).
pub fn status_text(lock: &ArmLock) -> String {
    let mut text = format!("flightnode: no arming: {}", lock.message);
    if text.len() > 50 {
        let mut end = 50;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The answer to an arm-authorisation request (COMMAND_ACK with its MAVLink 2 extension fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthorizationAck {
    /// Accepted or denied.
    pub accepted: bool,
    /// Accepted: seconds the authorisation holds; denied: MAV_ARM_AUTH_DENIED_REASON. PX4
    /// reads the reason here and the validity from `result_param2`, the MAVLink spec the other
    /// way round: both carry the same number.
    pub progress: u8,
    /// See `progress`.
    pub result_param2: i32,
}

/// MAV_ARM_AUTH_DENIED_REASON_GENERIC: PX4 then says "Arm auth: Denied"; the STATUSTEXT says why.
const DENIED_GENERIC: u8 = 0;

impl AuthorizationAck {
    /// The answer while `lock` holds.
    pub fn answer(lock: Option<&ArmLock>) -> Self {
        let (accepted, why) = match lock {
            None => (true, AUTHORIZED_FOR),
            Some(_) => (false, DENIED_GENERIC),
        };
        Self {
            accepted,
            progress: why,
            result_param2: i32::from(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DeviceState, Wait};
    use flightnode_proto::status::ArmLockReason as R;

    fn device() -> DeviceState {
        DeviceState::factory(semver::Version::new(1, 0, 0))
    }

    fn with_phase(phase: Phase, resume: Option<Phase>) -> DeviceState {
        let mut s = device();
        s.begin("u-1".into(), "file:///b.fnb".into(), false);
        let manifest = flightnode_proto::manifest::Manifest {
            format: flightnode_proto::manifest::FORMAT_VERSION,
            version: semver::Version::new(2, 0, 0),
            security_version: 0,
            compatible: vec!["hw".into()],
            created: time::OffsetDateTime::UNIX_EPOCH,
            expires: None,
            image: flightnode_proto::manifest::ImageInfo {
                size: 100,
                sha256: "00".repeat(32),
            },
            chunks: None,
            autopilot: None,
        };
        s.accept_manifest(manifest, 0);
        if let Some(u) = s.upgrade.as_mut() {
            u.phase = phase;
            u.wait = resume.map(|resume| Wait {
                resume,
                reason: flightnode_proto::WaitReason::Armed,
                since: 0,
            });
        }
        s
    }

    #[test]
    fn writing_switching_trial_and_rollback_lock_a_held_download_does_not() {
        let reason = |s: &DeviceState| lock_of(s, None).map(|l| l.reason);
        assert_eq!(reason(&device()), None, "idle");
        assert_eq!(reason(&with_phase(Phase::Downloading, None)), Some(R::Installing));
        assert_eq!(
            reason(&with_phase(Phase::Staged, None)),
            None,
            "written, not switched"
        );
        assert_eq!(reason(&with_phase(Phase::Switching, None)), Some(R::Switching));
        assert_eq!(reason(&with_phase(Phase::Testing, None)), Some(R::Trial));
        assert_eq!(
            reason(&with_phase(Phase::RollingBack, None)),
            Some(R::RollingBack)
        );
        // Held before the step: the vehicle is as it was.
        let held = |resume| reason(&with_phase(Phase::Waiting, Some(resume)));
        assert_eq!(held(Phase::Downloading), None);
        assert_eq!(held(Phase::Staged), None);
        assert_eq!(held(Phase::Switching), Some(R::Switching));
        assert_eq!(held(Phase::Testing), Some(R::Trial));
        assert_eq!(held(Phase::RollingBack), Some(R::RollingBack));
        let l = lock_of(&with_phase(Phase::Testing, None), None).unwrap();
        assert_eq!(l.message, "2.0.0 in slot b is on trial, not yet confirmed");
    }

    #[test]
    fn the_autopilot_must_run_what_the_running_image_declares() {
        let mut s = device();
        assert_eq!(lock_of(&s, Some("4.5.7")), None, "no declaration, no lock");
        s.a.autopilot = Some(semver::VersionReq::parse(">=4.7.0, <4.8.0").unwrap());
        assert_eq!(
            lock_of(&s, None),
            None,
            "an autopilot that does not say is not judged"
        );
        assert_eq!(lock_of(&s, Some("4.7.2")), None);
        let l = lock_of(&s, Some("4.5.7")).unwrap();
        assert_eq!(l.reason, R::AutopilotMismatch);
        assert_eq!(
            l.message,
            "flight controller runs 4.5.7, firmware 1.0.0 needs >=4.7.0, <4.8.0"
        );
        assert_eq!(
            lock_of(&s, Some("garbage")).map(|l| l.reason),
            Some(R::AutopilotMismatch)
        );
    }

    #[test]
    fn the_status_text_fits_a_statustext() {
        let l = ArmLock {
            reason: R::Installing,
            message: "installing 2.0.0-rc.1+build.12345678 into slot b — ünïcode".into(),
        };
        let t = status_text(&l);
        assert!(
            t.len() <= 50 && t.starts_with("flightnode: no arming: installing"),
            "{t}"
        );
    }

    #[test]
    fn the_ack_carries_the_answer_in_both_places_px4_and_the_spec_read_it() {
        let ok = AuthorizationAck::answer(None);
        assert_eq!(
            (ok.accepted, ok.progress, ok.result_param2),
            (true, AUTHORIZED_FOR, 5)
        );
        let lock = ArmLock {
            reason: R::Trial,
            message: String::new(),
        };
        let no = AuthorizationAck::answer(Some(&lock));
        assert_eq!((no.accepted, no.progress, no.result_param2), (false, 0, 0));
    }
}
