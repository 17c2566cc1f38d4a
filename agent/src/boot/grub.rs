//! GRUB environment backend: RAUC's variables in grubenv, written atomically.
//!
//! RAUC's GRUB convention (its example `grub.conf`): `ORDER="A B"`, `A_OK`, `A_TRY`, `B_OK`,
//! `B_TRY`. The script presets `ORDER="A B"` and every flag to 0, then `load_env`. At power-on it
//! walks `ORDER`, setting `x_TRY=1` on every slot it looks at, and boots the first with `x_OK=1`
//! and `x_TRY=0`. When none qualifies it boots its default entry (a rescue system in RAUC's
//! example) and clears `TRY` of every slot with `OK=1`. So GRUB gives every boot exactly one
//! attempt: the running system must reset `x_TRY=0` (`confirm`/`mark_good`) on every healthy boot,
//! or the next power-on falls back. `boot.attempts` therefore does not apply here.
//!
//! A missing flag reads as 0, as the script presets it: a slot is bootable only once we said so.
//!
//! | call | writes |
//! |---|---|
//! | `set_trial(s)` | `s` first in `ORDER`, `s_OK=1`, `s_TRY=0` |
//! | `mark_good(s)` | `s` first in `ORDER`, `s_OK=1`, `s_TRY=0` |
//! | `mark_bad(s)` | `s` out of `ORDER`, `s_OK=0`; and `other_TRY=0` when `other` is the running slot |
//! | `confirm(s)` | `s_OK=1`, `s_TRY=0` |
//!
//! Trial and commit write the same variables: the difference is whether the trial boot calls
//! `mark_good` before the next power-on. `mark_bad` clears the running slot's `TRY` in the same
//! write because right after a failed trial the running (old) slot still has the `TRY=1` the
//! script set while booting it: removing the trial slot alone would leave, until the next write,
//! a grubenv with no bootable slot.
//!
//! Writes: only when a value changes, and never in place. `grub-editenv` truncates and rewrites
//! the file, which a power cut can tear; instead the current file is copied to a temporary file
//! in the same directory, `grub-editenv` edits the copy (so the format and every other variable
//! stay exactly grub-editenv's), the copy is fsynced, renamed over grubenv, and the directory is
//! fsynced. A power cut leaves the old or the new grubenv. GRUB's own `save_env` at boot writes
//! the blocks of whatever file is there, in place, as always.

use super::{
    BootBackend, BootError, booted_from_cmdline, env_name, parse_env_lines, parse_order, primary_first,
    reorder, run_tool,
};
use crate::config::BootConfig;
use flightnode_proto::Slot;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{debug, info};

const EDITENV: &str = "grub-editenv";
const ORDER: &str = "ORDER";
const DEFAULT_ORDER: &str = "A B";
/// What `grub-editenv create` makes, and what GRUB expects.
const ENVBLK_SIZE: u64 = 1024;

/// GRUB backend. See the module docs for the variables and their meaning.
#[derive(Debug, Clone)]
pub struct Grub {
    grubenv: PathBuf,
    cmdline: PathBuf,
    timeout: Duration,
}

type Vars = BTreeMap<String, String>;

fn ok_key(slot: Slot) -> String {
    format!("{}_OK", env_name(slot))
}

fn try_key(slot: Slot) -> String {
    format!("{}_TRY", env_name(slot))
}

impl Grub {
    /// Uses `cfg.grubenv` (created on the first write when missing), `cfg.cmdline` and
    /// `cfg.tool_timeout`.
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
            timeout: cfg.tool_timeout,
        })
    }

    fn location(&self) -> String {
        self.grubenv.display().to_string()
    }

    fn dir(&self) -> &Path {
        match self.grubenv.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let name = self
            .grubenv
            .file_name()
            .map_or_else(|| "grubenv".into(), |n| n.to_string_lossy().into_owned());
        self.dir().join(format!(".{name}.flightnode-new"))
    }

    fn read(&self) -> Result<Vars, BootError> {
        // `list` would create a missing file; a read should not. GRUB's load_env fails on a
        // missing file and the presets apply, which is what an empty map means here.
        if !self.grubenv.exists() {
            return Ok(Vars::new());
        }
        let out = run_tool(
            EDITENV,
            &[&self.grubenv.to_string_lossy(), "list"],
            None,
            self.timeout,
        )?;
        Ok(parse_env_lines(&out))
    }

    /// `ORDER` as the script sees it (preset `A B`, which `load_env` overrides when set).
    fn order_value(env: &Vars) -> &str {
        env.get(ORDER).map_or(DEFAULT_ORDER, String::as_str)
    }

    /// A flag as the script's `[ "$x" -eq 1 ]` reads it; missing is the preset 0.
    fn flag(&self, env: &Vars, key: &str) -> Result<bool, BootError> {
        match env.get(key).map(|v| v.trim()) {
            None | Some("") => Ok(false),
            Some(v) => v.parse::<i64>().map(|n| n == 1).map_err(|_| BootError::Env {
                location: self.location(),
                problem: format!("{key}={v:?} is not a number (GRUB's script compares it with 1)"),
            }),
        }
    }

    fn bootable(&self, env: &Vars, slot: Slot) -> Result<bool, BootError> {
        Ok(self.flag(env, &ok_key(slot))? && !self.flag(env, &try_key(slot))?)
    }

    /// Applies `changes` if any differs from `env`: edit a copy, fsync, rename, fsync the dir.
    fn write(&self, slot: Slot, env: &Vars, changes: &[(String, String)]) -> Result<(), BootError> {
        if changes.iter().all(|(k, v)| env.get(k) == Some(v)) {
            debug!(%slot, "grubenv already as wanted; not writing");
            return Ok(());
        }
        let io = |what: &str, path: &Path, e: std::io::Error| BootError::Env {
            location: path.display().to_string(),
            problem: format!("{what}: {e}"),
        };
        let tmp = self.tmp_path();
        let tmp_arg = tmp.to_string_lossy().into_owned();
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing a stale temporary grubenv", &tmp, e));
            }
            _ => {}
        }
        if self.grubenv.exists() {
            std::fs::copy(&self.grubenv, &tmp).map_err(|e| io("copying grubenv", &tmp, e))?;
        } else {
            run_tool(EDITENV, &[&tmp_arg, "create"], None, self.timeout)?;
        }
        let pairs: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args: Vec<&str> = vec![&tmp_arg, "set"];
        args.extend(pairs.iter().map(String::as_str));
        debug!(%slot, vars = %pairs.join(" "), "grub-editenv set (on a copy)");
        run_tool(EDITENV, &args, None, self.timeout)?;
        let file = std::fs::File::open(&tmp).map_err(|e| io("opening the new grubenv", &tmp, e))?;
        let len = file.metadata().map_err(|e| io("stat", &tmp, e))?.len();
        if len != ENVBLK_SIZE {
            return Err(BootError::Env {
                location: tmp_arg,
                problem: format!("{EDITENV} wrote {len} bytes, expected a {ENVBLK_SIZE}-byte block"),
            });
        }
        file.sync_all().map_err(|e| io("fsync", &tmp, e))?;
        drop(file);
        crate::failpoint::hit("grubenv-synced");
        std::fs::rename(&tmp, &self.grubenv)
            .map_err(|e| io("renaming the new grubenv into place", &self.grubenv, e))?;
        crate::failpoint::hit("grubenv-renamed");
        crate::activation::fsync_dir(self.dir()).map_err(|e| io("fsync", self.dir(), e))?;

        let back = self.read()?;
        for (k, v) in changes {
            if back.get(k) != Some(v) {
                return Err(BootError::Env {
                    location: self.location(),
                    problem: format!("wrote {k}={v:?} with {EDITENV} but read back {:?}", back.get(k)),
                });
            }
        }
        Ok(())
    }

    /// `slot` first in `ORDER` (the other slot kept if present), OK and untried.
    fn make_primary(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        let order = parse_order(Self::order_value(&env));
        self.write(
            slot,
            &env,
            &[
                (
                    ORDER.into(),
                    reorder(Self::order_value(&env), &primary_first(&order, slot)),
                ),
                (ok_key(slot), "1".into()),
                (try_key(slot), "0".into()),
            ],
        )
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
        for slot in parse_order(Self::order_value(&env)) {
            if self.bootable(&env, slot)? {
                return Ok(slot);
            }
        }
        Err(BootError::Env {
            location: self.location(),
            problem: format!(
                "no slot in {ORDER}={:?} has OK=1 and TRY=0, so GRUB boots its default entry \
                 (mark the booted slot good first)",
                Self::order_value(&env)
            ),
        })
    }

    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        let env = self.read()?;
        Ok(parse_order(Self::order_value(&env)).contains(&slot) && self.flag(&env, &ok_key(slot))?)
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
        let env = self.read()?;
        let other = slot.other();
        if !parse_order(Self::order_value(&env)).contains(&other) {
            return Err(BootError::Env {
                location: self.location(),
                problem: format!(
                    "refusing to mark slot {slot} bad: slot {other} is not in {ORDER}={:?} either, \
                     so nothing of ours would be left to boot",
                    Self::order_value(&env)
                ),
            });
        }
        let mut changes = vec![
            (ORDER.into(), reorder(Self::order_value(&env), &[other])),
            (ok_key(slot), "0".into()),
        ];
        // The running slot evidently boots: keep it bootable in this same write (see module docs).
        if self.booted().ok() == Some(other) && self.flag(&env, &ok_key(other))? {
            changes.push((try_key(other), "0".into()));
        }
        self.write(slot, &env, &changes)?;
        info!(%slot, backend = "grub", "slot marked bad and removed from {ORDER}");
        Ok(())
    }

    fn confirm(&self, slot: Slot) -> Result<(), BootError> {
        let env = self.read()?;
        self.write(
            slot,
            &env,
            &[(ok_key(slot), "1".into()), (try_key(slot), "0".into())],
        )?;
        debug!(%slot, backend = "grub", "boot confirmed (TRY=0)");
        Ok(())
    }
}
