//! Bootloader backends against the real tools (`fw_printenv`/`fw_setenv`, `grub-editenv`, a shell
//! script), with the boot simulator playing the bootloader at each power-on.
//!
//! Every healthy boot ends with `mark_good(booted)`, as the agent does (RAUC's mark-good service):
//! with GRUB's one-shot `TRY` flags that is what keeps a committed slot booting.

use flightnode_agent::boot::{self, BootBackend, BootError, Grub, Script, UBoot};
use flightnode_agent::config::{BootBackendKind, BootConfig};
use flightnode_agent::proto::Slot;
use flightnode_tests::boot_sim::{FRESH_ATTEMPTS, SimBoot, SimKind};
use std::path::{Path, PathBuf};

fn config(sim: &SimBoot) -> BootConfig {
    let mut cfg = BootConfig {
        backend: BootBackendKind::Uboot,
        cmdline: sim.cmdline.clone(),
        boot_id: sim.boot_id.clone(),
        fw_env_config: PathBuf::from("/nonexistent/fw_env.config"),
        grubenv: PathBuf::from("/nonexistent/grubenv"),
        script: None,
        attempts: FRESH_ATTEMPTS,
    };
    match sim.kind {
        SimKind::Uboot => cfg.fw_env_config = sim.env.clone(),
        SimKind::Grub => {
            cfg.backend = BootBackendKind::Grub;
            cfg.grubenv = sim.env.clone();
        }
        SimKind::Script => {
            cfg.backend = BootBackendKind::Script;
            cfg.script = Some(sim.env.clone());
        }
    }
    cfg
}

fn backend(sim: &SimBoot) -> Box<dyn BootBackend> {
    boot::open(&config(sim)).expect("open backend")
}

fn slot_of(c: char) -> Slot {
    Slot::parse(&c.to_string()).expect("simulator boots A or B")
}

/// Power-on as the device would see it: which slot came up, and the backend agrees.
fn power_on(sim: &SimBoot, b: &dyn BootBackend) -> Slot {
    let before = std::fs::read_to_string(&sim.boot_id).unwrap_or_default();
    let booted = slot_of(sim.power_on().expect("power-on"));
    assert_eq!(b.booted().expect("booted()"), booted, "booted() disagrees");
    let after = std::fs::read_to_string(&sim.boot_id).expect("boot id written");
    assert_ne!(before, after, "boot id must change on every boot");
    booted
}

/// The whole life of a device: factory boot, trial + commit, failed trial + fallback, mark_bad.
fn lifecycle(sim: &SimBoot) {
    let b = backend(sim);

    // Before the first boot there is no kernel command line: a clear error, naming the file.
    let err = b.booted().expect_err("no cmdline yet");
    if sim.kind != SimKind::Script {
        assert!(matches!(err, BootError::Booted { .. }), "{err}");
        assert!(err.to_string().contains("cmdline"), "{err}");
    }

    // Factory state: A boots.
    assert_eq!(b.primary().unwrap(), Slot::A);
    assert!(b.is_good(Slot::A).unwrap());
    assert_eq!(power_on(sim, &*b), Slot::A);
    b.mark_good(Slot::A).unwrap();

    // Trial of B that commits: B boots, and keeps booting.
    b.set_trial(Slot::B).unwrap();
    assert_eq!(b.primary().unwrap(), Slot::B, "trial slot must be tried first");
    assert_eq!(power_on(sim, &*b), Slot::B);
    b.mark_good(Slot::B).unwrap();
    for _ in 0..4 {
        assert_eq!(power_on(sim, &*b), Slot::B, "committed B must keep booting");
        b.mark_good(Slot::B).unwrap();
    }
    assert_eq!(b.primary().unwrap(), Slot::B);
    assert!(b.is_good(Slot::A).unwrap(), "the old slot stays a fallback");

    // mark_bad(B) from the running B: A takes over for good.
    b.mark_bad(Slot::B).unwrap();
    assert!(!b.is_good(Slot::B).unwrap());
    assert!(b.is_good(Slot::A).unwrap());
    assert_eq!(b.primary().unwrap(), Slot::A);
    for _ in 0..4 {
        assert_eq!(power_on(sim, &*b), Slot::A, "a bad slot must never boot");
        b.mark_good(Slot::A).unwrap();
    }
    assert!(!b.is_good(Slot::B).unwrap());

    // A new trial of B that never marks itself good: the next power-on falls back to A. The
    // agent then notices it is not on B, marks B bad and A good, and A stays.
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(sim, &*b), Slot::B);
    assert_eq!(power_on(sim, &*b), Slot::A, "failed trial must fall back");
    b.mark_bad(Slot::B).unwrap();
    b.mark_good(Slot::A).unwrap();
    assert_eq!(b.primary().unwrap(), Slot::A);
    for _ in 0..3 {
        assert_eq!(power_on(sim, &*b), Slot::A);
        b.mark_good(Slot::A).unwrap();
    }
}

/// The brief's fallback case from a fresh device: trial B, not committed, back to A.
fn fallback_from_fresh(sim: &SimBoot) {
    let b = backend(sim);
    assert_eq!(power_on(sim, &*b), Slot::A);
    b.mark_good(Slot::A).unwrap();
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(sim, &*b), Slot::B, "trial boots B");
    // B's health check failed / it hung: no mark_good.
    assert_eq!(power_on(sim, &*b), Slot::A, "falls back to A");
    assert!(b.is_good(Slot::A).unwrap(), "A is still good");
    b.mark_good(Slot::A).unwrap();
    assert_eq!(b.primary().unwrap(), Slot::A);
    assert_eq!(power_on(sim, &*b), Slot::A);
}

#[test]
fn uboot_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    lifecycle(&SimBoot::uboot(dir.path()).unwrap());
}

#[test]
fn grub_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    lifecycle(&SimBoot::grub(dir.path()).unwrap());
}

#[test]
fn script_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    lifecycle(&SimBoot::script(dir.path()).unwrap());
}

#[test]
fn uboot_failed_trial_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    fallback_from_fresh(&SimBoot::uboot(dir.path()).unwrap());
}

#[test]
fn grub_failed_trial_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    fallback_from_fresh(&SimBoot::grub(dir.path()).unwrap());
}

#[test]
fn script_failed_trial_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    fallback_from_fresh(&SimBoot::script(dir.path()).unwrap());
}

#[test]
fn uboot_committed_slot_gets_the_configured_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(dir.path()).unwrap();
    let b = backend(&sim);
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(&sim, &*b), Slot::B);
    b.mark_good(Slot::B).unwrap();
    // Never marked good again: B gets exactly `attempts` more boots, then U-Boot gives up on it.
    for i in 0..FRESH_ATTEMPTS {
        assert_eq!(power_on(&sim, &*b), Slot::B, "attempt {i}");
    }
    assert!(!b.is_good(Slot::B).unwrap());
    assert_eq!(power_on(&sim, &*b), Slot::A);
}

#[test]
fn uboot_blank_env_is_read_as_defaults_and_initialised_on_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot_blank(dir.path()).unwrap();
    // fw_printenv fails on the blank env, and so does the simulated bootloader.
    assert!(
        sim.power_on().is_err(),
        "blank env must not be bootable by the sim"
    );
    let b = backend(&sim);
    assert_eq!(b.primary().unwrap(), Slot::A);
    assert!(b.is_good(Slot::A).unwrap() && b.is_good(Slot::B).unwrap());
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(&sim, &*b), Slot::B);
    assert_eq!(power_on(&sim, &*b), Slot::A, "defaults gave A its attempts");
}

#[test]
fn grub_creates_a_missing_grubenv() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = SimBoot::grub(dir.path()).unwrap();
    sim.env = dir.path().join("missing-grubenv");
    let b = backend(&sim);
    assert_eq!(b.primary().unwrap(), Slot::A);
    assert!(!sim.env.exists(), "reading must not create the file");
    b.set_trial(Slot::B).unwrap();
    assert!(sim.env.exists());
    assert_eq!(power_on(&sim, &*b), Slot::B);
    assert_eq!(power_on(&sim, &*b), Slot::A);
}

#[test]
fn missing_cmdline_marker_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["u", "g"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    let sims = [
        SimBoot::uboot(&dir.path().join("u")).unwrap(),
        SimBoot::grub(&dir.path().join("g")).unwrap(),
    ];
    for sim in &sims {
        let b = backend(sim);
        std::fs::write(&sim.cmdline, "console=ttyS0 root=/dev/mmcblk0p2 quiet\n").unwrap();
        let err = b.booted().expect_err("no marker");
        let msg = err.to_string();
        assert!(matches!(err, BootError::Booted { .. }), "{msg}");
        assert!(
            msg.contains("rauc.slot=") && msg.contains(&*sim.cmdline.to_string_lossy()),
            "{msg}"
        );

        std::fs::write(&sim.cmdline, "root=/dev/mmcblk0p2 flightnode.slot=b\n").unwrap();
        assert_eq!(b.booted().unwrap(), Slot::B);
    }
}

#[test]
fn tool_failures_name_the_tool_the_file_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    // A fw_env.config pointing at env files that do not exist.
    let cfg_path = dir.path().join("broken.config");
    std::fs::write(
        &cfg_path,
        format!("{} 0x0 0x4000\n", dir.path().join("gone.env").display()),
    )
    .unwrap();
    let mut cfg = config(&SimBoot::uboot(dir.path()).unwrap());
    cfg.fw_env_config = cfg_path.clone();
    let err = UBoot::new(&cfg).unwrap().primary().expect_err("broken config");
    let msg = err.to_string();
    assert!(
        msg.contains("fw_printenv") && msg.contains(&*cfg_path.to_string_lossy()),
        "{msg}"
    );

    // A script that fails.
    let script = dir.path().join("failing.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'env partition is read-only' >&2\nexit 3\n",
    )
    .unwrap();
    set_exec(&script);
    cfg.backend = BootBackendKind::Script;
    cfg.script = Some(script.clone());
    let err = Script::new(&cfg)
        .unwrap()
        .set_trial(Slot::B)
        .expect_err("script fails");
    let msg = err.to_string();
    assert!(
        msg.contains("set-primary b") && msg.contains("read-only"),
        "{msg}"
    );

    // A script that prints nonsense.
    std::fs::write(&script, "#!/bin/sh\necho maybe\n").unwrap();
    let err = Script::new(&cfg).unwrap().is_good(Slot::A).expect_err("nonsense");
    assert!(err.to_string().contains("maybe"), "{err}");

    // Constructors refuse what can never work.
    cfg.script = None;
    assert!(Script::new(&cfg).is_err());
    cfg.grubenv = dir.path().join("no/such/dir/grubenv");
    assert!(Grub::new(&cfg).is_err());
    cfg.fw_env_config = dir.path().join("nope.config");
    assert!(UBoot::new(&cfg).is_err());
}

#[test]
fn boot_toml_from_the_simulator_opens_the_right_backend() {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        boot: BootConfig,
    }
    let dir = tempfile::tempdir().unwrap();
    for (sub, name) in [("u", "uboot"), ("g", "grub"), ("s", "script")] {
        let d = dir.path().join(sub);
        std::fs::create_dir(&d).unwrap();
        let sim = match sub {
            "u" => SimBoot::uboot(&d),
            "g" => SimBoot::grub(&d),
            _ => SimBoot::script(&d),
        }
        .unwrap();
        let w: Wrapper = toml::from_str(&sim.boot_toml()).unwrap();
        let b = boot::open(&w.boot).unwrap();
        assert_eq!(b.name(), name);
        assert_eq!(power_on(&sim, &*b), Slot::A);
    }
}

fn set_exec(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}
