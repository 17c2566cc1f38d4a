//! U-Boot environment backend: `fw_printenv`/`fw_setenv` (libubootenv) with RAUC's variables.
//!
//! RAUC's U-Boot convention, so existing RAUC boot scripts work unchanged:
//! - `BOOT_ORDER="A B"`: slots in the order the boot script tries them, first = primary. Other
//!   entries (a recovery slot `R`) are kept where they are; only A and B move.
//! - `BOOT_A_LEFT`, `BOOT_B_LEFT`: remaining attempts, in HEX as U-Boot reads them
//!   (`test 0x${BOOT_A_LEFT} -gt 0`, `setexpr` writes hex back): `a` is ten. The boot script boots
//!   the first slot in `BOOT_ORDER` whose counter is above zero and decrements it before booting;
//!   when none is left it resets every counter and reboots, so a bad slot must also leave
//!   `BOOT_ORDER` or it would come back.
//!
//! | call | writes |
//! |---|---|
//! | `set_trial(s)` | `s` first in `BOOT_ORDER`, `BOOT_s_LEFT=1` |
//! | `mark_good(s)` | `s` first in `BOOT_ORDER`, `BOOT_s_LEFT=<attempts>` |
//! | `mark_bad(s)` | `s` out of `BOOT_ORDER`, `BOOT_s_LEFT=0` |
//! | `confirm(s)` | `BOOT_s_LEFT=<attempts>` |
//!
//! Every change is written by ONE `fw_setenv -c CFG -s -` call (`name=value` lines on stdin), and
//! only when something differs; with a redundant environment (two lines in `fw_env.config`)
//! libubootenv writes the inactive copy, flagged newer than the active one, so a power cut leaves
//! either the old or the new environment, never half a change: a torn copy fails its CRC and
//! U-Boot loads the other. Each write is read back.
//!
//! With a single copy a power cut during `fw_setenv` leaves the only copy with a bad CRC: U-Boot
//! then boots on its built-in default environment (slot A first), and after a commit of B the
//! agent would take that boot for a fallback, mark the committed B bad and lower the rollback
//! floor to A's version. [`UBoot::new`] therefore reads `fw_env.config` as libubootenv does
//! ([`env_copies`]) and refuses a single copy unless `boot.allow_single_copy_env` accepts the
//! risk.
//!
//! Missing variables mean what RAUC's boot script assumes (`test -n "${BOOT_A_LEFT}" || setenv
//! BOOT_A_LEFT 3`): order `A B`, `attempts` left; the first write fills them in.
//!
//! No valid environment (blank or corrupt flash, bad CRC in every copy): U-Boot then runs on its
//! built-in default environment, which holds `bootcmd` and the rest of the board's settings. We
//! never create an environment from our variables alone (U-Boot would load it, find no `bootcmd`
//! and stop at its prompt): the first write starts from `boot.initial_env`
//! (`/etc/u-boot-initial-env`, libubootenv's convention, made by U-Boot's
//! `make u-boot-initial-env`), and without that file it is refused. Every call passes `-f` to the
//! tools explicitly, so they never fall back to a default file on their own.

use super::{
    BootBackend, BootError, booted_from_cmdline, env_name, parse_env_lines, parse_order, primary_first,
    reorder, run_tool,
};
use crate::config::BootConfig;
use flightnode_proto::Slot;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{debug, info, warn};

const PRINTENV: &str = "fw_printenv";
const SETENV: &str = "fw_setenv";
const ORDER: &str = "BOOT_ORDER";
const DEFAULT_ORDER: &str = "A B";

/// U-Boot backend. See the module docs for the variables and their meaning.
#[derive(Debug, Clone)]
pub struct UBoot {
    fw_env_config: PathBuf,
    cmdline: PathBuf,
    attempts: u32,
    initial_env: PathBuf,
    timeout: Duration,
}

/// The environment as read: variables, and whether the flash held no valid copy.
struct Env {
    vars: BTreeMap<String, String>,
    blank: bool,
}

fn left_key(slot: Slot) -> String {
    format!("BOOT_{}_LEFT", env_name(slot))
}

/// How many copies of the U-Boot environment `fw_env.config` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvCopies {
    /// One device line: a power cut during a write can leave no valid environment.
    Single,
    /// Two device lines: libubootenv writes the inactive copy and U-Boot loads the newer valid one.
    Redundant,
}

/// Reads `fw_env.config` the way libubootenv's `fw_printenv`/`fw_setenv` do: lines starting with
/// `#` and blank lines are skipped, every other line is `device offset size [sector-size
/// [sectors]]` (offset as C reads an integer, sizes in hex), the first two such lines are the
/// environment's copies. Stricter than libubootenv where it would silently skip a line: a line
/// that is neither a comment nor a device line is an error, since a mistyped second copy would
/// otherwise leave a single copy without anyone noticing.
pub fn env_copies(path: &Path) -> Result<EnvCopies, BootError> {
    let text = std::fs::read_to_string(path).map_err(|e| BootError::Env {
        location: path.display().to_string(),
        problem: format!("cannot read fw_env.config (set boot.fw_env_config): {e}"),
    })?;
    parse_fw_env_config(&text).map_err(|problem| BootError::Env {
        location: path.display().to_string(),
        problem,
    })
}

fn parse_fw_env_config(text: &str) -> Result<EnvCopies, String> {
    let mut sizes: Vec<u64> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let device_line =
            || format!("line {line_no} {line:?} is not `device offset env-size [sector-size [sectors]]`");
        let (Some(offset), Some(size)) = (fields.get(1), fields.get(2)) else {
            return Err(device_line());
        };
        if parse_c_int(offset).is_none() {
            return Err(format!("{}: offset {offset:?} is no number", device_line()));
        }
        let size = parse_hex(size).ok_or_else(|| format!("{}: size {size:?} is not hex", device_line()))?;
        if size == 0 {
            return Err(format!("line {line_no} {line:?}: the environment size is 0"));
        }
        // libubootenv reads no further than the second copy.
        if sizes.len() < 2 {
            sizes.push(size);
        }
    }
    match sizes.as_slice() {
        [] => Err("names no environment device (every line is a comment or blank)".into()),
        [_] => Ok(EnvCopies::Single),
        [a, b, ..] if a != b => Err(format!(
            "the two environment copies differ in size ({a:#x} and {b:#x}); libubootenv refuses that"
        )),
        _ => Ok(EnvCopies::Redundant),
    }
}

/// An integer as C's `%lli` reads it: `0x` hex, a leading `0` octal, else decimal.
fn parse_c_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        i128::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i128::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    Some(if neg { -value } else { value })
}

/// A size as C's `%lx` reads it: hex, with or without `0x`.
fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    u64::from_str_radix(digits, 16).ok()
}

/// A counter as U-Boot's `test 0x${..}`/`setexpr` read it.
fn parse_left(value: &str) -> Option<u32> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

impl UBoot {
    /// Uses `cfg.fw_env_config`, `cfg.cmdline`, `cfg.attempts`, `cfg.initial_env` and
    /// `cfg.tool_timeout`.
    pub fn new(cfg: &BootConfig) -> Result<Self, BootError> {
        if !(1..=9).contains(&cfg.attempts) {
            return Err(BootError::Env {
                location: "boot.attempts".into(),
                problem: format!(
                    "{} must be 1 to 9 (0 makes a committed slot unbootable; U-Boot reads the \
                     counter as hex)",
                    cfg.attempts
                ),
            });
        }
        if !cfg.fw_env_config.is_file() {
            return Err(BootError::Env {
                location: cfg.fw_env_config.display().to_string(),
                problem: "fw_env.config does not exist (set boot.fw_env_config)".into(),
            });
        }
        match env_copies(&cfg.fw_env_config)? {
            EnvCopies::Redundant => {}
            EnvCopies::Single if cfg.allow_single_copy_env => {
                warn!(config = %cfg.fw_env_config.display(),
                    "single-copy U-Boot environment accepted (boot.allow_single_copy_env): a power \
                     cut during a bootloader write can make U-Boot boot slot A on its default \
                     environment and undo a committed upgrade");
            }
            EnvCopies::Single => {
                return Err(BootError::Env {
                    location: cfg.fw_env_config.display().to_string(),
                    problem: "describes a single copy of the U-Boot environment: a power cut \
                        during fw_setenv leaves it with a bad CRC, U-Boot then boots slot A on its \
                        default environment and the agent would take that for a fallback (a \
                        committed upgrade marked bad, the rollback floor lowered). Give U-Boot a \
                        redundant environment (CONFIG_SYS_REDUNDAND_ENVIRONMENT) and add the \
                        second copy as a second line here, or set boot.allow_single_copy_env = \
                        true to accept that risk"
                        .into(),
                });
            }
        }
        Ok(Self {
            fw_env_config: cfg.fw_env_config.clone(),
            cmdline: cfg.cmdline.clone(),
            attempts: cfg.attempts,
            initial_env: cfg.initial_env.clone(),
            timeout: cfg.tool_timeout,
        })
    }

    fn cfg_arg(&self) -> String {
        self.fw_env_config.to_string_lossy().into_owned()
    }

    /// A default-environment path that cannot exist (a name under a regular file), so the tools
    /// fail on a blank environment instead of silently using `/etc/u-boot-initial-env`.
    fn no_default(&self) -> String {
        self.fw_env_config
            .join("flightnode-no-default-env")
            .to_string_lossy()
            .into_owned()
    }

    fn location(&self) -> String {
        format!("{PRINTENV} -c {}", self.fw_env_config.display())
    }

    /// The initial environment, when it exists and can boot (has `bootcmd`).
    fn usable_initial_env(&self) -> Result<(), String> {
        let path = &self.initial_env;
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !text.lines().any(|l| l.trim_start().starts_with("bootcmd=")) {
            return Err(format!(
                "{} has no bootcmd= line, so U-Boot could not boot from it",
                path.display()
            ));
        }
        Ok(())
    }

    fn tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, BootError> {
        run_tool(tool, args, stdin, self.timeout)
    }

    fn read(&self) -> Result<Env, BootError> {
        let cfg = self.cfg_arg();
        match self.tool(PRINTENV, &["-c", &cfg, "-f", &self.no_default()], None) {
            Ok(out) => Ok(Env {
                vars: parse_env_lines(&out),
                blank: false,
            }),
            Err(err @ BootError::Tool { .. }) => {
                // No valid copy (bad CRC, e.g. blank flash) fails without a default environment;
                // a broken fw_env.config fails either way, and then the first error is the one.
                if self
                    .tool(PRINTENV, &["-c", &cfg, "-f", "/dev/null"], None)
                    .is_err()
                {
                    return Err(err);
                }
                warn!(config = %cfg, error = %err,
                    "no valid U-Boot environment: U-Boot boots on its built-in default");
                // What U-Boot runs on is its default environment, which the initial env mirrors;
                // without one, RAUC's script defaults apply (no BOOT_* variables).
                let vars = match self.usable_initial_env() {
                    Ok(()) => {
                        let init = self.initial_env.to_string_lossy();
                        parse_env_lines(&self.tool(PRINTENV, &["-c", &cfg, "-f", &init], None)?)
                    }
                    Err(_) => BTreeMap::new(),
                };
                Ok(Env { vars, blank: true })
            }
            Err(err) => Err(err),
        }
    }

    /// `BOOT_ORDER` as the boot script sees it (unset or empty = `A B`).
    fn order_value(env: &Env) -> &str {
        match env.vars.get(ORDER).map(|v| v.trim()) {
            Some(v) if !v.is_empty() => v,
            _ => DEFAULT_ORDER,
        }
    }

    fn left(&self, env: &Env, slot: Slot) -> Result<u32, BootError> {
        let key = left_key(slot);
        match env.vars.get(&key).map(|v| v.trim()) {
            None | Some("") => Ok(self.attempts),
            Some(v) => parse_left(v).ok_or_else(|| BootError::Env {
                location: self.location(),
                problem: format!("{key}={v:?} is not a hex number of attempts"),
            }),
        }
    }

    /// Applies `changes` when any differs from the environment, in one `fw_setenv` call that
    /// also fills in RAUC's defaults for missing variables; then reads it back.
    fn write(&self, slot: Slot, env: &Env, changes: &[(String, String)]) -> Result<(), BootError> {
        if !env.blank && changes.iter().all(|(k, v)| env.vars.get(k) == Some(v)) {
            debug!(%slot, "U-Boot environment already as wanted; not writing");
            return Ok(());
        }
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if env.vars.get(ORDER).is_none_or(|v| v.trim().is_empty()) {
            all.insert(ORDER.into(), DEFAULT_ORDER.into());
        }
        for s in [Slot::A, Slot::B] {
            if env.vars.get(&left_key(s)).is_none_or(|v| v.trim().is_empty()) {
                all.insert(left_key(s), format!("{:x}", self.attempts));
            }
        }
        for (k, v) in changes {
            all.insert(k.clone(), v.clone());
        }
        let script = all.iter().fold(String::new(), |mut s, (k, v)| {
            let _ = writeln!(s, "{k}={v}");
            s
        });
        let cfg = self.cfg_arg();
        let init = self.initial_env.to_string_lossy().into_owned();
        let default_env = if env.blank {
            self.usable_initial_env().map_err(|why| BootError::Env {
                location: self.location(),
                problem: format!(
                    "no valid U-Boot environment (blank or corrupt flash) and no usable initial \
                     environment ({why}): refusing to create one from our variables alone, \
                     U-Boot would find no bootcmd and stop at its prompt. Install the board's \
                     u-boot-initial-env (U-Boot's `make u-boot-initial-env`) there or set \
                     boot.initial_env"
                ),
            })?;
            warn!(%slot, config = %cfg, initial_env = %init,
                "creating the U-Boot environment from the initial environment");
            init
        } else {
            self.no_default()
        };
        debug!(%slot, vars = %script.trim_end().replace('\n', " "), "fw_setenv");
        self.tool(
            SETENV,
            &["-c", &cfg, "-f", &default_env, "-s", "-"],
            Some(&script),
        )?;

        let back = self.read()?;
        for (k, v) in &all {
            if back.blank || back.vars.get(k) != Some(v) {
                return Err(BootError::Env {
                    location: self.location(),
                    problem: format!(
                        "wrote {k}={v:?} with {SETENV} but read back {:?}",
                        back.vars.get(k)
                    ),
                });
            }
        }
        Ok(())
    }

    /// `BOOT_ORDER` with our slots as `ours`, as a change (other entries kept).
    fn order_change(env: &Env, ours: &[Slot]) -> (String, String) {
        (ORDER.into(), reorder(Self::order_value(env), ours))
    }
}

impl BootBackend for UBoot {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn booted(&self) -> Result<Slot, BootError> {
        booted_from_cmdline(&self.cmdline)
    }

    fn primary(&self) -> Result<Slot, BootError> {
        let env = self.read()?;
        let order = parse_order(Self::order_value(&env));
        for &slot in &order {
            if self.left(&env, slot)? > 0 {
                return Ok(slot);
            }
        }
        // RAUC's script then resets every counter and reboots: the first slot in the order wins.
        match order.first() {
            Some(&slot) => {
                warn!(%slot, "no slot in {ORDER} has attempts left: U-Boot will reset the counters");
                Ok(slot)
            }
            None => Err(BootError::Env {
                location: self.location(),
                problem: format!(
                    "{ORDER}={:?} names neither A nor B: U-Boot has nothing of ours to boot",
                    Self::order_value(&env)
                ),
            }),
        }
    }

    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        let env = self.read()?;
        Ok(parse_order(Self::order_value(&env)).contains(&slot) && self.left(&env, slot)? > 0)
    }

    fn set_trial(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        let order = parse_order(Self::order_value(&env));
        self.write(
            slot,
            &env,
            &[
                Self::order_change(&env, &primary_first(&order, slot)),
                (left_key(slot), "1".into()),
            ],
        )?;
        info!(%slot, backend = "uboot", "slot set for a single trial boot");
        Ok(())
    }

    fn mark_good(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        let order = parse_order(Self::order_value(&env));
        self.write(
            slot,
            &env,
            &[
                Self::order_change(&env, &primary_first(&order, slot)),
                (left_key(slot), format!("{:x}", self.attempts)),
            ],
        )?;
        info!(%slot, backend = "uboot", attempts = self.attempts, "slot marked good and primary");
        Ok(())
    }

    fn mark_bad(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        let order = parse_order(Self::order_value(&env));
        if !order.contains(&slot.other()) {
            return Err(BootError::Env {
                location: self.location(),
                problem: format!(
                    "refusing to mark slot {slot} bad: slot {} is not in {ORDER}={:?} either, so \
                     nothing of ours would be left to boot",
                    slot.other(),
                    Self::order_value(&env)
                ),
            });
        }
        self.write(
            slot,
            &env,
            &[
                Self::order_change(&env, &[slot.other()]),
                (left_key(slot), "0".into()),
            ],
        )?;
        info!(%slot, backend = "uboot", "slot marked bad and removed from {ORDER}");
        Ok(())
    }

    fn confirm(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        self.write(slot, &env, &[(left_key(slot), format!("{:x}", self.attempts))])?;
        debug!(%slot, backend = "uboot", attempts = self.attempts, "boot attempts restored");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_hex_as_u_boot_reads_them() {
        assert_eq!(parse_left("3"), Some(3));
        assert_eq!(parse_left("a"), Some(10));
        assert_eq!(parse_left("10"), Some(16));
        assert_eq!(parse_left("F"), Some(15));
        assert_eq!(parse_left("0x3"), None, "U-Boot would read 0x0x3 as 0");
        assert_eq!(parse_left("-1"), None);
        assert_eq!(parse_left(""), None);
    }

    #[test]
    fn fw_env_config_copies_are_counted_as_libubootenv_counts_them() {
        assert_eq!(
            parse_fw_env_config("/dev/mtd1 0x0 0x40000 0x40000\n"),
            Ok(EnvCopies::Single)
        );
        assert_eq!(
            parse_fw_env_config(
                "# device offset size sector\n\n/dev/mmcblk0 0x400000 0x4000\n\
                 /dev/mmcblk0 0x404000 0x4000\n"
            ),
            Ok(EnvCopies::Redundant)
        );
        assert_eq!(
            parse_fw_env_config("  # /dev/mtd2 0x0 0x4000\n/dev/mtd1 0 4000 4000 1\n"),
            Ok(EnvCopies::Single),
            "a commented-out second copy is no copy"
        );
        assert_eq!(
            parse_fw_env_config("/dev/mtd1 0x0 0x4000\n/dev/mtd2 010 4000\n"),
            Ok(EnvCopies::Redundant),
            "octal offset and hex size without 0x, as C reads them"
        );
        assert_eq!(
            parse_fw_env_config("/dev/mtd1 0x0 0x4000\r\n/dev/mtd2 0x0 0x4000\r\n"),
            Ok(EnvCopies::Redundant)
        );
    }

    #[test]
    fn a_bad_fw_env_config_is_refused_with_the_line() {
        let err = |text: &str| parse_fw_env_config(text).expect_err(text);
        assert!(err("").contains("no environment device"));
        assert!(err("# only a comment\n").contains("no environment device"));
        let e = err("/dev/mtd1 0x0 0x4000\n/dev/mtd2 0x0\n");
        assert!(
            e.contains("line 2") && e.contains("device offset env-size"),
            "{e}"
        );
        let e = err("/dev/mtd1 zero 0x4000\n");
        assert!(e.contains("line 1") && e.contains("offset"), "{e}");
        let e = err("/dev/mtd1 0x0 0x40g0\n");
        assert!(e.contains("not hex"), "{e}");
        assert!(err("/dev/mtd1 0x0 0\n").contains("size is 0"));
        let e = err("/dev/mtd1 0x0 0x4000\n/dev/mtd2 0x0 0x2000\n");
        assert!(e.contains("differ in size"), "{e}");
    }
}
