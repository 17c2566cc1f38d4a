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

use anyhow::{Context, anyhow, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

    fn with_files(kind: SimKind, env: PathBuf, dir: &Path) -> Self {
        Self {
            kind,
            env,
            cmdline: dir.join("cmdline"),
            boot_id: dir.join("boot_id"),
        }
    }

    /// Simulates a power-on: the bootloader picks a slot, updates its environment, and the kernel
    /// command line and boot id change. Returns `'A'` or `'B'`.
    pub fn power_on(&self) -> anyhow::Result<char> {
        match self.kind {
            SimKind::Uboot => power_on_uboot(&self.env, &self.cmdline, &self.boot_id),
            SimKind::Grub => power_on_grub(&self.env, &self.cmdline, &self.boot_id),
            SimKind::Script => power_on_script(&self.env, &self.cmdline, &self.boot_id),
        }
    }

    /// An agent.toml `[boot]` section using these files (paths quoted as TOML strings).
    pub fn boot_toml(&self) -> String {
        let (backend, key) = match self.kind {
            SimKind::Uboot => ("uboot", "fw_env_config"),
            SimKind::Grub => ("grub", "grubenv"),
            SimKind::Script => ("script", "script"),
        };
        format!(
            "[boot]\nbackend = \"{backend}\"\ncmdline = {}\nboot_id = {}\n{key} = {}\n",
            toml_str(&self.cmdline),
            toml_str(&self.boot_id),
            toml_str(&self.env),
        )
    }
}

fn toml_str(p: &Path) -> String {
    // TOML basic strings accept JSON-style escapes for `"` and `\`.
    format!("{:?}", p.to_string_lossy())
}

/// Runs a tool, returning stdout; a failure carries the command and its stderr.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {tool}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// RAUC's U-Boot boot script at power-on: walk `BOOT_ORDER`, boot the first slot with
/// `BOOT_x_LEFT > 0` after decrementing it (written back with `fw_setenv`). Unset variables get
/// the script's defaults (order `A B`, 3 attempts). Errors when no slot is bootable (the real
/// script would reset the counters and reboot; a test wants to know).
pub fn power_on_uboot(fw_env_config: &Path, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    let cfg = fw_env_config.to_string_lossy();
    let vars = parse_vars(&run("fw_printenv", &["-c", &cfg], None)?);
    let order = vars.get("BOOT_ORDER").cloned().unwrap_or_else(|| "A B".into());
    for slot in order.split_whitespace() {
        let slot = match slot {
            "A" => 'A',
            "B" => 'B',
            _ => continue,
        };
        let key = format!("BOOT_{slot}_LEFT");
        let left: u32 = match vars.get(&key) {
            None => FRESH_ATTEMPTS,
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("{key}={v:?} in {cfg}"))?,
        };
        if left > 0 {
            let script = format!("{key}={}\n", left - 1);
            run("fw_setenv", &["-c", &cfg, "-s", "-"], Some(&script))?;
            return boot(slot, cmdline, boot_id);
        }
    }
    Err(anyhow!(
        "U-Boot: no bootable slot (BOOT_ORDER={order:?}, env {vars:?})"
    ))
}

/// RAUC's GRUB script at power-on: boot the first slot in `ORDER` with `x_OK=1` and `x_TRY=0`,
/// saving `x_TRY=1` first. Unset variables read as RAUC's `grub.cfg` presets them (`OK=0`,
/// `TRY=0`). Errors when no slot is bootable.
pub fn power_on_grub(grubenv: &Path, cmdline: &Path, boot_id: &Path) -> anyhow::Result<char> {
    let file = grubenv.to_string_lossy();
    let vars = parse_vars(&run("grub-editenv", &[&file, "list"], None)?);
    let order = vars.get("ORDER").cloned().unwrap_or_else(|| "A B".into());
    for slot in order.split_whitespace() {
        let slot = match slot {
            "A" => 'A',
            "B" => 'B',
            _ => continue,
        };
        let ok = vars.get(&format!("{slot}_OK")).map(String::as_str) == Some("1");
        let tried = vars.get(&format!("{slot}_TRY")).map(String::as_str) == Some("1");
        if ok && !tried {
            run("grub-editenv", &[&file, "set", &format!("{slot}_TRY=1")], None)?;
            return boot(slot, cmdline, boot_id);
        }
    }
    Err(anyhow!("GRUB: no bootable slot (ORDER={order:?}, env {vars:?})"))
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

/// Creates a redundant U-Boot environment in `dir`: `fw_env.config` with the two lines
/// `DIR/uboot.env 0x0000 0x4000` and `DIR/uboot-redund.env 0x0000 0x4000`, and both files as
/// 16 KiB of zeroes. With `init`, writes `BOOT_ORDER=A B`, `BOOT_A_LEFT=3`, `BOOT_B_LEFT=3`.
/// Returns the `fw_env.config` path.
///
/// libubootenv refuses a blank (bad CRC) environment — even for `fw_setenv` — unless given a
/// default environment, so initialisation is `fw_setenv -c CFG -f /dev/null -s -` (empty
/// defaults, `name=value` lines on stdin). A missing env file is reported as
/// "Configuration file wrong or corrupted", hence the zero-filled files.
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
    if init {
        let cfg = config.to_string_lossy();
        let script = format!("BOOT_ORDER=A B\nBOOT_A_LEFT={FRESH_ATTEMPTS}\nBOOT_B_LEFT={FRESH_ATTEMPTS}\n");
        run(
            "fw_setenv",
            &["-c", &cfg, "-f", "/dev/null", "-s", "-"],
            Some(&script),
        )?;
        let vars = parse_vars(&run("fw_printenv", &["-c", &cfg], None)?);
        if vars.get("BOOT_ORDER").map(String::as_str) != Some("A B") {
            bail!("fresh U-Boot env did not take: {vars:?}");
        }
    }
    Ok(config)
}

/// Creates `DIR/grubenv` (`grub-editenv FILE create`) with `ORDER=A B`, `A_OK=1`, `A_TRY=0`,
/// `B_OK=1`, `B_TRY=0`. Returns its path.
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
            "B_OK=1",
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
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}
