//! REAL U-Boot for reboot-mode tests: Debian's `u-boot-qemu` (2023.01, `qemu_arm64`) under
//! `qemu-system-aarch64` >= 8, its environment in pflash where the host's `fw_printenv`/
//! `fw_setenv` read and write it, and RAUC's A/B boot script on a small FAT boot disk.
//!
//! One [`UbootQemu::power_on`] is one real U-Boot run: U-Boot loads the environment from flash,
//! its stock `distro_bootcmd` finds `/boot.scr` on the virtio disk and sources it, the script
//! picks a slot exactly as RAUC's `contrib/uboot.sh` does (hex counters, `setexpr`, `saveenv`,
//! "no slot left: reset every counter and `reset`"), prints a marker and powers the machine off.
//! Nothing boots a kernel: the slot in the marker is the answer.
//!
//! Facts this relies on (Debian's `config.qemu_arm64`): `CONFIG_ENV_IS_IN_FLASH`, env at
//! 0x4000000 = offset 0 of virt's second 64 MiB flash bank (`-drive if=pflash,unit=1`), size
//! and sector 0x40000, one copy. Debian 12's own qemu 7.2 drops U-Boot's buffered flash writes
//! (QEMU issue 2343: `saveenv` fails); `./test.sh` unpacks bookworm-backports' qemu under
//! `target/uboot-qemu`, which [`require`] finds.
//!
//! [`UbootQemu::new_redundant`] boots the same U-Boot source built with a REDUNDANT environment
//! instead (`tests/uboot/build-redundant.sh`, which `./test.sh` runs into
//! `target/uboot-qemu/redundant`): two copies on an SD card (`-device sdhci-pci -device
//! sd-card`), at 0x100000 and 0x120000, 0x20000 bytes each, as eMMC/SD boards keep it.
//!
//! The initial environment a board ships as `/etc/u-boot-initial-env` is U-Boot's built-in
//! default environment. Debian does not ship one, so the first machine of a process boots once
//! on erased flash, lets U-Boot save its default environment, and keeps that (minus the boot
//! script's variables, with `bootdelay=0`) as the initial environment of every machine.

use anyhow::{Context, anyhow, bail};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::tool::run;

/// Set to `1` to let the real-U-Boot tests pass without running when the tools are missing.
/// CI never sets it: there, missing tools fail the tests.
pub const SKIP_ENV: &str = "FLIGHTNODE_SKIP_UBOOT_QEMU";

const UBOOT_BIN: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
const ENV_SIZE: usize = 0x40000;
const FLASH_BYTES: usize = 64 * 1024 * 1024;
/// The redundant build's SD card: its size (qemu wants a power of two) and the two copies.
const SD_BYTES: usize = 16 * 1024 * 1024;
/// Offsets of the redundant build's two environment copies on the SD card.
pub const SD_ENV_COPIES: [usize; 2] = [0x10_0000, 0x12_0000];
/// Size of each of them.
pub const SD_ENV_SIZE: usize = 0x2_0000;
/// A generous bound for one power-on on a busy 2-core machine (a boot takes about 0.5 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// RAUC's U-Boot boot script (the logic of RAUC's `contrib/uboot.sh`), with markers instead of
/// loading a kernel.
const BOOT_SCRIPT: &str = r#"# RAUC A/B slot selection (RAUC contrib/uboot.sh logic); markers instead of a kernel.
echo "FLIGHTNODE-ENV BOOT_ORDER=${BOOT_ORDER} BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT}"
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv bootargs
fn_slot=
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test "x${bootargs}" != "x"; then
    # a slot was chosen already
  elif test "x${BOOT_SLOT}" = "xA"; then
    if test 0x${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      fn_slot=A
      setenv bootargs "root=/dev/vda2 rauc.slot=A"
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    if test 0x${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      fn_slot=B
      setenv bootargs "root=/dev/vda3 rauc.slot=B"
    fi
  fi
done

if test -n "${bootargs}"; then
  if saveenv; then echo "FLIGHTNODE-SAVEENV ok"; else echo "FLIGHTNODE-SAVEENV FAILED"; fi
else
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  if saveenv; then echo "FLIGHTNODE-SAVEENV ok"; else echo "FLIGHTNODE-SAVEENV FAILED"; fi
  echo "FLIGHTNODE-RESET no slot left"
  reset
fi
echo "FLIGHTNODE-BOOT slot=${fn_slot}"
poweroff
"#;

/// The programs a machine needs.
#[derive(Debug, Clone)]
pub struct Tools {
    qemu: PathBuf,
    /// `-L` and `QEMU_MODULE_DIR` for a qemu unpacked outside `/usr`.
    qemu_data: Option<(PathBuf, PathBuf)>,
    uboot: PathBuf,
    /// The redundant-environment build, when `./test.sh` made it.
    uboot_redundant: Option<PathBuf>,
}

impl Tools {
    /// `qemu-system-aarch64` with this qemu's firmware and module dirs, and Debian's U-Boot as
    /// the firmware (`-bios`): the start of every command line that boots this U-Boot.
    pub fn qemu_with_uboot(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        if let Some((data, modules)) = &self.qemu_data {
            cmd.arg("-L").arg(data).env("QEMU_MODULE_DIR", modules);
        }
        cmd.arg("-bios").arg(&self.uboot);
        cmd
    }
}

/// What one power-on did.
#[derive(Debug, Clone)]
pub struct PowerOn {
    /// The slot U-Boot booted.
    pub slot: char,
    /// How often the script found no slot and reset the counters first.
    pub resets: usize,
    /// U-Boot found no valid environment and ran on its built-in default.
    pub env_was_blank: bool,
    /// The serial console.
    pub log: String,
}

/// The tools, or why they are missing (with what installs them).
pub fn find_tools() -> Result<Tools, String> {
    let uboot =
        std::env::var_os("FLIGHTNODE_UBOOT_BIN").map_or_else(|| PathBuf::from(UBOOT_BIN), PathBuf::from);
    let mut missing = Vec::new();
    if !uboot.is_file() {
        missing.push(format!("{} (package u-boot-qemu)", uboot.display()));
    }
    for (tool, package) in [
        ("mkimage", "u-boot-tools"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("fw_setenv", "libubootenv-tool"),
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} (package {package})"));
        }
    }
    let qemu = find_qemu();
    if let Err(e) = &qemu {
        missing.push(e.clone());
    }
    if !missing.is_empty() {
        return Err(missing.join("; "));
    }
    let (qemu, qemu_data) = qemu?;
    let uboot_redundant = std::env::var_os("FLIGHTNODE_UBOOT_REDUNDANT_BIN")
        .map(PathBuf::from)
        .or_else(|| under_target("uboot-qemu/redundant/u-boot.bin"))
        .filter(|p| p.is_file());
    Ok(Tools {
        qemu,
        qemu_data,
        uboot,
        uboot_redundant,
    })
}

/// The tools with the redundant-environment U-Boot, under the same rules as [`require`].
///
/// # Panics
///
/// When a tool or that build is missing and [`SKIP_ENV`] is not `1`.
pub fn require_redundant() -> Option<Tools> {
    wait_for_redundant_build();
    let mut tools = require()?;
    if tools.uboot_redundant.is_none() {
        // It may have been looked for before the background build finished.
        tools.uboot_redundant = under_target("uboot-qemu/redundant/u-boot.bin").filter(|p| p.is_file());
    }
    if tools.uboot_redundant.is_some() {
        return Some(tools);
    }
    let why = "no U-Boot built with a redundant environment under target/uboot-qemu/redundant \
               (tests/uboot/build-redundant.sh makes it; ./test.sh runs it as root and logs to \
               build.log there) and \
               FLIGHTNODE_UBOOT_REDUNDANT_BIN is not set";
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("skipping a real-U-Boot test ({SKIP_ENV}=1): {why}");
        return None;
    }
    panic!("{why}; or set {SKIP_ENV}=1 to skip the real-U-Boot tests knowingly")
}

/// Waits while `./test.sh` builds the redundant-environment U-Boot in the background: it holds
/// this lock from before the build starts until it ends.
fn wait_for_redundant_build() {
    if std::env::var_os("FLIGHTNODE_UBOOT_REDUNDANT_BIN").is_some() {
        return;
    }
    let Some(path) = under_target("uboot-qemu/redundant/.build.lock") else {
        return;
    };
    match std::fs::File::open(&path) {
        Ok(lock) => {
            if let Err(e) = lock.lock_shared() {
                eprintln!(
                    "not waiting for the U-Boot build: locking {}: {e}",
                    path.display()
                );
            }
        }
        Err(e) => eprintln!(
            "not waiting for the U-Boot build: opening {}: {e}",
            path.display()
        ),
    }
}

/// `rel` under `CARGO_TARGET_DIR` or the first ancestor of this test binary that has it.
fn under_target(rel: &str) -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        roots.push(PathBuf::from(t));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.exists())
}

/// The tools, or `None` when they are missing and [`SKIP_ENV`]`=1`. Missing tools otherwise
/// panic with a message naming `./test.sh`, so CI cannot pass without running these tests.
///
/// # Panics
///
/// When a tool is missing and [`SKIP_ENV`] is not `1`.
pub fn require() -> Option<Tools> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(find_tools) {
        Ok(t) => Some(t.clone()),
        Err(why) if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") => {
            eprintln!("skipping a real-U-Boot test ({SKIP_ENV}=1): {why}");
            None
        }
        Err(why) => panic!(
            "real U-Boot tests need tools that are missing: {why}. Run ./test.sh as root once \
             (it installs u-boot-qemu, u-boot-tools, dosfstools, mtools and unpacks \
             bookworm-backports' qemu-system-arm under target/uboot-qemu), or set {SKIP_ENV}=1 \
             to skip them knowingly"
        ),
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// `FLIGHTNODE_QEMU_AARCH64`, else the unpacked backports qemu under a `target/uboot-qemu`
/// next to this test binary, else `qemu-system-aarch64` on PATH; version 8 or later.
fn find_qemu() -> Result<(PathBuf, Option<(PathBuf, PathBuf)>), String> {
    let mut candidates = Vec::new();
    if let Some(q) = std::env::var_os("FLIGHTNODE_QEMU_AARCH64") {
        candidates.push(PathBuf::from(q));
    }
    candidates.extend(under_target("uboot-qemu/root/usr/bin/qemu-system-aarch64").filter(|q| q.is_file()));
    candidates.extend(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("qemu-system-aarch64"))
            .filter(|p| p.is_file()),
    );
    let mut seen = Vec::new();
    for q in candidates {
        let data = unpacked_data(&q);
        let mut cmd = Command::new(&q);
        cmd.arg("--version");
        if let Some((_, modules)) = &data {
            cmd.env("QEMU_MODULE_DIR", modules);
        }
        let version = cmd
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        let major = version
            .split("version ")
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m >= 8 => return Ok((q, data)),
            _ => seen.push(format!(
                "{} ({})",
                q.display(),
                if version.is_empty() {
                    "does not run"
                } else {
                    version.as_str()
                }
            )),
        }
    }
    Err(format!(
        "qemu-system-aarch64 >= 8 (Debian 12's 7.2 drops U-Boot's flash writes, QEMU issue 2343){}",
        if seen.is_empty() {
            String::new()
        } else {
            format!("; found only {}", seen.join(", "))
        }
    ))
}

/// For a qemu unpacked with `dpkg -x` (not under /usr): its firmware dir and module dir.
fn unpacked_data(qemu: &Path) -> Option<(PathBuf, PathBuf)> {
    let prefix = qemu.parent()?.parent()?;
    if prefix == Path::new("/usr") || !prefix.join("share/qemu").is_dir() {
        return None;
    }
    Some((
        prefix.join("share/qemu"),
        prefix.join("lib/x86_64-linux-gnu/qemu"),
    ))
}

/// Where a board's U-Boot keeps its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Debian's build: one copy at the start of pflash unit 1.
    Pflash,
    /// The redundant build: two copies on an SD card ([`SD_ENV_COPIES`]).
    SdRedundant,
}

/// One board: flash image, boot disk, `fw_env.config` and initial environment in a directory.
#[derive(Debug)]
pub struct UbootQemu {
    tools: Tools,
    layout: Layout,
    /// Debian's build: pflash unit 1 (64 MiB), the environment is its first 0x40000 bytes. The
    /// redundant build: the SD card holding both copies ([`SD_ENV_COPIES`]).
    pub flash: PathBuf,
    bootdisk: PathBuf,
    /// `fw_env.config` for the host tools.
    pub fw_env_config: PathBuf,
    /// The board's initial environment (U-Boot's default environment as text).
    pub initial_env: PathBuf,
    boots: Mutex<u32>,
    last: Mutex<Option<PowerOn>>,
}

impl UbootQemu {
    /// A board in `dir`. With `init`, its environment is the initial one plus the boot script's
    /// variables (`BOOT_ORDER="A B"`, 3 attempts each), as a factory flashes it; else the flash
    /// is erased.
    pub fn new(tools: Tools, dir: &Path, init: bool) -> anyhow::Result<Self> {
        Self::with_layout(tools, dir, init, Layout::Pflash)
    }

    /// Like [`UbootQemu::new`], with the U-Boot built with a redundant environment (two copies on
    /// an SD card, two lines in `fw_env.config`); `tools` from [`require_redundant`].
    pub fn new_redundant(tools: Tools, dir: &Path, init: bool) -> anyhow::Result<Self> {
        Self::with_layout(tools, dir, init, Layout::SdRedundant)
    }

    /// Whether this board's environment has two copies.
    pub fn redundant(&self) -> bool {
        self.layout == Layout::SdRedundant
    }

    fn with_layout(tools: Tools, dir: &Path, init: bool, layout: Layout) -> anyhow::Result<Self> {
        if layout == Layout::SdRedundant && tools.uboot_redundant.is_none() {
            bail!("no redundant-environment U-Boot (see require_redundant)");
        }
        std::fs::create_dir_all(dir)?;
        let bootdisk = dir.join("bootdisk.img");
        make_bootdisk(dir, &bootdisk)?;
        let flash = dir.join(match layout {
            Layout::Pflash => "flash1-env.img",
            Layout::SdRedundant => "sd.img",
        });
        erase_medium(layout, &flash)?;
        let fw_env_config = dir.join("fw_env.config");
        std::fs::write(&fw_env_config, env_config(layout, &flash))?;
        let initial_env = dir.join("u-boot-initial-env");
        let machine = Self {
            tools,
            layout,
            flash,
            bootdisk,
            fw_env_config,
            initial_env,
            boots: Mutex::new(0),
            last: Mutex::new(None),
        };
        std::fs::write(&machine.initial_env, machine.default_env()?)?;
        if init {
            machine.setenv_with_default(
                "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n",
                &machine.initial_env,
            )?;
        }
        Ok(machine)
    }

    /// U-Boot's default environment, learnt once per process and build from a real boot on
    /// erased flash.
    fn default_env(&self) -> anyhow::Result<String> {
        static DEFAULT: [OnceLock<Result<String, String>>; 2] = [OnceLock::new(), OnceLock::new()];
        DEFAULT[usize::from(self.redundant())]
            .get_or_init(|| self.learn_default_env().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!("learning U-Boot's default environment: {e}"))
    }

    fn learn_default_env(&self) -> anyhow::Result<String> {
        let dir = tempfile::tempdir()?;
        let flash = dir.path().join("flash.img");
        erase_medium(self.layout, &flash)?;
        let cfg = dir.path().join("fw_env.config");
        std::fs::write(&cfg, env_config(self.layout, &flash))?;
        let boot = self.run_qemu(&flash)?;
        if !boot.env_was_blank {
            bail!("U-Boot did not report the erased flash as blank:\n{}", boot.log);
        }
        let out = run("fw_printenv", &["-c", &cfg.to_string_lossy()], None)?;
        // What the script and the boot added at run time is not part of the default.
        // Set by U-Boot and the distro boot loops at run time (never part of the default).
        let skip = [
            "BOOT_ORDER",
            "BOOT_A_LEFT",
            "BOOT_B_LEFT",
            "bootargs",
            "bootdelay",
            "fileaddr",
            "filesize",
            "devnum",
            "devtype",
            "devplist",
            "distro_bootpart",
            "bootfstype",
            "fdtcontroladdr",
            "stdin",
            "stdout",
            "stderr",
            "prefix",
            "script",
        ];
        let mut text = String::new();
        for line in out.lines() {
            let Some((k, _)) = line.split_once('=') else {
                continue;
            };
            if !skip.contains(&k) {
                text.push_str(line);
                text.push('\n');
            }
        }
        if !text.lines().any(|l| l.starts_with("bootcmd=")) {
            bail!("U-Boot's saved environment has no bootcmd:\n{out}");
        }
        // A board ships its own; ours boots without the 2 s autoboot delay.
        text.push_str("bootdelay=0\n");
        Ok(text)
    }

    /// `fw_setenv -c CFG -f DEFAULT -s -`: lines `name=value`.
    fn setenv_with_default(&self, script: &str, default: &Path) -> anyhow::Result<()> {
        run(
            "fw_setenv",
            &[
                "-c",
                &self.fw_env_config.to_string_lossy(),
                "-f",
                &default.to_string_lossy(),
                "-s",
                "-",
            ],
            Some(script),
        )?;
        Ok(())
    }

    /// `fw_setenv` on this board's environment (which must be valid), lines `name=value`.
    pub fn setenv(&self, script: &str) -> anyhow::Result<()> {
        self.setenv_with_default(script, Path::new("/nonexistent/no-default-env"))
    }

    /// The environment as the host tools read it; `None` when the flash holds no valid one.
    pub fn printenv(&self) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let cfg = self.fw_env_config.to_string_lossy();
        match run(
            "fw_printenv",
            &["-c", &cfg, "-f", "/nonexistent/no-default-env"],
            None,
        ) {
            Ok(out) => Ok(Some(
                out.lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )),
            // No valid copy: only then does an empty default environment make it succeed.
            Err(_) if run("fw_printenv", &["-c", &cfg, "-f", "/dev/null"], None).is_ok() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Erases the flash (no valid environment), as on a new board.
    pub fn erase_env(&self) -> anyhow::Result<()> {
        erase_medium(self.layout, &self.flash)
    }

    /// One power-on: a real U-Boot run. Fails when U-Boot did not reach the marker (stopped at
    /// its prompt, reset loop, timeout) or its `saveenv` failed.
    pub fn power_on(&self) -> anyhow::Result<PowerOn> {
        let boot = self.run_qemu(&self.flash)?;
        *self.last.lock().map_err(|_| anyhow!("poisoned"))? = Some(boot.clone());
        Ok(boot)
    }

    /// What the last [`UbootQemu::power_on`] did.
    pub fn last(&self) -> Option<PowerOn> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    fn run_qemu(&self, flash: &Path) -> anyhow::Result<PowerOn> {
        let n = {
            let mut b = self.boots.lock().map_err(|_| anyhow!("poisoned"))?;
            *b += 1;
            *b
        };
        let q = |p: &Path| p.to_string_lossy().replace(',', ",,");
        let mut cmd = Command::new(&self.tools.qemu);
        if let Some((data, modules)) = &self.tools.qemu_data {
            cmd.arg("-L").arg(data).env("QEMU_MODULE_DIR", modules);
        }
        cmd.args(["-M", "virt", "-cpu", "cortex-a57", "-smp", "1", "-m", "256M"])
            .args([
                "-display",
                "none",
                "-nodefaults",
                "-nic",
                "none",
                "-monitor",
                "none",
            ])
            .args(["-serial", "stdio"]);
        match (self.layout, &self.tools.uboot_redundant) {
            (Layout::SdRedundant, Some(redundant)) => {
                cmd.arg("-bios")
                    .arg(redundant)
                    .arg("-drive")
                    .arg(format!("if=none,id=sd,format=raw,file={}", q(flash)))
                    .args(["-device", "sdhci-pci", "-device", "sd-card,drive=sd"]);
            }
            (Layout::SdRedundant, None) => bail!("no redundant-environment U-Boot"),
            (Layout::Pflash, _) => {
                cmd.arg("-bios")
                    .arg(&self.tools.uboot)
                    .arg("-drive")
                    .arg(format!("if=pflash,unit=1,format=raw,file={}", q(flash)));
            }
        }
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=bootdisk,format=raw,readonly=on,file={}",
                q(&self.bootdisk)
            ))
            .args(["-device", "virtio-blk-pci,drive=bootdisk"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.tools.qemu.display()))?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stdout.take().map(|mut out| {
            let sink = Arc::clone(&console);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = out.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if let Ok(mut c) = sink.lock() {
                        c.extend_from_slice(&buf[..k]);
                    }
                }
            })
        });
        let result = watch(&mut child, &console);
        // Only our own child: it normally powered itself off already.
        let _ = child.kill();
        let _ = child.wait();
        if let Some(r) = reader {
            let _ = r.join();
        }
        let mut qemu_err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut qemu_err);
        }
        let log =
            String::from_utf8_lossy(&console.lock().map_err(|_| anyhow!("poisoned"))?).replace('\r', "");
        let fail = |why: &str| {
            anyhow!(
                "U-Boot power-on #{n}: {why}\nqemu stderr: {}\nconsole:\n{log}",
                qemu_err.trim()
            )
        };
        if let Err(why) = result {
            return Err(fail(&why));
        }
        if log.contains("FLIGHTNODE-SAVEENV FAILED") {
            return Err(fail(
                "U-Boot's saveenv failed (qemu older than 8? QEMU issue 2343)",
            ));
        }
        let slot = log
            .lines()
            .filter_map(|l| l.strip_prefix("FLIGHTNODE-BOOT slot="))
            .next_back()
            .and_then(|s| s.trim().chars().next())
            .ok_or_else(|| fail("no slot in the boot marker"))?;
        Ok(PowerOn {
            slot,
            resets: log.matches("FLIGHTNODE-RESET").count(),
            env_was_blank: log.contains("bad CRC, using default environment"),
            log,
        })
    }
}

/// Waits for the boot marker and qemu's exit; an error names what went wrong.
fn watch(child: &mut Child, console: &Mutex<Vec<u8>>) -> Result<(), String> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut prompt_since: Option<Instant> = None;
    loop {
        let text = console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        let marker = text.contains("FLIGHTNODE-BOOT ");
        match child.try_wait() {
            Ok(Some(_)) if marker => return Ok(()),
            Ok(Some(status)) => return Err(format!("qemu exited ({status}) before the boot marker")),
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for qemu: {e}")),
        }
        if marker {
            // The script powers off right after the marker; give qemu time to exit by itself.
            if Instant::now() >= deadline {
                return Ok(());
            }
        } else if text.matches("FLIGHTNODE-RESET").count() > 3 {
            return Err("U-Boot keeps resetting: no slot even after resetting the counters".into());
        } else if text.trim_end_matches(' ').ends_with("=>") {
            // Autoboot ended at the interactive prompt: nothing more will happen.
            let since = *prompt_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                return Err("U-Boot stopped at its prompt (no bootcmd, or the boot script failed)".into());
            }
        } else {
            prompt_since = None;
        }
        if Instant::now() >= deadline {
            return Err(format!("no boot marker within {BOOT_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `fw_env.config` for the environment on `medium`.
fn env_config(layout: Layout, medium: &Path) -> String {
    let m = medium.display();
    match layout {
        Layout::Pflash => format!("{m} 0x0 {ENV_SIZE:#x} {ENV_SIZE:#x}\n"),
        Layout::SdRedundant => {
            let [first, second] = SD_ENV_COPIES;
            format!("{m} {first:#x} {SD_ENV_SIZE:#x}\n{m} {second:#x} {SD_ENV_SIZE:#x}\n")
        }
    }
}

/// A new board's medium: erased NOR flash, or an SD card of zeroes (no valid copy either way).
fn erase_medium(layout: Layout, path: &Path) -> anyhow::Result<()> {
    match layout {
        Layout::Pflash => erase(path),
        Layout::SdRedundant => {
            let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            f.set_len(SD_BYTES as u64)
                .with_context(|| format!("sizing {}", path.display()))?;
            Ok(())
        }
    }
}

/// 64 MiB of erased NOR flash (0xFF).
fn erase(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let block = vec![0xFFu8; 1024 * 1024];
    for _ in 0..FLASH_BYTES / block.len() {
        f.write_all(&block)?;
    }
    Ok(())
}

/// Compiles a U-Boot boot script (`text`) into `dir/boot.scr` with `mkimage`; returns its path.
pub fn compile_boot_script(dir: &Path, text: &str, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let src = dir.join("boot.cmd");
    let scr = dir.join("boot.scr");
    std::fs::write(&src, text).with_context(|| format!("writing {}", src.display()))?;
    run(
        "mkimage",
        &[
            "-A",
            "arm64",
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            name,
            "-d",
            &src.to_string_lossy(),
            &scr.to_string_lossy(),
        ],
        None,
    )?;
    Ok(scr)
}

/// 8 MiB disk, MBR with one bootable FAT16 partition at sector 2048 holding `/boot.scr`.
fn make_bootdisk(dir: &Path, disk: &Path) -> anyhow::Result<()> {
    let scr = compile_boot_script(dir, BOOT_SCRIPT, "rauc-ab")?;
    let mut image = vec![0u8; 8 * 1024 * 1024];
    // Partition 1: active, type 0x0e (FAT16 LBA), first LBA 2048, 14336 sectors.
    let entry: [u8; 16] = [0x80, 0, 0, 0, 0x0e, 0, 0, 0, 0x00, 0x08, 0, 0, 0x00, 0x38, 0, 0];
    image[446..462].copy_from_slice(&entry);
    image[510] = 0x55;
    image[511] = 0xaa;
    std::fs::write(disk, &image)?;
    let d = disk.to_string_lossy();
    run(
        "mkfs.vfat",
        &["--offset", "2048", "-n", "FNBOOT", &d, "7168"],
        None,
    )?;
    let target = format!("{d}@@1M");
    let mut mcopy = Command::new("mcopy");
    mcopy
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i", &target, &scr.to_string_lossy(), "::/boot.scr"]);
    let out = mcopy.output().context("running mcopy")?;
    if !out.status.success() {
        bail!("mcopy failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
