//! The order of the engine's steps, against a recording fake bootloader and slot backend.
//!
//! Every call the engine makes on the device (bootloader writes, opening and finishing the target
//! slot) is logged with the state the store held at that moment; the hooks (health, reboot) log
//! into the same file, so one list shows what a board would see, in order. The fake bootloader
//! keeps RAUC's model (an order of slots, attempts left per slot) and can be power-cycled, so a
//! test also sees which slot the board would boot after any step.

use super::{Backends, Engine, EngineError, Outcome, Request};
use crate::activation::Activation;
use crate::boot::{BootBackend, BootError};
use crate::config::Config;
use crate::slot::{FileSlots, SlotBackend, SlotError};
use flightnode_proto::{ErrorCode, Phase, Slot, SlotState, UpgradeResult};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Attempts a slot gets from `mark_good` and `confirm`.
const ATTEMPTS: u8 = 3;

/// The fake bootloader's environment, as U-Boot's `BOOT_ORDER` and `BOOT_x_LEFT` would hold it.
#[derive(Debug, Clone)]
struct Board {
    order: Vec<Slot>,
    left: [u8; 2],
    booted: Slot,
    /// A slot whose image does not come up (the watchdog resets the board during its boot).
    broken: Option<Slot>,
    boots: u32,
}

fn ix(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl Board {
    /// Power on: the first slot in the order with attempts left uses one and boots, as RAUC's
    /// boot script does; a broken one resets the board and the next try begins.
    fn power_on(&mut self) -> Slot {
        self.boots += 1;
        loop {
            let Some(slot) = self.order.iter().copied().find(|s| self.left[ix(*s)] > 0) else {
                panic!("bricked: no slot left to boot ({self:?})");
            };
            self.left[ix(slot)] -= 1;
            if self.broken != Some(slot) {
                self.booted = slot;
                return slot;
            }
        }
    }

    fn first(&mut self, slot: Slot) {
        self.order.retain(|s| *s != slot);
        self.order.insert(0, slot);
    }
}

/// Shared by the fakes and the test: the call log, the store to read, the failure to inject.
struct Recorder {
    log: PathBuf,
    db: Mutex<Option<sled::Db>>,
    fail: Mutex<Option<String>>,
    board: Mutex<Board>,
}

impl Recorder {
    fn append(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    /// What the store holds now, in one line: the phase and the two slots' states.
    fn persisted(&self) -> String {
        let db = self.db.lock().unwrap();
        let Some(state) = db.as_ref().and_then(crate::store::saved) else {
            return "(nothing saved)".into();
        };
        let word = |s: SlotState| format!("{s:?}").to_lowercase();
        format!(
            "{} a:{} b:{}",
            state.phase(),
            word(state.a.state),
            word(state.b.state)
        )
    }

    /// Logs `call` with the persisted state; `Err` when the line starts with the step armed to
    /// fail (once).
    fn record(&self, call: &str) -> Result<(), String> {
        let line = format!("{call} @ {}", self.persisted());
        self.append(&line);
        let mut fail = self.fail.lock().unwrap();
        if fail.as_ref().is_some_and(|step| line.starts_with(step.as_str())) {
            *fail = None;
            return Err(format!("injected failure of {call}"));
        }
        Ok(())
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The bootloader: changes the [`Board`] like U-Boot's RAUC environment would change.
struct FakeBoot(Arc<Recorder>);

impl FakeBoot {
    fn write(&self, call: &str, slot: Slot, change: impl FnOnce(&mut Board)) -> Result<(), BootError> {
        self.0
            .record(&format!("{call} {slot}"))
            .map_err(|problem| BootError::Env {
                location: "fake bootloader".into(),
                problem,
            })?;
        change(&mut self.0.board.lock().unwrap());
        Ok(())
    }
}

impl BootBackend for FakeBoot {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn booted(&self) -> Result<Slot, BootError> {
        Ok(self.0.board.lock().unwrap().booted)
    }
    fn primary(&self) -> Result<Slot, BootError> {
        Ok(self.0.board.lock().unwrap().order[0])
    }
    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        Ok(self.0.board.lock().unwrap().left[ix(slot)] > 0)
    }
    fn set_trial(&self, slot: Slot) -> Result<(), BootError> {
        self.write("set_trial", slot, |b| {
            b.first(slot);
            b.left[ix(slot)] = 1;
        })
    }
    fn mark_good(&self, slot: Slot) -> Result<(), BootError> {
        self.write("mark_good", slot, |b| {
            b.first(slot);
            b.left[ix(slot)] = ATTEMPTS;
        })
    }
    fn mark_bad(&self, slot: Slot) -> Result<(), BootError> {
        let other_in_order = self.0.board.lock().unwrap().order.contains(&!slot);
        if !other_in_order {
            return Err(BootError::Env {
                location: "fake bootloader".into(),
                problem: format!("mark_bad {slot} would leave nothing to boot"),
            });
        }
        self.write("mark_bad", slot, |b| {
            b.order.retain(|s| *s != slot);
            b.left[ix(slot)] = 0;
        })
    }
    fn confirm(&self, slot: Slot) -> Result<(), BootError> {
        self.write("confirm", slot, |b| b.left[ix(slot)] = ATTEMPTS)
    }
}

/// File slots that log opening the target for writing and finishing it.
struct FakeSlots {
    files: FileSlots,
    rec: Arc<Recorder>,
}

impl FakeSlots {
    fn injected(&self, slot: Slot, problem: String) -> SlotError {
        SlotError::Io {
            slot,
            path: self.files.path(slot).to_owned(),
            action: "write",
            source: std::io::Error::other(problem),
        }
    }
}

impl SlotBackend for FakeSlots {
    fn path(&self, slot: Slot) -> &Path {
        self.files.path(slot)
    }
    fn check_room(&self, slot: Slot, size: u64) -> Result<(), SlotError> {
        self.files.check_room(slot, size)
    }
    fn open_at(&self, slot: Slot, offset: u64) -> Result<File, SlotError> {
        self.rec
            .record(&format!("open_at {slot} {offset}"))
            .map_err(|p| self.injected(slot, p))?;
        self.files.open_at(slot, offset)
    }
    fn finish(&self, slot: Slot, file: &File, size: u64) -> Result<(), SlotError> {
        self.rec
            .record(&format!("finish {slot}"))
            .map_err(|p| self.injected(slot, p))?;
        self.files.finish(slot, file, size)
    }
}

/// A reboot-mode device on file slots, factory image in slot a, and a signed bundle of 2.0.0.
struct Rig {
    dir: tempfile::TempDir,
    rec: Arc<Recorder>,
    cfg: Config,
    rt: tokio::runtime::Runtime,
    bundle: PathBuf,
}

impl Rig {
    fn new() -> Self {
        Self::with("")
    }

    /// A rig whose config ends with `extra`; `@DIR@` in it stands for the rig's directory and
    /// `@LOG@` for the call log.
    fn with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let keys = crate::bundle::keygen(&p.join("keys")).unwrap();
        std::fs::write(p.join("a.img"), b"factory image").unwrap();
        // Not compressible and not repeating, so the image can be found in the bundle.
        let image: Vec<u8> = (0u32..64 * 1024)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        std::fs::write(p.join("image"), &image).unwrap();
        let bundle = p.join("2.0.0.fnb");
        let opts = crate::bundle::CreateOptions {
            version: semver::Version::new(2, 0, 0),
            security_version: 0,
            compatible: vec!["hw-order".into()],
            expires: None,
            chunked: None,
            autopilot: None,
        };
        crate::bundle::create(&keys.private, &p.join("image"), &opts, &bundle).unwrap();
        let log = p.join("calls.log");
        // Hooks log into the same file as the fakes, so their place in the order is kept. The
        // reboot command's time limit is `reboot_wait`, which the engine then also sleeps.
        let text = format!(
            r#"device_id = "drone-order"
hardware = "hw-order"
state_dir = "{state}"
trusted_keys = ["{key}"]
factory_version = "1.0.0"
[slots]
backend = "file"
a = "{a}"
b = "{b}"
[health]
command = 'echo "health $FLIGHTNODE_SLOT" >> {log} && test ! -e {unhealthy}'
timeout = "20s"
[activation]
mode = "reboot"
reboot_command = 'echo "reboot $FLIGHTNODE_SLOT" >> {log}'
reboot_wait = "2s"
[boot]
backend = "uboot"
boot_id = "{boot_id}"
{extra}
"#,
            state = p.join("state").display(),
            key = keys.public.display(),
            a = p.join("a.img").display(),
            b = p.join("b.img").display(),
            log = log.display(),
            unhealthy = p.join("unhealthy").display(),
            boot_id = p.join("boot_id").display(),
            extra = extra
                .replace("@DIR@", &p.display().to_string())
                .replace("@LOG@", &log.display().to_string()),
        );
        let cfg = Config::parse(&text, &p.join("agent.toml")).unwrap();
        std::fs::write(p.join("boot_id"), "boot-1").unwrap();
        let board = Board {
            order: vec![Slot::A, Slot::B],
            left: [ATTEMPTS, ATTEMPTS],
            booted: Slot::A,
            broken: None,
            boots: 1,
        };
        let rec = Arc::new(Recorder {
            log,
            db: Mutex::new(None),
            fail: Mutex::new(None),
            board: Mutex::new(board),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self {
            dir,
            rec,
            cfg,
            rt,
            bundle,
        }
    }

    fn open(&self) -> Engine {
        let backends = || Backends {
            slots: Box::new(FakeSlots {
                files: FileSlots::new(self.cfg.slots.a.clone(), self.cfg.slots.b.clone()),
                rec: self.rec.clone(),
            }),
            activation: Activation::Reboot {
                boot: Box::new(FakeBoot(self.rec.clone())),
                boot_id: self.dir.path().join("boot_id"),
            },
        };
        // The engine's store was just dropped, but sled's flusher thread lets go of the database's
        // lock a moment later: a reopen in the same process can see it still held.
        *self.rec.db.lock().unwrap() = None;
        let mut tries = 0;
        let engine = loop {
            match Engine::with_backends(self.cfg.clone(), self.rt.handle().clone(), backends()) {
                Err(EngineError::Store(crate::store::StoreError::Locked { .. })) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r.unwrap(),
            }
        };
        *self.rec.db.lock().unwrap() = Some(engine.db());
        engine
    }

    /// The agent stops (the reboot, or a power cut), the board powers on, the agent starts again.
    fn power_cycle(&self, engine: Engine) -> Engine {
        // The store stays locked while anyone holds the database.
        self.rec.db.lock().unwrap().take();
        drop(engine);
        let mut board = self.rec.board.lock().unwrap();
        let slot = board.power_on();
        std::fs::write(self.dir.path().join("boot_id"), format!("boot-{}", board.boots)).unwrap();
        drop(board);
        self.rec.append(&format!("power_on -> {slot}"));
        self.open()
    }

    /// The slot the board boots at its next power-on, without booting it.
    fn boots_next(&self) -> Slot {
        self.rec.board.lock().unwrap().clone().power_on()
    }

    fn install(&self, engine: &mut Engine) -> Result<Outcome, super::EngineError> {
        engine.install(Request {
            id: "u-order".into(),
            source: self.bundle.display().to_string(),
            allow_downgrade: false,
        })
    }

    /// Starts the agent after each reboot until the upgrade ends.
    fn until_done(&self, mut engine: Engine, mut outcome: Outcome) -> (Engine, Outcome) {
        for _ in 0..8 {
            if !matches!(outcome, Outcome::AwaitingReboot { .. }) {
                return (engine, outcome);
            }
            engine = self.power_cycle(engine);
            outcome = engine.resume().unwrap();
        }
        panic!("still rebooting after 8 boots: {:#?}", self.rec.lines());
    }

    /// Arms one failure: the first call whose log line starts with `step`.
    fn fail(&self, step: &str) {
        *self.rec.fail.lock().unwrap() = Some(step.to_owned());
    }
}

fn lines(expected: &[&str]) -> Vec<String> {
    expected.iter().map(|l| (*l).to_owned()).collect()
}

fn result(outcome: &Outcome) -> (UpgradeResult, Option<ErrorCode>) {
    match outcome {
        Outcome::Finished(last) => (last.result, last.error.as_ref().map(|e| e.code)),
        other => panic!("the upgrade did not end: {other:?}"),
    }
}

/// What a reboot-mode install does from the command to the first reboot: the target is marked
/// bad in the store and then in the bootloader before a byte is written, written and verified
/// before the boot flag flips, and the trial is recorded before the reboot.
const TO_FIRST_REBOOT: [&str; 8] = [
    "mark_good a @ idle a:good b:empty",
    "confirm a @ downloading a:good b:empty",
    "mark_bad b @ downloading a:good b:bad",
    "open_at b 0 @ downloading a:good b:bad",
    "finish b @ downloading a:good b:bad",
    "mark_good a @ switching a:good b:bad",
    "set_trial b @ switching a:good b:bad",
    "reboot b",
];

/// One upgrade from the command to its end, on a board where the new image is healthy, fails
/// its health check, or never comes up.
struct Scenario {
    name: &'static str,
    unhealthy: bool,
    broken: Option<Slot>,
    /// The log after [`TO_FIRST_REBOOT`].
    then: &'static [&'static str],
    ends: (UpgradeResult, Option<ErrorCode>),
    /// The slot that runs and boots at the end, with its version.
    runs: (Slot, u64),
}

#[test]
fn images_are_written_verified_tried_then_committed_or_rolled_back_in_that_order() {
    let scenarios = [
        Scenario {
            name: "healthy",
            unhealthy: false,
            broken: None,
            then: &[
                "power_on -> b",
                "health b",
                // Commit only after the health check passed, while the trial is on disk.
                "mark_good b @ testing a:good b:trial",
                // The start after an upgrade confirms the boot it runs in.
                "mark_good b @ idle a:good b:good",
            ],
            ends: (UpgradeResult::Committed, None),
            runs: (Slot::B, 2),
        },
        Scenario {
            name: "health check fails",
            unhealthy: true,
            broken: None,
            then: &[
                "power_on -> b",
                "health b",
                // The rollback is on disk before the bootloader drops the new slot.
                "mark_bad b @ rolling_back a:good b:trial",
                "reboot a",
                "power_on -> a",
                // Every start with an upgrade in flight confirms the fallback that booted.
                "confirm a @ rolling_back a:good b:trial",
                "mark_bad b @ rolling_back a:good b:trial",
                "mark_good a @ idle a:good b:bad",
            ],
            ends: (UpgradeResult::RolledBack, Some(ErrorCode::HealthCheckFailed)),
            runs: (Slot::A, 1),
        },
        Scenario {
            name: "trial boot never comes up",
            unhealthy: false,
            broken: Some(Slot::B),
            then: &[
                "power_on -> a",
                "confirm a @ testing a:good b:trial",
                "mark_bad b @ testing a:good b:trial",
                "mark_good a @ idle a:good b:bad",
            ],
            ends: (UpgradeResult::RolledBack, Some(ErrorCode::TrialBootFailed)),
            runs: (Slot::A, 1),
        },
    ];
    for s in scenarios {
        let rig = Rig::new();
        if s.unhealthy {
            std::fs::write(rig.dir.path().join("unhealthy"), b"").unwrap();
        }
        rig.rec.board.lock().unwrap().broken = s.broken;
        let mut engine = rig.open();
        let outcome = rig.install(&mut engine).unwrap();
        assert_eq!(outcome, Outcome::AwaitingReboot { slot: Slot::B }, "{}", s.name);
        let (engine, outcome) = rig.until_done(engine, outcome);
        assert_eq!(result(&outcome), s.ends, "{}", s.name);
        let mut expected = lines(&TO_FIRST_REBOOT);
        expected.extend(lines(s.then));
        assert_eq!(rig.rec.lines(), expected, "{}", s.name);
        let (slot, major) = s.runs;
        assert_eq!(engine.state().active, slot, "{}", s.name);
        assert_eq!(
            engine.state().committed_version,
            semver::Version::new(major, 0, 0),
            "{}",
            s.name
        );
        assert_eq!(rig.boots_next(), slot, "{}", s.name);
    }
}

#[test]
fn a_corrupt_image_never_reaches_the_boot_flag() {
    let rig = Rig::new();
    let image = std::fs::read(rig.dir.path().join("image")).unwrap();
    let mut bundle = std::fs::read(&rig.bundle).unwrap();
    let at = bundle
        .windows(64)
        .position(|w| w == &image[..64])
        .expect("the image is stored plainly in a format-1 bundle");
    bundle[at + image.len() / 2] ^= 0xff;
    std::fs::write(&rig.bundle, bundle).unwrap();
    let mut engine = rig.open();
    let outcome = rig.install(&mut engine).unwrap();
    assert_eq!(
        result(&outcome),
        (UpgradeResult::Rejected, Some(ErrorCode::HashMismatch))
    );
    assert_eq!(rig.rec.lines(), lines(&TO_FIRST_REBOOT[..4]));
    assert_eq!(engine.state().active, Slot::A);
    assert_eq!(engine.state().b.state, SlotState::Bad);
    assert_eq!(rig.boots_next(), Slot::A);
}

/// How a failed step shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shows {
    /// An engine error; the phase whose step failed stays on disk for the next start to repeat.
    Stopped(Phase),
    /// The upgrade ends with this code, recorded as the last upgrade.
    Ended(ErrorCode),
}

/// Each bootloader or slot call of the happy path fails once. The engine stops right at it, the
/// board still boots the old slot, slot a stays good and committed, the failure is either on
/// disk as the phase to repeat or recorded with its code, and the next starts (or the command
/// sent again) finish the upgrade.
#[test]
fn a_failure_at_any_step_stops_there_and_leaves_the_old_slot_booting() {
    use Shows::{Ended, Stopped};
    let cases = [
        ("mark_good a @ idle", Stopped(Phase::Idle)),
        ("confirm a @ downloading", Stopped(Phase::Downloading)),
        ("mark_bad b @ downloading", Stopped(Phase::Downloading)),
        ("open_at b 0 @ downloading", Ended(ErrorCode::Internal)),
        ("finish b @ downloading", Ended(ErrorCode::Internal)),
        ("mark_good a @ switching", Stopped(Phase::Switching)),
        ("set_trial b @ switching", Stopped(Phase::Switching)),
        ("mark_good b @ testing", Stopped(Phase::Testing)),
    ];
    for (step, shows) in cases {
        let rig = Rig::new();
        rig.fail(step);
        let mut engine = rig.open();
        let mut outcome = rig.install(&mut engine);
        while let Ok(Outcome::AwaitingReboot { .. }) = outcome {
            engine = rig.power_cycle(engine);
            outcome = engine.resume();
        }
        let log = rig.rec.lines();
        assert!(
            log.last().is_some_and(|l| l.starts_with(step)),
            "{step}: nothing may follow the failed step: {log:#?}"
        );
        assert_eq!(
            rig.boots_next(),
            Slot::A,
            "{step}: the board must boot the old slot"
        );
        let state = engine.state();
        assert_eq!(state.a.state, SlotState::Good, "{step}");
        assert_eq!(state.committed_version, semver::Version::new(1, 0, 0), "{step}");
        match (shows, outcome) {
            (Stopped(phase), Err(e)) => {
                let text = flightnode_proto::error::chain(&e);
                let call = step.split(" @").next().unwrap_or(step);
                assert!(
                    text.contains(&format!("injected failure of {call}")),
                    "{step}: {text}"
                );
                assert_eq!(
                    state.phase(),
                    phase,
                    "{step}: the phase to repeat must be on disk"
                );
            }
            (Ended(code), Ok(Outcome::Finished(last))) => {
                assert_eq!(last.result, code.result(), "{step}");
                let error = last.error.expect("the last upgrade says why");
                assert_eq!(error.code, code, "{step}");
                assert!(
                    error.message.contains("slot b") && error.message.contains("injected"),
                    "{step}: {}",
                    error.message
                );
                assert_eq!((state.phase(), state.active), (Phase::Idle, Slot::A), "{step}");
            }
            (shows, outcome) => panic!("{step}: expected {shows:?}, got {outcome:?}"),
        }
        // The fault was one-off: the next start finishes what is on disk; an upgrade that ended
        // (or never began) is sent again.
        let mut engine = rig.power_cycle(engine);
        let outcome = engine.resume().unwrap();
        let (mut engine, outcome) = rig.until_done(engine, outcome);
        let outcome = if matches!(shows, Stopped(p) if p != Phase::Idle) {
            outcome
        } else {
            assert_eq!(outcome, Outcome::Idle, "{step}: nothing is left in flight");
            let outcome = rig.install(&mut engine).unwrap();
            rig.until_done(engine, outcome).1
        };
        assert_eq!(result(&outcome), (UpgradeResult::Committed, None), "{step}");
    }
}

/// `[flight]` for the gated rigs: open while `@DIR@/landed` exists, else "in the air"; every
/// answer is logged. `max_wait = "0s"`: the first closed answer ends the wait with
/// `flight_gate_timeout`, so a test sees what the engine does instead of blocking.
const GATE: &str = r#"[flight]
gate_command = 'if test -e @DIR@/landed; then echo "gate open" >> @LOG@; else echo "gate in_air" >> @LOG@; echo in_air; exit 1; fi'
max_wait = "0s"
"#;

impl Rig {
    fn land(&self, landed: bool) {
        let marker = self.dir.path().join("landed");
        if landed {
            std::fs::write(marker, b"").unwrap();
        } else {
            std::fs::remove_file(marker).unwrap();
        }
    }

    /// The log from line `from` on.
    fn lines_from(&self, from: usize) -> Vec<String> {
        self.rec.lines().split_off(from)
    }

    /// Whether the board could ever boot `slot` again without the agent: in the order with
    /// attempts left (a watchdog reset of the other slot would start it).
    fn bootable(&self, slot: Slot) -> bool {
        let board = self.rec.board.lock().unwrap();
        board.order.contains(&slot) && board.left[ix(slot)] > 0
    }
}

/// On the ground the flight gate is asked right before each bootloader write that arms the
/// trial and right before the reboot, not once for all of them.
#[test]
fn the_gate_is_asked_before_each_write_that_arms_the_trial_and_before_the_reboot() {
    let rig = Rig::with(GATE);
    rig.land(true);
    let mut engine = rig.open();
    let outcome = rig.install(&mut engine).unwrap();
    assert_eq!(outcome, Outcome::AwaitingReboot { slot: Slot::B });
    let log = rig.rec.lines();
    let switch = log
        .iter()
        .position(|l| l.starts_with("finish b"))
        .expect("the image was written");
    assert_eq!(
        log[switch + 1..],
        lines(&[
            // The switch itself.
            "gate open",
            "gate open",
            "mark_good a @ switching a:good b:bad",
            "gate open",
            "set_trial b @ switching a:good b:bad",
            "gate open",
            "reboot b",
        ])
    );
}

/// Issue 21 a: the trial slot came up, its boot ended before the check (here: the commit's
/// bootloader write fails, as a power cut there would stop it), the board fell back to slot a,
/// and now the vehicle is in the air. Slot a's agent must neither arm the trial again nor reboot;
/// when the wait runs out the trial is withdrawn.
#[test]
fn a_trial_retry_in_the_air_neither_arms_the_trial_nor_reboots() {
    let rig = Rig::with(GATE);
    rig.land(true);
    let mut engine = rig.open();
    assert_eq!(
        rig.install(&mut engine).unwrap(),
        Outcome::AwaitingReboot { slot: Slot::B }
    );
    let mut engine = rig.power_cycle(engine);
    rig.fail("mark_good b @ testing");
    assert!(engine.resume().is_err(), "the trial boot ends before its commit");
    rig.land(false);
    let mut engine = rig.power_cycle(engine);
    assert_eq!(engine.state().phase(), Phase::Testing);
    let from = rig.rec.lines().len();
    let outcome = engine.resume().unwrap();
    assert_eq!(
        rig.lines_from(from),
        lines(&[
            "confirm a @ testing a:good b:trial",
            // The retry asks before its first write, and nothing follows but the withdrawal.
            "gate in_air",
            "mark_bad b @ waiting a:good b:trial",
            "mark_good a @ idle a:good b:bad",
        ])
    );
    assert_eq!(
        result(&outcome),
        (UpgradeResult::Failed, Some(ErrorCode::FlightGateTimeout))
    );
    assert_eq!(engine.state().active, Slot::A);
    assert!(!rig.bootable(Slot::B), "{:?}", rig.rec.board.lock().unwrap());
    assert_eq!(rig.boots_next(), Slot::A);
}

/// Issue 21 d: the trial was armed on the ground, then the vehicle took off before the reboot
/// and `flight.max_wait` ran out. The trial is withdrawn as a rollback withdraws it: slot b out
/// of the boot order, so no later reset of slot a can start it.
#[test]
fn a_flight_gate_timeout_after_the_trial_was_armed_withdraws_the_trial() {
    let rig = Rig::with(GATE);
    rig.land(true);
    let mut engine = rig.open();
    assert_eq!(
        rig.install(&mut engine).unwrap(),
        Outcome::AwaitingReboot { slot: Slot::B }
    );
    // The reboot command did not take the system down; the agent starts again in the same boot,
    // with the trial armed, and the vehicle took off meanwhile.
    rig.land(false);
    let from = rig.rec.lines().len();
    let outcome = engine.resume().unwrap();
    assert_eq!(
        rig.lines_from(from),
        lines(&[
            "confirm a @ testing a:good b:trial",
            "gate in_air",
            "mark_bad b @ waiting a:good b:trial",
            "mark_good a @ idle a:good b:bad",
        ])
    );
    assert_eq!(
        result(&outcome),
        (UpgradeResult::Failed, Some(ErrorCode::FlightGateTimeout))
    );
    // Out of the order: a watchdog reset of slot a can never start the withdrawn trial.
    assert!(!rig.bootable(Slot::B), "{:?}", rig.rec.board.lock().unwrap());
    assert_eq!(rig.boots_next(), Slot::A);
    assert_eq!(engine.state().b.state, SlotState::Bad);
}
