//! GRUB environment backend: `grub-editenv` with RAUC's variables.
//!
//! RAUC's GRUB convention (its example `grub.cfg`): `ORDER="A B"`, `A_OK`, `A_TRY`, `B_OK`,
//! `B_TRY`. At power-on the script boots the first slot in `ORDER` with `x_OK=1` and `x_TRY=0`,
//! setting `x_TRY=1` before booting it. So GRUB gives every boot exactly one attempt: the running
//! system must reset `x_TRY=0` (`mark_good`) on every healthy boot, or the next power-on falls
//! back. `boot.attempts` therefore does not apply here.
//!
//! | call | writes |
//! |---|---|
//! | `set_trial(s)` | `ORDER="s other"`, `s_OK=1`, `s_TRY=0` |
//! | `mark_good(s)` | `ORDER="s other"`, `s_OK=1`, `s_TRY=0` |
//! | `mark_bad(s)` | `ORDER="other s"`, `s_OK=0` |
//!
//! `primary()` is the first slot in `ORDER` with `OK=1` and `TRY=0`, what GRUB picks at the next
//! power-on. Right after a boot the booted slot has `TRY=1`, so until `mark_good` the answer is
//! the other slot, or an error when that one is not bootable either.
//!
//! Trial and commit write the same variables: the difference is whether the trial boot calls
//! `mark_good` before the next power-on.
//!
//! Every change is one `grub-editenv FILE set k=v ...` call, which writes `FILE.new` and renames
//! it over the file; each write is read back. Missing variables read as `ORDER="A B"`, `OK=1`,
//! `TRY=0`, and the first write fills them in (RAUC's example `grub.cfg` presets `OK=0` for
//! unset variables, so install a complete grubenv). Note `grub-editenv FILE create` empties an
//! existing file; this backend never calls it (`set` creates a missing file by itself).

use super::{
    BootBackend, BootError, booted_from_cmdline, env_name, order_value, parse_env_lines, parse_order,
    run_tool,
};
use crate::config::BootConfig;
use flightnode_proto::Slot;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tracing::{debug, info};

const EDITENV: &str = "grub-editenv";
const ORDER: &str = "ORDER";

/// GRUB backend. See the module docs for the variables and their meaning.
#[derive(Debug, Clone)]
pub struct Grub {
    grubenv: PathBuf,
    cmdline: PathBuf,
}

fn ok_key(slot: Slot) -> String {
    format!("{}_OK", env_name(slot))
}

fn try_key(slot: Slot) -> String {
    format!("{}_TRY", env_name(slot))
}

impl Grub {
    /// `ORDER` with `slot` first, `slot` OK and untried, in one `grub-editenv` call.
    fn make_primary(&self, slot: Slot) -> Result<(), BootError> {
        self.write(
            slot,
            &[
                (ORDER.into(), order_value(slot)),
                (ok_key(slot), "1".into()),
                (try_key(slot), "0".into()),
            ],
        )
    }

    /// Uses `cfg.grubenv` (created on the first write when missing) and `cfg.cmdline`.
    pub fn new(cfg: &BootConfig) -> Result<Self, BootError> {
        match cfg.grubenv.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                return Err(BootError::Env {
                    location: cfg.grubenv.display().to_string(),
                    problem: format!("directory {} does not exist (is /boot mounted?)", dir.display()),
                });
            }
            _ => {}
        }
        Ok(Self {
            grubenv: cfg.grubenv.clone(),
            cmdline: cfg.cmdline.clone(),
        })
    }

    fn file_arg(&self) -> String {
        self.grubenv.to_string_lossy().into_owned()
    }

    fn location(&self) -> String {
        self.grubenv.display().to_string()
    }

    fn read(&self) -> Result<BTreeMap<String, String>, BootError> {
        // `list` would create a missing file; a read should not.
        if !self.grubenv.exists() {
            return Ok(BTreeMap::new());
        }
        let out = run_tool(EDITENV, &[&self.file_arg(), "list"], None)?;
        Ok(parse_env_lines(&out))
    }

    fn order(&self, env: &BTreeMap<String, String>) -> Result<Vec<Slot>, BootError> {
        match env.get(ORDER) {
            None => Ok(vec![Slot::A, Slot::B]),
            Some(v) => parse_order(v).ok_or_else(|| BootError::Env {
                location: self.location(),
                problem: format!("{ORDER}={v:?} names neither A nor B"),
            }),
        }
    }

    fn flag(&self, env: &BTreeMap<String, String>, key: &str, default: bool) -> Result<bool, BootError> {
        match env.get(key).map(|v| v.trim()) {
            None => Ok(default),
            Some("1") | Some("true") => Ok(true),
            Some("0") | Some("false") | Some("") => Ok(false),
            Some(v) => Err(BootError::Env {
                location: self.location(),
                problem: format!("{key}={v:?} is neither 0 nor 1"),
            }),
        }
    }

    fn bootable(&self, env: &BTreeMap<String, String>, slot: Slot) -> Result<bool, BootError> {
        Ok(self.flag(env, &ok_key(slot), true)? && !self.flag(env, &try_key(slot), false)?)
    }

    fn write(&self, slot: Slot, changes: &[(String, String)]) -> Result<(), BootError> {
        let env = self.read()?;
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if !env.contains_key(ORDER) {
            all.insert(ORDER.into(), "A B".into());
        }
        for s in [Slot::A, Slot::B] {
            for (key, default) in [(ok_key(s), "1"), (try_key(s), "0")] {
                if !env.contains_key(&key) {
                    all.insert(key, default.into());
                }
            }
        }
        for (k, v) in changes {
            all.insert(k.clone(), v.clone());
        }
        let file = self.file_arg();
        let pairs: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args: Vec<&str> = vec![&file, "set"];
        args.extend(pairs.iter().map(String::as_str));
        debug!(%slot, vars = %pairs.join(" "), "grub-editenv set");
        run_tool(EDITENV, &args, None)?;

        let back = self.read()?;
        for (k, v) in &all {
            if back.get(k) != Some(v) {
                return Err(BootError::Env {
                    location: self.location(),
                    problem: format!("wrote {k}={v:?} with {EDITENV} but read back {:?}", back.get(k)),
                });
            }
        }
        Ok(())
    }
}

impl BootBackend for Grub {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn booted(&self) -> Result<Slot, BootError> {
        booted_from_cmdline(&self.cmdline)
    }

    fn primary(&self) -> Result<Slot, BootError> {
        let env = self.read()?;
        for slot in self.order(&env)? {
            if self.bootable(&env, slot)? {
                return Ok(slot);
            }
        }
        Err(BootError::Env {
            location: self.location(),
            problem: format!(
                "no slot in {ORDER}={:?} has OK=1 and TRY=0, so GRUB's slot choice fails and \
                 grub.cfg's fallback decides (mark the booted slot good first)",
                env.get(ORDER).map_or("A B", String::as_str)
            ),
        })
    }

    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        let env = self.read()?;
        self.flag(&env, &ok_key(slot), true)
    }

    fn set_trial(&self, slot: Slot) -> Result<(), BootError> {
        // In RAUC's GRUB scheme a trial and a commit write the same keys: the script sets
        // `x_TRY=1` as it boots, so the slot falls back unless it is marked good again.
        self.make_primary(slot)?;
        info!(%slot, backend = "grub", "slot set for a single trial boot");
        Ok(())
    }

    fn mark_good(&self, slot: Slot) -> Result<(), BootError> {
        self.make_primary(slot)?;
        info!(%slot, backend = "grub", "slot marked good and primary");
        Ok(())
    }

    fn mark_bad(&self, slot: Slot) -> Result<(), BootError> {
        self.write(
            slot,
            &[
                (ORDER.into(), order_value(slot.other())),
                (ok_key(slot), "0".into()),
            ],
        )?;
        info!(%slot, backend = "grub", "slot marked bad");
        Ok(())
    }
}
