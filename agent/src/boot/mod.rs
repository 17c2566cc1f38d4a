//! Bootloader backends for reboot mode, shaped like RAUC's boot chooser (`bootchooser.h`).
//!
//! The agent never boots anything itself: it tells the bootloader which slot to try next and reads
//! back what the bootloader decided. Backends are synchronous (they run small tools on small files)
//! and are called from blocking threads.

mod grub;
mod script;
mod uboot;

pub use grub::Grub;
pub use script::Script;
pub use uboot::UBoot;

use crate::config::{BootBackendKind, BootConfig};
use flightnode_proto::Slot;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What went wrong talking to the bootloader.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A tool could not be started.
    #[error("failed to run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        source: std::io::Error,
    },
    /// A tool exited non-zero.
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its arguments, joined.
        args: String,
        /// Exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The bootloader environment holds something we cannot interpret.
    #[error("bootloader environment {location}: {problem}")]
    Env {
        /// File or tool the value came from.
        location: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The booted slot could not be determined.
    #[error("cannot tell which slot is booted from {path}: {problem}")]
    Booted {
        /// Where we looked (e.g. the kernel command line file).
        path: PathBuf,
        /// What is missing.
        problem: String,
    },
}

/// Bootloader-side view of the A/B slots. Impls: [`UBoot`], [`Grub`], [`Script`].
///
/// "Good" means the bootloader may boot the slot; "primary" is tried first. A trial boot is
/// `set_trial(slot)`: primary for exactly one attempt, after which the bootloader falls back on
/// its own unless the agent calls `mark_good` from inside the trial.
pub trait BootBackend: Send + Sync {
    /// Backend name for logs (`uboot`, `grub`, `script`).
    fn name(&self) -> &'static str;
    /// The slot the running system was booted from.
    fn booted(&self) -> Result<Slot, BootError>;
    /// The slot the bootloader will try first.
    fn primary(&self) -> Result<Slot, BootError>;
    /// Whether the bootloader considers `slot` bootable.
    fn is_good(&self, slot: Slot) -> Result<bool, BootError>;
    /// Makes `slot` primary for a single attempt; if it does not come up and mark itself good,
    /// the bootloader boots the other slot next time.
    fn set_trial(&self, slot: Slot) -> Result<(), BootError>;
    /// Makes `slot` primary and good with full attempts (commit).
    fn mark_good(&self, slot: Slot) -> Result<(), BootError>;
    /// Marks `slot` unbootable; the other slot becomes primary.
    fn mark_bad(&self, slot: Slot) -> Result<(), BootError>;
    /// This boot of `slot` worked: restore its full attempts, change nothing else (not the
    /// order); writes nothing when already so.
    ///
    /// The engine calls it for the running slot while an upgrade is in flight, so a long or
    /// resumed download never uses up the running slot's attempts (U-Boot's `BOOT_x_LEFT`,
    /// GRUB's `x_TRY`). Provisional default: `mark_good`, which also makes `slot` primary; the
    /// engine only relies on that where `slot` is primary anyway. Backends override it.
    fn confirm(&self, slot: Slot) -> Result<(), BootError> {
        self.mark_good(slot)
    }
}

/// Opens the backend `cfg.backend` names.
pub fn open(cfg: &BootConfig) -> Result<Box<dyn BootBackend>, BootError> {
    Ok(match cfg.backend {
        BootBackendKind::Uboot => Box::new(UBoot::new(cfg)?),
        BootBackendKind::Grub => Box::new(Grub::new(cfg)?),
        BootBackendKind::Script => Box::new(Script::new(cfg)?),
    })
}

/// Runs `tool args...` synchronously, optionally feeding `stdin`, and returns its stdout.
///
/// A non-zero exit becomes [`BootError::Tool`] with the arguments (which name the file) and the
/// trimmed stderr; `stdin`, when given, is appended to the arguments in the error so a failed
/// `fw_setenv -s -` says what it was asked to write.
pub(crate) fn run_tool(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, BootError> {
    let joined = args.join(" ");
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| BootError::Spawn {
        tool: format!("{tool} {joined}"),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(input) = stdin {
        // Dropped at the end of the block, which closes the pipe so the tool sees EOF.
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let mut args = joined;
        if let Some(input) = stdin {
            args.push_str(&format!(" <<< {:?}", input.trim_end()));
        }
        return Err(BootError::Tool {
            tool: tool.to_owned(),
            args,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `name=value` lines (the output of `fw_printenv` and `grub-editenv list`).
pub(crate) fn parse_env_lines(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .collect()
}

/// The booted slot from a kernel command line file: `rauc.slot=A|B` or `flightnode.slot=a|b`.
pub(crate) fn booted_from_cmdline(path: &Path) -> Result<Slot, BootError> {
    let text = std::fs::read_to_string(path).map_err(|e| BootError::Booted {
        path: path.to_owned(),
        problem: format!("cannot read it: {e}"),
    })?;
    slot_from_cmdline(&text).map_err(|problem| BootError::Booted {
        path: path.to_owned(),
        problem,
    })
}

fn slot_from_cmdline(text: &str) -> Result<Slot, String> {
    let mut found: Option<(Slot, &str)> = None;
    for word in text.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        if key != "rauc.slot" && key != "flightnode.slot" {
            continue;
        }
        let slot = Slot::parse(value).ok_or_else(|| format!("{word:?} names no slot (expected A or B)"))?;
        match found {
            Some((prev, prev_word)) if prev != slot => {
                return Err(format!("{prev_word:?} and {word:?} disagree"));
            }
            _ => found = Some((slot, word)),
        }
    }
    found.map(|(s, _)| s).ok_or_else(|| {
        "no rauc.slot=A|B or flightnode.slot=a|b on the kernel command line \
         (the boot script must pass it)"
            .to_owned()
    })
}

/// `A` or `B`: how RAUC's boot scripts name slots.
pub(crate) fn env_name(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "A",
        Slot::B => "B",
    }
}

/// Parses a RAUC order (`"A B"`), ignoring names other than A/B (e.g. a recovery slot).
/// `None` when it names neither slot.
pub(crate) fn parse_order(value: &str) -> Option<Vec<Slot>> {
    let mut order = Vec::new();
    for slot in value.split_whitespace().filter_map(Slot::parse) {
        if !order.contains(&slot) {
            order.push(slot);
        }
    }
    (!order.is_empty()).then_some(order)
}

/// `"s other"`.
pub(crate) fn order_value(first: Slot) -> String {
    format!("{} {}", env_name(first), env_name(first.other()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_marker_is_found_in_either_spelling() {
        assert_eq!(
            slot_from_cmdline("console=ttyS0 root=/dev/mmcblk0p3 rauc.slot=B quiet\n"),
            Ok(Slot::B)
        );
        assert_eq!(slot_from_cmdline("flightnode.slot=a"), Ok(Slot::A));
        assert_eq!(slot_from_cmdline("rauc.slot=A flightnode.slot=a"), Ok(Slot::A));
        assert!(slot_from_cmdline("rauc.slot=A flightnode.slot=b").is_err());
        assert!(slot_from_cmdline("rauc.slot=C").is_err());
        assert!(slot_from_cmdline("root=/dev/sda2 quiet").is_err());
    }

    #[test]
    fn order_parsing_keeps_a_and_b_in_order() {
        assert_eq!(parse_order("B A"), Some(vec![Slot::B, Slot::A]));
        assert_eq!(parse_order(" A  R B "), Some(vec![Slot::A, Slot::B]));
        assert_eq!(parse_order("R"), None);
        assert_eq!(order_value(Slot::B), "B A");
    }
}
