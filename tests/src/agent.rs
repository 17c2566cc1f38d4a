//! Finding and driving the real `flightnode-agent` and `flightnode-hub` binaries.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A workspace binary: `$FLIGHTNODE_<NAME>_BIN`, else next to the running executable (the same
/// cargo target dir), else its parent (test executables live in `deps/`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (`cargo build --workspace`) or set {var}",
        exe.display()
    )
}

/// Runs a binary and fails with its output when it exits non-zero.
pub fn run_ok(bin: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A wrapper script in `dir` that runs the agent with its wall clock a year behind (`faketime
/// -f -365d`; the monotonic clock stays real), for the trusted-clock tests. `None`, with a SKIP
/// line, where `faketime` is not installed (`./test.sh` installs it).
pub fn agent_a_year_behind(dir: &Path) -> Result<Option<PathBuf>> {
    if Command::new("faketime").arg("--version").output().is_err() {
        eprintln!("SKIP: faketime is not installed (apt install faketime)");
        return Ok(None);
    }
    let wrapper = dir.join("agent-a-year-ago");
    let agent = binary("flightnode-agent")?;
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nDONT_FAKE_MONOTONIC=1 exec faketime -f -365d {} \"$@\"\n",
            agent.display()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )?;
    Ok(Some(wrapper))
}
