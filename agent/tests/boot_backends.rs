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
use std::time::Duration;

fn config(sim: &SimBoot) -> BootConfig {
    let mut cfg = BootConfig {
        backend: BootBackendKind::Uboot,
        cmdline: sim.cmdline.clone(),
        boot_id: sim.boot_id.clone(),
        fw_env_config: PathBuf::from("/nonexistent/fw_env.config"),
        grubenv: PathBuf::from("/nonexistent/grubenv"),
        script: None,
        attempts: FRESH_ATTEMPTS,
        initial_env: sim.initial_env.clone(),
        tool_timeout: Duration::from_mins(1),
        // Debian's U-Boot under qemu keeps one copy; the file sims have two.
        allow_single_copy_env: sim.kind == SimKind::UbootQemu,
    };
    match sim.kind {
        SimKind::Uboot | SimKind::UbootQemu => cfg.fw_env_config.clone_from(&sim.env),
        SimKind::Grub => {
            cfg.backend = BootBackendKind::Grub;
            cfg.grubenv.clone_from(&sim.env);
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

fn printenv(sim: &SimBoot) -> Option<std::collections::BTreeMap<String, String>> {
    let out = std::process::Command::new("fw_printenv")
        .arg("-c")
        .arg(&sim.env)
        .arg("-f")
        .arg("/nonexistent/default-env")
        .output()
        .expect("run fw_printenv");
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

fn setenv(sim: &SimBoot, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("fw_setenv")
        .arg("-c")
        .arg(&sim.env)
        .args(["-s", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run fw_setenv");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "fw_setenv {script:?}");
}

fn grub_vars(sim: &SimBoot) -> std::collections::BTreeMap<String, String> {
    let out = std::process::Command::new("grub-editenv")
        .arg(&sim.env)
        .arg("list")
        .output()
        .expect("run grub-editenv");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn grub_set(sim: &SimBoot, args: &[&str]) {
    let o = std::process::Command::new("grub-editenv")
        .arg(&sim.env)
        .args(args)
        .output()
        .expect("run grub-editenv");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Item f: a blank environment is never replaced by one holding only our variables (U-Boot would
/// find no bootcmd and stop at its prompt); with the board's initial environment it is.
#[test]
fn uboot_blank_env_is_created_only_from_the_initial_env() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot_blank(dir.path()).unwrap();
    assert!(printenv(&sim).is_none(), "the sim starts blank");
    let mut cfg = config(&sim);
    cfg.initial_env = dir.path().join("no-such-initial-env");
    let b = UBoot::new(&cfg).unwrap();
    // Reading is harmless: U-Boot boots its default environment, RAUC's script defaults apply.
    assert_eq!(b.primary().unwrap(), Slot::A);
    let err = b.set_trial(Slot::B).expect_err("no initial env: refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("bootcmd") && msg.contains("no-such-initial-env"),
        "{msg}"
    );
    assert!(printenv(&sim).is_none(), "nothing written: {:?}", printenv(&sim));

    // An initial env without bootcmd is no better.
    std::fs::write(&cfg.initial_env, "bootdelay=0\n").unwrap();
    assert!(UBoot::new(&cfg).unwrap().set_trial(Slot::B).is_err());
    assert!(printenv(&sim).is_none());

    let b = backend(&sim);
    b.set_trial(Slot::B).unwrap();
    let vars = printenv(&sim).expect("a valid environment now");
    assert!(
        vars.contains_key("bootcmd"),
        "the board's settings are in: {vars:?}"
    );
    assert_eq!(vars["BOOT_ORDER"], "B A");
    assert_eq!(vars["BOOT_B_LEFT"], "1");
    assert_eq!(power_on(&sim, &*b), Slot::B);
    assert_eq!(power_on(&sim, &*b), Slot::A, "defaults gave A its attempts");
}

/// Item g: a recovery entry in the order stays; only A and B move.
#[test]
fn order_keeps_entries_that_are_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [SimKind::Uboot, SimKind::Grub] {
        let d = dir.path().join(format!("{kind:?}"));
        std::fs::create_dir(&d).unwrap();
        let sim = if kind == SimKind::Uboot {
            let sim = SimBoot::uboot(&d).unwrap();
            setenv(&sim, "BOOT_ORDER=A B R\n");
            sim
        } else {
            let sim = SimBoot::grub(&d).unwrap();
            grub_set(&sim, &["set", "ORDER=A B R"]);
            sim
        };
        let order = || {
            if kind == SimKind::Uboot {
                printenv(&sim).unwrap()["BOOT_ORDER"].clone()
            } else {
                grub_vars(&sim)["ORDER"].clone()
            }
        };
        let b = backend(&sim);
        assert_eq!(power_on(&sim, &*b), Slot::A);
        b.mark_good(Slot::A).unwrap();
        assert_eq!(order(), "A B R", "{kind:?}");
        b.set_trial(Slot::B).unwrap();
        assert_eq!(order(), "B A R", "{kind:?}");
        assert_eq!(power_on(&sim, &*b), Slot::B, "{kind:?}");
        b.mark_good(Slot::B).unwrap();
        b.mark_bad(Slot::A).unwrap();
        assert_eq!(order(), "B R", "{kind:?}: the bad slot leaves, R stays");
        b.mark_good(Slot::A).unwrap();
        assert_eq!(order(), "A B R", "{kind:?}");
    }
}

/// Item i: U-Boot reads counters as hex (`test 0x${BOOT_A_LEFT}`, `setexpr` writes hex).
#[test]
fn uboot_counters_are_hex() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(dir.path()).unwrap();
    setenv(&sim, "BOOT_A_LEFT=a\nBOOT_B_LEFT=0\n");
    let b = backend(&sim);
    assert!(b.is_good(Slot::A).unwrap(), "a = ten attempts");
    assert_eq!(b.primary().unwrap(), Slot::A);
    assert_eq!(power_on(&sim, &*b), Slot::A);
    assert_eq!(
        printenv(&sim).unwrap()["BOOT_A_LEFT"],
        "9",
        "U-Boot decrements in hex"
    );
    setenv(&sim, "BOOT_A_LEFT=f\n");
    b.confirm(Slot::A).unwrap();
    assert_eq!(printenv(&sim).unwrap()["BOOT_A_LEFT"], FRESH_ATTEMPTS.to_string());
    setenv(&sim, "BOOT_A_LEFT=0x3\n");
    let err = b.is_good(Slot::A).expect_err("U-Boot would read 0x0x3 as 0");
    assert!(err.to_string().contains("BOOT_A_LEFT"), "{err}");
}

/// Item i: a bad slot leaves BOOT_ORDER, so the script's "no slot left: reset every counter"
/// path cannot bring it back.
#[test]
fn uboot_bad_slot_never_comes_back_through_the_counter_reset() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(dir.path()).unwrap();
    let b = backend(&sim);
    assert_eq!(power_on(&sim, &*b), Slot::A);
    b.mark_good(Slot::A).unwrap();
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(&sim, &*b), Slot::B);
    assert_eq!(power_on(&sim, &*b), Slot::A, "failed trial falls back");
    b.mark_bad(Slot::B).unwrap();
    assert!(!printenv(&sim).unwrap()["BOOT_ORDER"].contains('B'));
    // A is never confirmed again: its counter runs out, U-Boot resets the counters.
    for i in 0..(3 * FRESH_ATTEMPTS) {
        assert_eq!(power_on(&sim, &*b), Slot::A, "boot {i}");
    }
    assert!(
        !b.is_good(Slot::B).unwrap(),
        "B is still bad: {:?}",
        printenv(&sim)
    );
    // Putting B back is set_trial's job.
    b.set_trial(Slot::B).unwrap();
    assert_eq!(printenv(&sim).unwrap()["BOOT_ORDER"], "B A");
}

/// confirm() restores attempts and touches nothing else; a second call writes nothing.
#[test]
fn confirm_restores_attempts_only() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::uboot(dir.path()).unwrap();
    let b = backend(&sim);
    b.set_trial(Slot::B).unwrap();
    setenv(&sim, "BOOT_A_LEFT=1\n");
    b.confirm(Slot::A).unwrap();
    let vars = printenv(&sim).unwrap();
    assert_eq!(vars["BOOT_A_LEFT"], FRESH_ATTEMPTS.to_string());
    assert_eq!(vars["BOOT_ORDER"], "B A", "the order is not confirm's business");
    assert_eq!(vars["BOOT_B_LEFT"], "1");
    let files = [dir.path().join("uboot.env"), dir.path().join("uboot-redund.env")];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    b.confirm(Slot::A).unwrap();
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "already confirmed: nothing written");

    let gdir = tempfile::tempdir().unwrap();
    let sim = SimBoot::grub(gdir.path()).unwrap();
    let b = backend(&sim);
    assert_eq!(power_on(&sim, &*b), Slot::A);
    assert_eq!(grub_vars(&sim)["A_TRY"], "1");
    b.confirm(Slot::A).unwrap();
    let vars = grub_vars(&sim);
    assert_eq!((vars["A_TRY"].as_str(), vars["A_OK"].as_str()), ("0", "1"));
    assert_eq!(vars["ORDER"], "A B");
}

/// Item h: a missing x_OK reads as 0, as RAUC's grub.conf presets it.
#[test]
fn grub_missing_ok_is_not_bootable() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::grub(dir.path()).unwrap();
    grub_set(&sim, &["unset", "B_OK"]);
    let b = backend(&sim);
    assert!(!b.is_good(Slot::B).unwrap(), "{:?}", grub_vars(&sim));
    assert!(b.is_good(Slot::A).unwrap());
    assert_eq!(power_on(&sim, &*b), Slot::A);
    // A never gets confirmed: GRUB has nothing left to try, and must not pick the unwritten B.
    assert_eq!(sim.power_on().unwrap(), 'R', "rescue entry, not B");
}

fn stat(p: &Path) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

/// Item h: grubenv is written only on change, and by renaming a complete new 1024-byte file
/// over it (grub-editenv alone truncates and rewrites in place).
#[test]
fn grub_writes_only_on_change_and_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::grub(dir.path()).unwrap();
    let b = backend(&sim);
    assert_eq!(power_on(&sim, &*b), Slot::A);
    b.mark_good(Slot::A).unwrap();
    let after_first = stat(&sim.env);
    std::thread::sleep(Duration::from_millis(20));
    b.mark_good(Slot::A).unwrap();
    b.confirm(Slot::A).unwrap();
    assert_eq!(stat(&sim.env), after_first, "nothing changed, nothing written");

    b.set_trial(Slot::B).unwrap();
    let after_trial = stat(&sim.env);
    assert_ne!(after_trial.0, after_first.0, "a new file was renamed into place");
    assert_eq!(std::fs::metadata(&sim.env).unwrap().len(), 1024);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("grubenv") && n != "grubenv")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(grub_vars(&sim)["ORDER"], "B A");
}

/// Item h: after a failed trial the running old slot is bootable at every instant: marking the
/// trial slot bad also clears the TRY flag GRUB set on the old slot while booting it.
#[test]
fn grub_failed_trial_never_leaves_nothing_bootable() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimBoot::grub(dir.path()).unwrap();
    let b = backend(&sim);
    assert_eq!(power_on(&sim, &*b), Slot::A);
    b.mark_good(Slot::A).unwrap();
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(&sim, &*b), Slot::B);
    assert_eq!(power_on(&sim, &*b), Slot::A, "trial failed, A again");
    // The engine's first write after the failed trial: B bad. A power cut right after it must
    // still boot A, not GRUB's default entry.
    b.mark_bad(Slot::B).unwrap();
    assert_eq!(b.primary().unwrap(), Slot::A, "{:?}", grub_vars(&sim));
    assert_eq!(sim.power_on().unwrap(), 'A');
}

/// Item o: a bootloader tool that hangs is killed with its process group after
/// `boot.tool_timeout`, and the error carries its stderr.
#[test]
fn hanging_boot_tool_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("stuck.sh");
    let pidfile = dir.path().join("sleeper.pid");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho 'env flash not answering' >&2\nsleep 120 &\necho $! > {}\nwait\n",
            pidfile.display()
        ),
    )
    .unwrap();
    set_exec(&script);
    let mut cfg = config(&SimBoot::script(dir.path()).unwrap());
    cfg.script = Some(script);
    // Long enough for the script to start, complain and write its pidfile on a loaded machine.
    cfg.tool_timeout = Duration::from_secs(3);
    let err = Script::new(&cfg)
        .unwrap()
        .set_trial(Slot::B)
        .expect_err("must time out");
    let msg = err.to_string();
    assert!(matches!(err, BootError::Timeout { .. }), "{msg}");
    assert!(
        msg.contains("set-primary b") && msg.contains("not answering"),
        "{msg}"
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    for _ in 0..500 {
        let alive = std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the script's background sleep {pid} survived the timeout");
}

#[test]
fn grub_creates_a_missing_grubenv() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = SimBoot::grub(dir.path()).unwrap();
    sim.env = dir.path().join("missing-grubenv");
    let b = backend(&sim);
    assert!(b.primary().is_err(), "nothing is bootable without a grubenv");
    assert!(!sim.env.exists(), "reading must not create the file");
    b.mark_good(Slot::A).unwrap();
    b.set_trial(Slot::B).unwrap();
    assert!(sim.env.exists());
    assert_eq!(std::fs::metadata(&sim.env).unwrap().len(), 1024);
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
        format!(
            "{} 0x0 0x4000\n{} 0x0 0x4000\n",
            dir.path().join("gone.env").display(),
            dir.path().join("gone-redund.env").display()
        ),
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
