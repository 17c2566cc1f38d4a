//! Reboot mode against REAL U-Boot: every power-on is a run of Debian's `u-boot-qemu` under
//! `qemu-system-aarch64`, reading from pflash what the agent's `fw_setenv` wrote, running RAUC's
//! boot script and saving its counters back (see `flightnode_tests::uboot_qemu`).
//!
//! The tools come from `./test.sh`; without them these tests fail (set
//! `FLIGHTNODE_SKIP_UBOOT_QEMU=1` to skip them knowingly).

mod common;
use common::*;
use flightnode_agent::boot::{BootBackend, UBoot};
use flightnode_agent::config::{BootBackendKind, BootConfig};
use flightnode_agent::proto::Slot;
use flightnode_tests::boot_sim::SimBoot;
use flightnode_tests::uboot_qemu::UbootQemu;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

fn machine(sim: &SimBoot) -> &UbootQemu {
    sim.qemu.as_deref().expect("a real U-Boot sim")
}

fn backend(sim: &SimBoot) -> UBoot {
    let redundant = machine(sim).redundant();
    UBoot::new(&BootConfig {
        backend: BootBackendKind::Uboot,
        cmdline: sim.cmdline.clone(),
        boot_id: sim.boot_id.clone(),
        fw_env_config: sim.env.clone(),
        grubenv: "/nonexistent/grubenv".into(),
        script: None,
        attempts: 3,
        initial_env: sim.initial_env.clone(),
        tool_timeout: Duration::from_mins(1),
        // Debian's U-Boot keeps one copy; the redundant board must open without the opt-in.
        allow_single_copy_env: !redundant,
    })
    .expect("open the U-Boot backend")
}

fn env(sim: &SimBoot, key: &str) -> String {
    machine(sim)
        .printenv()
        .unwrap()
        .expect("a valid environment")
        .get(key)
        .cloned()
        .unwrap_or_default()
}

fn power_on(sim: &SimBoot) -> char {
    sim.power_on().expect("a real U-Boot power-on")
}

/// Item f: on erased flash the agent refuses to write an environment of its own variables
/// (U-Boot would load it, find no bootcmd and stop at its prompt); with the board's initial
/// environment configured, the environment it writes boots the slot it asked for.
#[test]
fn blank_flash_is_written_only_from_the_initial_env() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu_blank(dir.path()).unwrap() else {
        return;
    };
    let cfg = BootConfig {
        backend: BootBackendKind::Uboot,
        cmdline: sim.cmdline.clone(),
        boot_id: sim.boot_id.clone(),
        fw_env_config: sim.env.clone(),
        grubenv: "/nonexistent/grubenv".into(),
        script: None,
        attempts: 3,
        initial_env: dir.path().join("missing-initial-env"),
        tool_timeout: Duration::from_mins(1),
        allow_single_copy_env: true,
    };
    let no_init = UBoot::new(&cfg).unwrap();
    let err = no_init
        .set_trial(Slot::B)
        .expect_err("must refuse on blank flash");
    assert!(err.to_string().contains("bootcmd"), "{err}");
    assert!(machine(&sim).printenv().unwrap().is_none(), "nothing written");

    let b = backend(&sim);
    b.set_trial(Slot::B).unwrap();
    assert_eq!(
        power_on(&sim),
        'B',
        "U-Boot boots the trial from the written environment"
    );
    let boot = machine(&sim).last().unwrap();
    assert!(
        !boot.env_was_blank,
        "U-Boot loaded our environment:\n{}",
        boot.log
    );
    assert_eq!(power_on(&sim), 'A', "and falls back after the one attempt");
    assert_eq!(b.booted().unwrap(), Slot::A);
}

/// Item g: a recovery entry in BOOT_ORDER survives the agent's writes and U-Boot's saves.
#[test]
fn recovery_entry_survives_agent_writes_and_real_boots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu(dir.path()).unwrap() else {
        return;
    };
    machine(&sim).setenv("BOOT_ORDER=A B R\n").unwrap();
    let b = backend(&sim);
    assert_eq!(power_on(&sim), 'A');
    b.mark_good(Slot::A).unwrap();
    b.set_trial(Slot::B).unwrap();
    assert_eq!(env(&sim, "BOOT_ORDER"), "B A R");
    assert_eq!(power_on(&sim), 'B');
    b.mark_good(Slot::B).unwrap();
    b.mark_bad(Slot::A).unwrap();
    assert_eq!(env(&sim, "BOOT_ORDER"), "B R");
    for _ in 0..2 {
        assert_eq!(power_on(&sim), 'B');
        b.confirm(Slot::B).unwrap();
    }
    assert_eq!(env(&sim, "BOOT_ORDER"), "B R", "U-Boot's saveenv keeps it");
}

/// Item i: counters are hex both ways, and a bad slot removed from BOOT_ORDER does not come
/// back through the script's "no slot left: reset every counter" path.
#[test]
fn hex_counters_and_the_counter_reset_never_revive_a_bad_slot() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu(dir.path()).unwrap() else {
        return;
    };
    let b = backend(&sim);
    machine(&sim).setenv("BOOT_A_LEFT=10\n").unwrap();
    assert_eq!(power_on(&sim), 'A');
    assert_eq!(env(&sim, "BOOT_A_LEFT"), "f", "U-Boot decremented 0x10");
    assert_eq!(b.primary().unwrap(), Slot::A, "the agent reads f as fifteen");
    b.confirm(Slot::A).unwrap();
    assert_eq!(env(&sim, "BOOT_A_LEFT"), "3");

    // A failed trial of B, then B is bad.
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(&sim), 'B');
    assert_eq!(power_on(&sim), 'A', "trial not confirmed: fallback");
    b.mark_bad(Slot::B).unwrap();
    b.mark_good(Slot::A).unwrap();
    // A runs out without being confirmed: U-Boot resets every counter and boots again.
    machine(&sim).setenv("BOOT_A_LEFT=1\n").unwrap();
    assert_eq!(power_on(&sim), 'A');
    assert_eq!(power_on(&sim), 'A');
    assert_eq!(machine(&sim).last().unwrap().resets, 1, "the reset path ran");
    assert!(!env(&sim, "BOOT_ORDER").contains('B'));
    assert!(
        !b.is_good(Slot::B).unwrap(),
        "B stays bad after the counter reset"
    );
}

fn reboot_device(sim: &SimBoot) -> Device {
    Device::new(Options {
        extra: format!(
            "[activation]\nmode = \"reboot\"\nreboot_command = \"kill -9 $FLIGHTNODE_AGENT_PID\"\nreboot_wait = \"30s\"\n{}",
            sim.boot_toml()
        ),
        ..Options::default()
    })
}

/// Issue 11, scenario 1: power cuts while slot B is written. Each boot the download resumes and
/// is cut again; U-Boot must never start the half-written B.
#[test]
fn power_cuts_while_b_is_written_never_boot_b() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu(dir.path().join("board").as_path()).unwrap() else {
        return;
    };
    assert_eq!(power_on(&sim), 'A');
    let dev = reboot_device(&sim);
    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "first boot: {}", text(&o));
    let size = 1_000_000;
    let bundle = dev.bundle("v2", "2.0.0", size, &[]);
    let mut boots = vec!['A'];
    for (i, cut) in [150_000u64, 350_000, 550_000, 750_000].iter().enumerate() {
        let args = if i == 0 {
            vec!["install", bundle.to_str().unwrap()]
        } else {
            vec!["resume"]
        };
        let o = dev
            .cmd(&args)
            .env("FLIGHTNODE_FAILPOINT", format!("download@{cut}"))
            .output()
            .unwrap();
        assert_eq!(o.status.signal(), Some(9), "cut {i} at {cut}: {}", text(&o));
        let slot = power_on(&sim);
        boots.push(slot);
        assert_eq!(
            slot,
            'A',
            "power-on after cut {i} booted the half-written B; boots {boots:?}, env {:?}",
            machine(&sim).printenv()
        );
    }
    // The download finishes, the trial boots B, B commits.
    let o = dev.run(&["resume"]);
    assert_eq!(o.status.signal(), Some(9), "staged and rebooting: {}", text(&o));
    assert_eq!(power_on(&sim), 'B');
    let o = dev.run(&["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.status();
    assert_eq!(s["last_upgrade"]["result"], "committed", "{s:#}");
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", size));
}

/// Issue 11, scenario 2: a staged trial rejected with `mark-bad other` before the reboot
/// happened: the next power-on boots A, not the never-checked B.
#[test]
fn staged_trial_rejected_before_the_reboot_boots_a() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu(dir.path().join("board").as_path()).unwrap() else {
        return;
    };
    assert_eq!(power_on(&sim), 'A');
    let dev = reboot_device(&sim);
    assert!(dev.run(&["resume"]).status.success());
    let bundle = dev.bundle("v12", "1.2.0", 50_000, &[]);
    let o = dev.run(&["install", bundle.to_str().unwrap()]);
    assert_eq!(o.status.signal(), Some(9), "reboot requested: {}", text(&o));
    // The reboot did not happen (the kill stands for a reboot command that failed).
    let o = dev.run(&["mark-bad", "other"]);
    let said = text(&o);
    let slot = power_on(&sim);
    assert_eq!(
        slot,
        'A',
        "mark-bad other ({}: {said}) must cancel the trial; env {:?}",
        o.status,
        machine(&sim).printenv()
    );
    let o = dev.run(&["resume"]);
    let s = dev.status();
    assert_eq!(s["booted_slot"], "a", "{s:#}\n{}", text(&o));
    assert_eq!(s["active_slot"], "a", "{s:#}");
    assert_ne!(s["slots"]["b"]["state"], "good", "{s:#}");
    assert_eq!(power_on(&sim), 'A');
}

/// CRC-32 (IEEE), as U-Boot checks an environment copy.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One copy of the environment as a medium holds it: its CRC, then (`flag` bytes: 1 for a
/// redundant copy) a flag, then the data the CRC covers.
struct Copy {
    off: usize,
    size: usize,
    flag: usize,
}

impl Copy {
    fn crc_ok(&self, medium: &[u8]) -> bool {
        let c = &medium[self.off..self.off + self.size];
        crc32(&c[4 + self.flag..]).to_le_bytes() == c[..4]
    }
}

/// Runs `write` (a backend call that changes one copy of the environment with the real
/// `fw_setenv`) and then tears it as a power cut during that write leaves the medium: the first
/// `tear(written_copy, old, new)` bytes of the copy it wrote are new, the rest is as before.
/// Returns the copy it tore, checked to have a bad CRC now.
fn tear_write<'c>(
    m: &UbootQemu,
    copies: &'c [Copy],
    write: impl FnOnce(),
    tear: impl Fn(&[u8], &[u8]) -> usize,
) -> &'c Copy {
    let before = std::fs::read(&m.flash).unwrap();
    write();
    let after = std::fs::read(&m.flash).unwrap();
    let written: Vec<&Copy> = copies
        .iter()
        .filter(|c| before[c.off..c.off + c.size] != after[c.off..c.off + c.size])
        .collect();
    assert_eq!(written.len(), 1, "fw_setenv writes exactly one copy");
    let c = written[0];
    let (old, new) = (&before[c.off..c.off + c.size], &after[c.off..c.off + c.size]);
    assert!(
        before[..c.off] == after[..c.off] && before[c.off + c.size..] == after[c.off + c.size..],
        "and nothing outside it"
    );
    let n = tear(old, new);
    let mut torn = before;
    torn[c.off..c.off + n].copy_from_slice(&new[..n]);
    assert!(!c.crc_ok(&torn), "the torn copy at {:#x} fails its CRC", c.off);
    std::fs::write(&m.flash, &torn).unwrap();
    c
}

/// Where a write is torn, given the copy's old and new bytes: how many leading bytes are new.
type Tear = Box<dyn Fn(&[u8], &[u8]) -> usize>;

/// Tear points of a write: only the header (CRC and flag) is new; or everything up to the last
/// byte that changes (as when the medium lost power inside that page).
fn tears(header: usize) -> [Tear; 2] {
    [
        Box::new(move |_, _| header),
        Box::new(|old: &[u8], new: &[u8]| {
            (0..old.len())
                .rev()
                .find(|&i| old[i] != new[i])
                .expect("the write changes the copy")
        }),
    ]
}

/// The boot script's variables as U-Boot read them at the last power-on (its first line), and
/// as the host tools read them now, in the same form.
fn env_u_boot_read(m: &UbootQemu) -> String {
    let log = m.last().unwrap().log;
    log.lines()
        .find_map(|l| l.strip_prefix("FLIGHTNODE-ENV "))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn env_host_reads(sim: &SimBoot) -> String {
    format!(
        "BOOT_ORDER={} BOOT_A_LEFT={} BOOT_B_LEFT={}",
        env(sim, "BOOT_ORDER"),
        env(sim, "BOOT_A_LEFT"),
        env(sim, "BOOT_B_LEFT")
    )
}

/// Committed B, then two power-ons before the agent confirmed: the environment's copies now
/// differ in `BOOT_B_LEFT`, so the confirm's write changes the copy it overwrites.
fn commit_b_and_boot_twice(sim: &SimBoot, b: &UBoot) {
    assert_eq!(power_on(sim), 'A');
    b.set_trial(Slot::B).unwrap();
    assert_eq!(power_on(sim), 'B', "the trial");
    b.mark_good(Slot::B).unwrap();
    assert_eq!(power_on(sim), 'B', "committed");
    assert_eq!(power_on(sim), 'B');
}

/// Issue 21 item h, the layout the agent requires: U-Boot built with a redundant environment
/// (two copies on an SD card). A power cut tears the agent's `fw_setenv` write of one copy; the
/// other copy is still valid and U-Boot boots what the last completed write said (the committed
/// B, with the counter U-Boot itself saved last), not slot A on its default environment.
#[test]
fn redundant_env_a_torn_write_boots_what_the_last_complete_write_said() {
    use flightnode_tests::uboot_qemu::{SD_ENV_COPIES, SD_ENV_SIZE};
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu_redundant(&dir.path().join("board")).unwrap() else {
        return;
    };
    let m = machine(&sim);
    let b = backend(&sim);
    commit_b_and_boot_twice(&sim, &b);
    let copies = SD_ENV_COPIES.map(|off| Copy {
        off,
        size: SD_ENV_SIZE,
        flag: 1,
    });
    let committed = std::fs::read(&m.flash).unwrap();
    let last_complete = env_host_reads(&sim);
    assert_eq!(last_complete, "BOOT_ORDER=B A BOOT_A_LEFT=2 BOOT_B_LEFT=1");
    for (i, tear) in tears(5).iter().enumerate() {
        std::fs::write(&m.flash, &committed).unwrap();
        let torn = tear_write(m, &copies, || b.confirm(Slot::B).unwrap(), tear);
        let other = copies.iter().find(|c| c.off != torn.off).unwrap();
        assert!(
            other.crc_ok(&std::fs::read(&m.flash).unwrap()),
            "tear {i}: the other copy is intact"
        );
        assert_eq!(power_on(&sim), 'B', "tear {i}: the committed slot boots");
        let boot = m.last().unwrap();
        assert!(
            !boot.env_was_blank,
            "tear {i}: U-Boot found a valid copy:\n{}",
            boot.log
        );
        assert_eq!(env_u_boot_read(m), last_complete, "tear {i}: what U-Boot read");
        assert_eq!(b.booted().unwrap(), Slot::B);
        // This boot took B's last attempt; the agent's confirm restores them, and it lands.
        b.confirm(Slot::B).unwrap();
        assert!(b.is_good(Slot::B).unwrap(), "tear {i}: B stays committed");
        assert_eq!(env_host_reads(&sim), "BOOT_ORDER=B A BOOT_A_LEFT=2 BOOT_B_LEFT=3");
    }
}

/// What the refusal guards against, on Debian's single-copy U-Boot: the same torn write leaves no
/// valid environment, and U-Boot boots slot A on its built-in default although B was committed.
#[test]
fn single_copy_env_a_torn_write_boots_a_on_the_default_environment() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = SimBoot::uboot_qemu(&dir.path().join("board")).unwrap() else {
        return;
    };
    let m = machine(&sim);
    let b = backend(&sim);
    commit_b_and_boot_twice(&sim, &b);
    let copy = [Copy {
        off: 0,
        size: 0x40000,
        flag: 0,
    }];
    let [header, _] = tears(4);
    tear_write(m, &copy, || b.confirm(Slot::B).unwrap(), header);
    assert_eq!(power_on(&sim), 'A', "the committed B is not booted");
    assert!(
        m.last().unwrap().env_was_blank,
        "U-Boot ran on its default environment"
    );
}
