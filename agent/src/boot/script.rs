//! Script backend: a user script with RAUC-like verbs, for bootloaders we do not know.
//!
//! | verb | prints / does |
//! |---|---|
//! | `SCRIPT get-primary` | the slot the bootloader will try first (`a`/`b`, any case) |
//! | `SCRIPT set-primary a\|b` | make the slot primary (see below) |
//! | `SCRIPT get-state a\|b` | `good` or `bad` (any case) |
//! | `SCRIPT set-state a\|b good\|bad` | mark the slot |
//! | `SCRIPT get-current` | the booted slot |
//!
//! Exit status 0 means success; anything else is an error carrying the script's stderr.
//!
//! Mapping: `set_trial(s)` = `set-primary s`. How many attempts a primary slot gets and how the
//! bootloader falls back is the script's own business; the agent treats the slot as on trial
//! until it calls `mark_good(s)` = `set-primary s` then `set-state s good`. `mark_bad(s)` =
//! `set-state s bad`, then `set-primary <other>` if the script still reports `s` as primary.
//! `confirm(s)` = `set-state s good` (the slot's attempts are the script's business; it must not
//! change which slot is primary). These are separate script runs: a script that needs them
//! atomic must make each verb so. Every run is limited to `boot.tool_timeout`.

use super::{BootBackend, BootError, run_tool};
use crate::config::BootConfig;
use flightnode_proto::Slot;
use std::path::PathBuf;
use std::time::Duration;
use tracing::info;

/// Script backend. See the module docs for the verbs.
#[derive(Debug, Clone)]
pub struct Script {
    script: PathBuf,
    timeout: Duration,
}

impl Script {
    /// Uses `cfg.script`, which must be set.
    pub fn new(cfg: &BootConfig) -> Result<Self, BootError> {
        let script = cfg.script.clone().ok_or_else(|| BootError::Env {
            location: "boot.script".into(),
            problem: "boot.backend = \"script\" needs boot.script".into(),
        })?;
        if !script.is_file() {
            return Err(BootError::Env {
                location: script.display().to_string(),
                problem: "boot script does not exist".into(),
            });
        }
        Ok(Self {
            script,
            timeout: cfg.tool_timeout,
        })
    }

    fn tool(&self) -> String {
        self.script.to_string_lossy().into_owned()
    }

    fn run(&self, args: &[&str]) -> Result<String, BootError> {
        run_tool(&self.tool(), args, None, self.timeout)
    }

    fn slot_output(&self, verb: &str) -> Result<Slot, BootError> {
        let out = self.run(&[verb])?;
        Slot::parse(out.trim()).ok_or_else(|| BootError::Env {
            location: format!("{} {verb}", self.script.display()),
            problem: format!("printed {:?}, expected a or b", out.trim()),
        })
    }
}

impl BootBackend for Script {
    fn name(&self) -> &'static str {
        "script"
    }

    fn booted(&self) -> Result<Slot, BootError> {
        let out = self.run(&["get-current"])?;
        Slot::parse(out.trim()).ok_or_else(|| BootError::Booted {
            path: self.script.clone(),
            problem: format!("get-current printed {:?}, expected a or b", out.trim()),
        })
    }

    fn primary(&self) -> Result<Slot, BootError> {
        self.slot_output("get-primary")
    }

    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        let out = self.run(&["get-state", slot.as_str()])?;
        match out.trim().to_ascii_lowercase().as_str() {
            "good" => Ok(true),
            "bad" => Ok(false),
            other => Err(BootError::Env {
                location: format!("{} get-state {slot}", self.script.display()),
                problem: format!("printed {other:?}, expected good or bad"),
            }),
        }
    }

    fn set_trial(&self, slot: Slot) -> Result<(), BootError> {
        self.run(&["set-primary", slot.as_str()])?;
        info!(%slot, backend = "script", "slot set primary for a trial boot");
        Ok(())
    }

    fn mark_good(&self, slot: Slot) -> Result<(), BootError> {
        self.run(&["set-primary", slot.as_str()])?;
        self.run(&["set-state", slot.as_str(), "good"])?;
        info!(%slot, backend = "script", "slot marked good and primary");
        Ok(())
    }

    fn mark_bad(&self, slot: Slot) -> Result<(), BootError> {
        self.run(&["set-state", slot.as_str(), "bad"])?;
        if self.primary()? == slot {
            self.run(&["set-primary", slot.other().as_str()])?;
        }
        info!(%slot, backend = "script", "slot marked bad");
        Ok(())
    }

    fn confirm(&self, slot: Slot) -> Result<(), BootError> {
        self.run(&["set-state", slot.as_str(), "good"])?;
        Ok(())
    }
}
