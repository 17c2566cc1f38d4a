//! A power-on simulator for reboot-mode tests: does what RAUC's U-Boot/GRUB boot scripts do at
//! power-on, on the REAL environment files through the same real tools the agent uses
//! (`fw_printenv`/`fw_setenv`, `grub-editenv`), then "boots" the chosen slot by writing
//! `rauc.slot=X` into a kernel command line file and a fresh id into a boot id file.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let sim = flightnode_tests::boot_sim::SimBoot::uboot(dir.path())?;
//! // point the agent at it: sim.boot_toml() is a `[boot]` section
//! assert_eq!(sim.power_on()?, 'A');
//! # Ok(()) }
//! ```

use crate::tool::run;
use anyhow::{Context, anyhow, bail};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Attempts the helpers give each slot in a fresh U-Boot environment (RAUC's default).
pub const FRESH_ATTEMPTS: u32 = 3;

/// Which bootloader a [`SimBoot`] simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimKind {
    /// RAUC's U-Boot script over a redundant libubootenv environment.
    Uboot,
    /// RAUC's GRUB script over a grubenv file.
    Grub,
    /// The example script from [`write_example_script`].
    Script,
    /// REAL U-Boot (Debian's `u-boot-qemu` under `qemu-system-aarch64`) running RAUC's boot
    /// script over its environment in pflash: see [`crate::uboot_qemu`].
    UbootQemu,
}

/// The files of one simulated device's bootloader.
#[derive(Debug, Clone)]
pub struct SimBoot {
    /// Which bootloader.
    pub kind: SimKind,
    /// `fw_env.config` (uboot), the grubenv (grub) or the script (script).
    pub env: PathBuf,
    /// Kernel command line file written at each power-on (absent before the first one).
    pub cmdline: PathBuf,
    /// Boot id file rewritten at each power-on.
    pub boot_id: PathBuf,
    /// U-Boot kinds: the board's initial environment (`boot.initial_env`), U-Boot's own default
    /// environment in libubootenv's text format. Unused by the other kinds.
    pub initial_env: PathBuf,
    /// The real U-Boot machine, for [`SimKind::UbootQemu`].
    pub qemu: Option<std::sync::Arc<crate::uboot_qemu::UbootQemu>>,
}

impl SimBoot {
    /// A fresh, initialised U-Boot setup in `dir`: see [`fresh_uboot_env`].
    pub fn uboot(dir: &Path) -> anyhow::Result<Self> {
        let env = fresh_uboot_env(dir, true)?;
        Ok(Self::with_files(SimKind::Uboot, env, dir))
    }

    /// A U-Boot setup in `dir` whose two env copies are blank (zeroes, bad CRC), as on new flash.
    pub fn uboot_blank(dir: &Path) -> anyhow::Result<Self> {
        let env = fresh_uboot_env(dir, false)?;
        Ok(Self::with_files(SimKind::Uboot, env, dir))
    }

    /// A fresh GRUB setup in `dir`: see [`fresh_grubenv`].
    pub fn grub(dir: &Path) -> anyhow::Result<Self> {
        let env = fresh_grubenv(dir)?;
        Ok(Self::with_files(SimKind::Grub, env, dir))
    }

    /// The example script backend in `dir`: see [`write_example_script`].
    pub fn script(dir: &Path) -> anyhow::Result<Self> {
        let cmdline = dir.join("cmdline");
        let env = write_example_script(dir, &cmdline)?;
        Ok(Self::with_files(SimKind::Script, env, dir))
    }

    /// REAL U-Boot under qemu in `dir`, its environment initialised like a factory-flashed
    /// board (U-Boot's default environment plus `BOOT_ORDER="A B"`, 3 attempts each). `None`
    /// only when [`crate::uboot_qemu::require`] allows skipping; otherwise missing tools panic
    /// with a message naming `./test.sh`.
    pub fn uboot_qemu(dir: &Path) -> anyhow::Result<Option<Self>> {
        Self::uboot_qemu_with(dir, true)
    }

    /// Like [`SimBoot::uboot_qemu`] with the flash erased (no valid environment), as on a new
    /// board: U-Boot then runs on its built-in default environment.
    pub fn uboot_qemu_blank(dir: &Path) -> anyhow::Result<Option<Self>> {
        Self::uboot_qemu_with(dir, false)
    }

    /// Like [`SimBoot::uboot_qemu`] with U-Boot built for a redundant environment (two copies on
    /// an SD card): see [`crate::uboot_qemu::UbootQemu::new_redundant`].
    pub fn uboot_qemu_redundant(dir: &Path) -> anyhow::Result<Option<Self>> {
        let Some(tools) = crate::uboot_qemu::require_redundant() else {
            return Ok(None);
        };
        let machine = crate::uboot_qemu::UbootQemu::new_redundant(tools, dir, true)?;
        Ok(Some(Self::on_machine(machine, dir)))
    }

    fn uboot_qemu_with(dir: &Path, init: bool) -> anyhow::Result<Option<Self>> {
        let Some(tools) = crate::uboot_qemu::require() else {
            return Ok(None);
        };
        let machine = crate::uboot_qemu::UbootQemu::new(tools, dir, init)?;
        Ok(Some(Self::on_machine(machine, dir)))
    }

    fn on_machine(machine: crate::uboot_qemu::UbootQemu, dir: &Path) -> Self {
        let mut sim = Self::with_files(SimKind::UbootQemu, machine.fw_env_config.clone(), dir);
        sim.initial_env.clone_from(&machine.initial_env);
        sim.qemu = Some(std::sync::Arc::new(machine));
        sim
    }

    fn with_files(kind: SimKind, env: PathBuf, dir: &Path) -> Self {
        Self {
            kind,
            env,
            cmdline: dir.join("cmdline"),
            boot_id: dir.join("boot_id"),
            initial_env: dir.join(INITIAL_ENV),
            qemu: None,
        }
    }

    /// Simulates a power-on: the bootloader picks a slot, updates its environment, and the kernel
    /// command line and boot id change. Returns `'A'` or `'B'`.
    pub fn power_on(&self) -> anyhow::Result<char> {
        match self.kind {
            SimKind::Uboot => power_on_uboot(&self.env, &self.cmdline, &self.boot_id),
            SimKind::Grub => power_on_grub(&self.env, &self.cmdline, &self.boot_id),
            SimKind::Script => power_on_script(&self.env, &self.cmdline, &self.boot_id),
            SimKind::UbootQemu => {
                let machine = self
                    .qemu
                    .as_ref()
                    .ok_or_else(|| anyhow!("UbootQemu sim without its machine"))?;
                let slot = machine.power_on()?.slot;
                boot(slot, &self.cmdline, &self.boot_id)
            }
        }
    }

    /// The bootloader's variables as its own tool reads them (`fw_printenv -c`, `grub-editenv
    /// list`): what survived on the disk.
    pub fn vars(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let env = self.env.to_string_lossy();
        let text = match self.kind {
            SimKind::Uboot | SimKind::UbootQemu => run("fw_printenv", &["-c", &env], None)?,
            SimKind::Grub => run("grub-editenv", &[&env, "list"], None)?,
            SimKind::Script => bail!("a script bootloader keeps no variables"),
        };
        Ok(parse_vars(&text))
    }

    /// An agent.toml `[boot]` section using these files (paths quoted as TOML strings).
    pub fn boot_toml(&self) -> String {
        let (backend, key) = match self.kind {
            SimKind::Uboot | SimKind::UbootQemu => ("uboot", "fw_env_config"),
            SimKind::Grub => ("grub", "grubenv"),
            SimKind::Script => ("script", "script"),
        };
        let mut toml = format!(
            "[boot]\nbackend = \"{backend}\"\ncmdline = {}\nboot_id = {}\n{key} = {}\n",
            toml_str(&self.cmdline),
            toml_str(&self.boot_id),
            toml_str(&self.env),
        );
        if backend == "uboot" {
            let _ = writeln!(toml, "initial_env = {}", toml_str(&self.initial_env));
        }
        if self.qemu.as_ref().is_some_and(|m| !m.redundant()) {
            // Debian's U-Boot keeps one copy of its environment.
            toml.push_str("allow_single_copy_env = true\n");
        }
        toml
    }
}

fn toml_str(p: &Path) -> String {
    // TOML basic strings accept JSON-style escapes for `"` and `\`.
    format!("{:?}", p.to_string_lossy())
}

fn parse_vars(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// "Boots" `slot`: kernel command line with `rauc.slot=X`, and a fresh random boot id.
fn boot(slot: char, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    std::fs::write(
        cmdline,
        format!("console=ttyS0 root=/dev/sim rootwait rauc.slot={slot}\n"),
    )
    .with_context(|| format!("writing {}", cmdline.display()))?;
    let id: u128 = rand::random();
    let h = format!("{id:032x}");
    std::fs::write(
        boot_id,
        format!(
            "{}-{}-{}-{}-{}\n",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        ),
    )
    .with_context(|| format!("writing {}", boot_id.display()))?;
    Ok(slot)
}

/// RAUC's U-Boot boot script (`contrib/uboot.sh`) at power-on, over the real environment: unset
/// or empty variables get the script's defaults (order `A B`, 3 attempts); walk `BOOT_ORDER`,
/// skipping names without a branch (a recovery slot); boot the first A/B whose counter, read as
/// HEX (`test 0x${BOOT_A_LEFT} -gt 0`), is above zero, after decrementing it in hex (`setexpr`)
/// and saving the environment. No slot left: every counter back to 3, save, reset (the walk runs
/// again). A blank environment (bad CRC) is out of reach here: U-Boot's built-in default
/// environment is not simulated, so that is an error; use [`SimKind::UbootQemu`].
pub fn power_on_uboot(fw_env_config: &Path, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    let cfg = fw_env_config.to_string_lossy();
    let mut vars = parse_vars(&run("fw_printenv", &["-c", &cfg], None)?);
    for (key, default) in [
        ("BOOT_ORDER", "A B".to_owned()),
        ("BOOT_A_LEFT", FRESH_ATTEMPTS.to_string()),
        ("BOOT_B_LEFT", FRESH_ATTEMPTS.to_string()),
    ] {
        if vars.get(key).is_none_or(std::string::String::is_empty) {
            vars.insert(key.into(), default);
        }
    }
    for _reset in 0..2 {
        let order = vars["BOOT_ORDER"].clone();
        for slot in order.split_whitespace() {
            let slot = match slot {
                "A" => 'A',
                "B" => 'B',
                _ => continue,
            };
            let key = format!("BOOT_{slot}_LEFT");
            let left = u64::from_str_radix(vars[&key].trim(), 16).with_context(|| {
                format!("{key}={:?} in {cfg}: U-Boot's test would misread it", vars[&key])
            })?;
            if left > 0 {
                vars.insert(key, format!("{:x}", left - 1));
                save_uboot(&cfg, &vars)?;
                return boot(slot, cmdline, boot_id);
            }
        }
        vars.insert("BOOT_A_LEFT".into(), FRESH_ATTEMPTS.to_string());
        vars.insert("BOOT_B_LEFT".into(), FRESH_ATTEMPTS.to_string());
        save_uboot(&cfg, &vars)?;
    }
    Err(anyhow!(
        "U-Boot: no slot in BOOT_ORDER={:?} even after resetting the counters: it would reset forever",
        vars["BOOT_ORDER"]
    ))
}

/// U-Boot's `saveenv` of the script's variables.
fn save_uboot(cfg: &str, vars: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let script = ["BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"]
        .iter()
        .fold(String::new(), |mut s, k| {
            let _ = writeln!(s, "{k}={}", vars[*k]);
            s
        });
    run("fw_setenv", &["-c", cfg, "-s", "-"], Some(&script))?;
    Ok(())
}

/// RAUC's GRUB script (`contrib/grub.conf`) at power-on, over the real grubenv:
///
/// - presets `ORDER="A B"` and every `x_OK`/`x_TRY` to 0, then `load_env` (a missing or invalid
///   grubenv leaves the presets);
/// - walks `ORDER`: each A/B it looks at gets `x_TRY=1`; the first with `OK=1` and `TRY=0` boots;
///   a name without a branch (a recovery slot) keeps the previous slot's `OK`/`TRY` and so never
///   qualifies on its own;
/// - none qualifies: the default entry boots, the rescue system (`'R'`, `rauc.slot=R`), and
///   every slot with `OK=1` gets `TRY=0` back;
/// - `save_env A_TRY B_TRY` (GRUB writes the existing file's blocks; nothing when load failed).
pub fn power_on_grub(grubenv: &Path, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    let file = grubenv.to_string_lossy();
    let mut vars: BTreeMap<String, String> = [
        ("ORDER", "A B"),
        ("A_OK", "0"),
        ("B_OK", "0"),
        ("A_TRY", "0"),
        ("B_TRY", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    // `grub-editenv list` would create a missing file; GRUB's load_env just fails.
    let loaded = grubenv.is_file()
        && match run("grub-editenv", &[&file, "list"], None) {
            Ok(out) => {
                vars.extend(parse_vars(&out));
                true
            }
            Err(_) => false,
        };
    // `[ "$x" -eq 1 ]`: GRUB reads a non-number as 0.
    let num = |v: Option<&String>| v.and_then(|v| v.trim().parse::<i64>().ok()).unwrap_or(0);
    let mut chosen = 'R';
    let (mut ok, mut tried): (Option<String>, Option<String>) = (None, None);
    let order = vars["ORDER"].clone();
    for slot in order.split_whitespace() {
        if slot == "A" || slot == "B" {
            ok = vars.get(&format!("{slot}_OK")).cloned();
            tried = vars.get(&format!("{slot}_TRY")).cloned();
            vars.insert(format!("{slot}_TRY"), "1".into());
        }
        if num(ok.as_ref()) == 1 && num(tried.as_ref()) == 0 {
            chosen = if slot == "A" || slot == "B" {
                slot.chars().next().unwrap_or('R')
            } else {
                // Unreachable in practice: the previous slot's values already failed the test.
                continue;
            };
            break;
        }
    }
    if chosen == 'R' {
        for s in ["A", "B"] {
            if num(vars.get(&format!("{s}_OK"))) == 1 && num(vars.get(&format!("{s}_TRY"))) == 1 {
                vars.insert(format!("{s}_TRY"), "0".into());
            }
        }
    }
    if loaded {
        let a = format!("A_TRY={}", vars["A_TRY"]);
        let b = format!("B_TRY={}", vars["B_TRY"]);
        run("grub-editenv", &[&file, "set", &a, &b], None)?;
    }
    boot(chosen, cmdline, boot_id)
}

/// The example script's own power-on logic (`SCRIPT power-on` prints the slot it boots).
pub fn power_on_script(script: &Path, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    let out = run(&script.to_string_lossy(), &["power-on"], None)?;
    match out.trim() {
        "a" | "A" => boot('A', cmdline, boot_id),
        "b" | "B" => boot('B', cmdline, boot_id),
        other => bail!("{} power-on printed {other:?}", script.display()),
    }
}

/// File name of the simulated board's initial environment (see [`write_initial_env`]).
pub const INITIAL_ENV: &str = "u-boot-initial-env";

/// Writes `DIR/u-boot-initial-env`, a board's default U-Boot environment in libubootenv's text
/// format (what U-Boot's `make u-boot-initial-env` produces), and returns its path.
pub fn write_initial_env(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(INITIAL_ENV);
    std::fs::write(
        &path,
        "arch=arm\nbaudrate=115200\nboard=qemu-arm\nbootcmd=run distro_bootcmd\nbootdelay=0\n\
         fdt_addr=0x40000000\nkernel_addr_r=0x40400000\n",
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Creates a redundant U-Boot environment in `dir`: `fw_env.config` with the two lines
/// `DIR/uboot.env 0x0000 0x4000` and `DIR/uboot-redund.env 0x0000 0x4000`, both files as
/// 16 KiB of zeroes, and the board's initial environment ([`write_initial_env`]). With `init`,
/// the environment is the initial one plus `BOOT_ORDER=A B`, `BOOT_A_LEFT=3`, `BOOT_B_LEFT=3`,
/// as a factory would flash it. Returns the `fw_env.config` path.
///
/// libubootenv refuses a blank (bad CRC) environment — even for `fw_setenv` — unless given a
/// default environment (`-f`). A missing env file is reported as "Configuration file wrong or
/// corrupted", hence the zero-filled files.
pub fn fresh_uboot_env(dir: &Path, init: bool) -> anyhow::Result<PathBuf> {
    let main = dir.join("uboot.env");
    let redund = dir.join("uboot-redund.env");
    for f in [&main, &redund] {
        std::fs::write(f, vec![0u8; 0x4000]).with_context(|| format!("writing {}", f.display()))?;
    }
    let config = dir.join("fw_env.config");
    std::fs::write(
        &config,
        format!(
            "{} 0x0000 0x4000\n{} 0x0000 0x4000\n",
            main.display(),
            redund.display()
        ),
    )?;
    let initial = write_initial_env(dir)?;
    if init {
        let cfg = config.to_string_lossy();
        let script = format!("BOOT_ORDER=A B\nBOOT_A_LEFT={FRESH_ATTEMPTS}\nBOOT_B_LEFT={FRESH_ATTEMPTS}\n");
        run(
            "fw_setenv",
            &["-c", &cfg, "-f", &initial.to_string_lossy(), "-s", "-"],
            Some(&script),
        )?;
        let vars = parse_vars(&run("fw_printenv", &["-c", &cfg], None)?);
        if vars.get("BOOT_ORDER").map(String::as_str) != Some("A B") || !vars.contains_key("bootcmd") {
            bail!("fresh U-Boot env did not take: {vars:?}");
        }
    }
    Ok(config)
}

/// Creates `DIR/grubenv` (`grub-editenv FILE create`) with `ORDER=A B`, `A_OK=1`, `A_TRY=0`,
/// `B_OK=0`, `B_TRY=0`, as a factory flashes a board whose slot B was never written. Returns its
/// path.
///
/// `B_OK=0`, not 1: RAUC's script boots any slot with `OK=1` and `TRY=0`, so a factory grubenv
/// that says `B_OK=1` over an empty slot B sends the first power-on after an unconfirmed boot of
/// A into that empty slot (an unset flag reads as 0 too: the script presets it). The agent sets
/// `B_OK=1` itself when it arms the first trial of B.
pub fn fresh_grubenv(dir: &Path) -> anyhow::Result<PathBuf> {
    let env = dir.join("grubenv");
    let file = env.to_string_lossy();
    run("grub-editenv", &[&file, "create"], None)?;
    run(
        "grub-editenv",
        &[
            &file,
            "set",
            "ORDER=A B",
            "A_OK=1",
            "A_TRY=0",
            "B_OK=0",
            "B_TRY=0",
        ],
        None,
    )?;
    Ok(env)
}

/// Writes `DIR/boot.sh`, an example script backend keeping its state in `DIR/bootstate/`, and
/// returns its path. Its logic is GRUB-like: `set-primary X` makes X primary, good and untried;
/// `power-on` (used by [`power_on_script`]) boots the first of primary/other that is good and
/// untried and marks it tried; `set-state X good` clears the tried flag again, so a slot that is
/// not marked good during its boot is skipped at the next power-on. `get-current` reads
/// `cmdline`. It prints slots upper-case, as RAUC scripts do.
pub fn write_example_script(dir: &Path, cmdline: &Path) -> anyhow::Result<PathBuf> {
    let state = dir.join("bootstate");
    std::fs::create_dir_all(&state)?;
    let path = dir.join("boot.sh");
    let text = format!(
        r#"#!/bin/sh
# Example flightnode/RAUC-style boot script backend; state lives in files.
set -eu
S={state}
CMDLINE={cmdline}
up() {{ echo "$1" | tr ab AB; }}
low() {{ echo "$1" | tr AB ab; }}
other() {{ if [ "$1" = a ]; then echo b; else echo a; fi; }}
get() {{ if [ -f "$S/$1" ]; then cat "$S/$1"; else echo "$2"; fi; }}
slot_arg() {{ s=$(low "${{1:-}}"); case "$s" in a|b) echo "$s";; *) echo "bad slot '${{1:-}}'" >&2; exit 2;; esac; }}
bootable() {{ [ "$(get "$1.state" good)" = good ] && [ "$(get "$1.try" 0)" = 0 ]; }}
choose() {{
  p=$(get primary a)
  for s in "$p" "$(other "$p")"; do
    if bootable "$s"; then echo "$s"; return 0; fi
  done
  return 1
}}
verb=${{1:-}}
case "$verb" in
  get-primary) s=$(choose) || s=$(get primary a); up "$s" ;;
  set-primary) s=$(slot_arg "${{2:-}}"); echo "$s" > "$S/primary"; echo good > "$S/$s.state"; echo 0 > "$S/$s.try" ;;
  get-state) s=$(slot_arg "${{2:-}}"); get "$s.state" good ;;
  set-state)
    s=$(slot_arg "${{2:-}}")
    case "${{3:-}}" in
      good) echo good > "$S/$s.state"; echo 0 > "$S/$s.try" ;;
      bad) echo bad > "$S/$s.state" ;;
      *) echo "state must be good or bad" >&2; exit 2 ;;
    esac ;;
  get-current)
    for w in $(cat "$CMDLINE"); do
      case "$w" in rauc.slot=*|flightnode.slot=*) up "${{w#*=}}"; exit 0 ;; esac
    done
    echo "no rauc.slot= in $CMDLINE" >&2; exit 1 ;;
  power-on)
    s=$(choose) || {{ echo "no bootable slot" >&2; exit 1; }}
    echo 1 > "$S/$s.try"; up "$s" ;;
  *) echo "usage: $0 get-primary|set-primary X|get-state X|set-state X good|bad|get-current|power-on" >&2; exit 2 ;;
esac
"#,
        state = sh_quote(&state),
        cmdline = sh_quote(cmdline),
    );
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}
