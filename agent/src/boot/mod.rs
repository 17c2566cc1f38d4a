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

use crate::child::{self, ChildError};
use crate::config::{BootBackendKind, BootConfig};
use flightnode_proto::Slot;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// What went wrong talking to the bootloader.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A tool could not be started.
    #[error("failed to run {tool}")]
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
    /// A tool ran past `boot.tool_timeout`; its process group was killed.
    #[error("{tool} {args} did not finish within {timeout:?} and was killed; stderr: {stderr}")]
    Timeout {
        /// The program.
        tool: String,
        /// Its arguments, joined.
        args: String,
        /// The limit.
        timeout: std::time::Duration,
        /// What it had printed on stderr, trimmed.
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
/// "Good" means the bootloader may boot the slot; "primary" is tried first; "the order" is the
/// bootloader's list of slots to try (`BOOT_ORDER`/`ORDER`), which may hold entries that are not
/// ours (a recovery slot): backends move only A and B and keep the rest. What the engine relies on:
///
/// - `set_trial(s)`: `s` first in the order with exactly one attempt; the other slot stays where it
///   was as the good fallback. If `s` does not come up and get `mark_good`, the next power-on
///   boots the other slot.
/// - `mark_good(s)`: commit. `s` good, full attempts, primary.
/// - `mark_bad(s)`: `s` unbootable and removed from the order. This cancels a pending trial of
///   `s`: the other slot boots next. Refused when the other slot is not in the order either
///   (nothing would be left to boot).
/// - `confirm(s)`: this boot of `s` worked: restore its full attempts (U-Boot `BOOT_s_LEFT`, GRUB
///   `s_TRY=0`/`s_OK=1`) and change nothing else, not the order. Called for the booted slot while
///   an upgrade is in flight, so a long or resumed download never runs its counter out.
///
/// Every call writes nothing when the bootloader already holds what it would write, and each call
/// is one atomic change of the environment where the bootloader allows it (see the backends).
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
    /// Marks `slot` unbootable and removes it from the order; the other slot boots next.
    fn mark_bad(&self, slot: Slot) -> Result<(), BootError>;
    /// This boot of `slot` worked: restore its full attempts, change nothing else (not the
    /// order); writes nothing when already so.
    ///
    /// The engine calls it for the running slot while an upgrade is in flight, so a long or
    /// resumed download never uses up the running slot's attempts (U-Boot's `BOOT_x_LEFT`,
    /// GRUB's `x_TRY`).
    fn confirm(&self, slot: Slot) -> Result<(), BootError>;
}

/// Opens the backend `cfg.backend` names.
pub fn open(cfg: &BootConfig) -> Result<Box<dyn BootBackend>, BootError> {
    Ok(match cfg.backend {
        BootBackendKind::Uboot => Box::new(UBoot::new(cfg)?),
        BootBackendKind::Grub => Box::new(Grub::new(cfg)?),
        BootBackendKind::Script => Box::new(Script::new(cfg)?),
    })
}

/// Runs `tool args...` in its own process group, optionally feeding `stdin`, and returns its
/// stdout. Past `timeout` the group is killed ([`BootError::Timeout`]).
///
/// A non-zero exit becomes [`BootError::Tool`] with the arguments (which name the file) and the
/// trimmed stderr; `stdin`, when given, is appended to the arguments in the error so a failed
/// `fw_setenv -s -` says what it was asked to write.
pub(crate) fn run_tool(
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, BootError> {
    let mut joined = args.join(" ");
    if let Some(input) = stdin {
        let _ = write!(joined, " <<< {:?}", input.trim_end());
    }
    let mut cmd = Command::new(tool);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    match child::run(&mut cmd, stdin.map(str::as_bytes), timeout) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(BootError::Tool {
            tool: tool.to_owned(),
            args: joined,
            status: out.status.to_string(),
            stderr: text(&out.stderr),
        }),
        Err(ChildError::Timeout { timeout, stderr }) => Err(BootError::Timeout {
            tool: tool.to_owned(),
            args: joined,
            timeout,
            stderr: text(&stderr),
        }),
        Err(ChildError::Spawn(source) | ChildError::Wait(source)) => Err(BootError::Spawn {
            tool: format!("{tool} {joined}"),
            source,
        }),
    }
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
        // RAUC's GRUB script boots its default entry, a rescue system (`rauc.slot=R`), when no
        // slot may boot; the agent manages A and B only and must not guess which of them to touch.
        let slot = Slot::parse(value).ok_or_else(|| {
            format!(
                "{word:?} names no slot of ours (expected A or B): this is a rescue or recovery \
                 boot, and the agent acts only in a boot of slot A or B"
            )
        })?;
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

/// Our slots in a RAUC order (`"A B"`), first = primary; other names (a recovery slot) are
/// skipped, as the boot scripts skip names they have no branch for. Names are case-sensitive,
/// as in the scripts (`test "x${BOOT_SLOT}" = "xA"`).
pub(crate) fn parse_order(value: &str) -> Vec<Slot> {
    let mut order = Vec::new();
    for slot in value.split_whitespace().filter_map(slot_token) {
        if !order.contains(&slot) {
            order.push(slot);
        }
    }
    order
}

fn slot_token(token: &str) -> Option<Slot> {
    match token {
        "A" => Some(Slot::A),
        "B" => Some(Slot::B),
        _ => None,
    }
}

/// Rewrites a RAUC order so that our slots are exactly `ours`, in that order, keeping every other
/// entry. Our slots sit together where the first of them was (at the front when none was there),
/// so `"A B R"` with `[B, A]` gives `"B A R"` and with `[A]` gives `"A R"`: a recovery slot
/// listed last stays the last resort. RAUC's `set_primary` moves the primary to the very front
/// instead; the difference shows only for an entry listed before our slots, which is then left
/// before them, as the board's integrator put it.
pub(crate) fn reorder(value: &str, ours: &[Slot]) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut placed = false;
    let names: Vec<&str> = ours.iter().map(|s| env_name(*s)).collect();
    for token in value.split_whitespace() {
        if slot_token(token).is_some() {
            if !placed {
                out.extend(&names);
                placed = true;
            }
        } else {
            out.push(token);
        }
    }
    if !placed {
        out.splice(0..0, names);
    }
    out.join(" ")
}

/// The order a backend writes for `mark_good`/`set_trial(first)`: `first`, then the other slot
/// if it is still in the order (a slot removed by `mark_bad` stays out).
pub(crate) fn primary_first(current: &[Slot], first: Slot) -> Vec<Slot> {
    let mut ours = vec![first];
    if current.contains(&first.other()) {
        ours.push(first.other());
    }
    ours
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
        let rescue = slot_from_cmdline("panic=60 quiet rauc.slot=R").unwrap_err();
        assert!(rescue.contains("rescue"), "{rescue}");
        assert!(slot_from_cmdline("root=/dev/sda2 quiet").is_err());
    }

    #[test]
    fn order_parsing_keeps_a_and_b_in_order() {
        assert_eq!(parse_order("B A"), vec![Slot::B, Slot::A]);
        assert_eq!(parse_order(" A  R B "), vec![Slot::A, Slot::B]);
        assert_eq!(parse_order("R"), vec![]);
        assert_eq!(parse_order("a b"), vec![], "the scripts compare case-sensitively");
    }

    #[test]
    fn reorder_moves_only_our_slots() {
        assert_eq!(reorder("A B", &[Slot::B, Slot::A]), "B A");
        assert_eq!(reorder("A B R", &[Slot::B, Slot::A]), "B A R");
        assert_eq!(reorder("A R B", &[Slot::B, Slot::A]), "B A R");
        assert_eq!(reorder("A B R", &[Slot::A]), "A R");
        assert_eq!(reorder("A R", &[Slot::B, Slot::A]), "B A R");
        assert_eq!(reorder("R", &[Slot::A]), "A R");
        assert_eq!(reorder("", &[Slot::A, Slot::B]), "A B");
        assert_eq!(reorder("X A B Y", &[Slot::A, Slot::B]), "X A B Y");
        assert_eq!(primary_first(&[Slot::A], Slot::B), vec![Slot::B, Slot::A]);
        assert_eq!(
            primary_first(&[Slot::B], Slot::B),
            vec![Slot::B],
            "a removed slot stays out"
        );
        assert_eq!(primary_first(&[], Slot::A), vec![Slot::A]);
    }
}
