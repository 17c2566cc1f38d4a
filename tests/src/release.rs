//! Release artifacts as they ship: static musl builds of the agent (aarch64, x86_64) and the hub
//! (x86_64), the agent's Debian packages, and a clean Debian root to install them into.
//!
//! Each release build runs once per test binary in its own target dir (`target/release-builds`:
//! the outer `cargo test` holds the lock on the main one); a second test binary asking for the
//! same build finds cargo's fingerprints fresh and pays only a no-op cargo run.

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The boards: Raspberry Pi 4/5, Jetson, i.MX8, RK3588 — any aarch64 Linux, whatever its libc.
pub const AARCH64: &str = "aarch64-unknown-linux-musl";
/// x86_64 companion computers, and the hub's container image.
pub const X86_64: &str = "x86_64-unknown-linux-musl";
/// The size budget of a stripped release agent (flash and update bandwidth on the boards).
pub const MAX_AGENT_BYTES: u64 = 10 * 1024 * 1024;

/// One target's release binaries.
#[derive(Debug, Clone)]
pub struct Release {
    /// The rustc target triple.
    pub target: &'static str,
    /// The stripped, static agent binary.
    pub agent: PathBuf,
    /// Only the x86_64 build has the hub: it runs in the cluster, not on the boards.
    pub hub: Option<PathBuf>,
    /// The kubectl plugin (`kubectl-flightnode`, which execs the hub beside it), with the hub.
    pub plugin: Option<PathBuf>,
}

/// The workspace root.
///
/// # Panics
/// When the tests crate has no parent directory (it always has: it sits in the workspace).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The target dir of the release builds and the packages made from them.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target/release-builds")
}

/// A cargo command for the release builds, without the variables cargo sets for the test that
/// runs it: build scripts that watch one of them (ring watches `CARGO_MANIFEST_DIR`) would see a
/// change between a build from a test and one by hand, and rebuild everything after them.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command and fails with its output when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        output_text(&out)
    );
    Ok(out)
}

/// The release build for `target` ([`AARCH64`] or [`X86_64`]), built at most once per process.
pub fn build(target: &'static str) -> Result<Release> {
    static BUILDS: [OnceLock<Result<Release, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    once_per_target(&BUILDS, target, "release build", build_uncached)
}

/// `make(target)` for [`AARCH64`] or [`X86_64`], run at most once per process and target: every
/// later caller gets the first result (an error as its message).
fn once_per_target<T: Clone>(
    cells: &'static [OnceLock<Result<T, String>>; 2],
    target: &'static str,
    what: &str,
    make: impl FnOnce(&'static str) -> Result<T>,
) -> Result<T> {
    let cell = match target {
        AARCH64 => &cells[0],
        X86_64 => &cells[1],
        other => bail!("no {what} for {other}"),
    };
    cell.get_or_init(|| make(target).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Waits until `./test.sh`'s background job (cargo-deb's install and these same release builds)
/// is done with `target`: it holds one lock per target from before it starts. Without that job
/// the lock is free at once. True when the job built `target` in this very run (its stamp holds
/// the run's token): then no cargo run is needed, and one would wait for cargo's own lock on the
/// target dir while the job builds the other target.
fn wait_for_prebuild(target: &str) -> Result<bool> {
    let path = target_dir().join(format!(".prebuild-{target}.lock"));
    if path.exists() {
        let lock = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        lock.lock_shared()
            .with_context(|| format!("waiting for the release prebuild's lock {}", path.display()))?;
    }
    let Some(token) = std::env::var_os("FLIGHTNODE_PREBUILD_TOKEN") else {
        return Ok(false);
    };
    let stamp = target_dir().join(format!(".prebuilt-{target}"));
    Ok(std::fs::read(stamp).is_ok_and(|s| s == token.as_encoded_bytes()))
}

/// The cargo profile of the hub the image test puts in its image (`./test.sh` prebuilds the same).
pub const HUB_PROFILE: &str = "release-quick";

fn build_uncached(target: &'static str) -> Result<Release> {
    let prebuilt = wait_for_prebuild(target)?;
    let with_hub = target == X86_64;
    // One cargo run per package: built together, the agent would get every feature the hub's
    // dependencies turn on (cargo unifies features across the packages of one build): the x86_64
    // agent was 10.44 MiB that way, 9.61 MiB built alone.
    // The agent in the release profile, whose size budget the packaging test checks; the hub,
    // which has none, in `release-quick` (no whole-program LTO): the image test's hub is a static
    // build of the same code, at a third of the CPU time.
    let packages: &[(&str, &str)] = if with_hub {
        &[("flightnode-agent", "release"), ("flightnode-hub", HUB_PROFILE)]
    } else {
        &[("flightnode-agent", "release")]
    };
    for (package, profile) in packages.iter().filter(|_| !prebuilt) {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--locked",
            "--profile",
            profile,
            "--target",
            target,
            "-p",
            package,
        ]);
        run(&mut cmd).with_context(|| {
            format!(
                "release build of {package} for {target} (needs `rustup target add {target}`; \
                 aarch64 also gcc-aarch64-linux-gnu, x86_64 musl-tools: ./test.sh installs them)"
            )
        })?;
    }
    let dir = target_dir().join(target);
    Ok(Release {
        target,
        agent: dir.join("release").join("flightnode-agent"),
        hub: with_hub.then(|| dir.join(HUB_PROFILE).join("flightnode-hub")),
        plugin: with_hub.then(|| dir.join(HUB_PROFILE).join("kubectl-flightnode")),
    })
}

/// What `file` says about a binary (e.g. "ELF 64-bit LSB executable, ARM aarch64, ... statically linked").
pub fn file_type(path: &Path) -> Result<String> {
    let out = run(Command::new("file").arg("-b").arg(path))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The agent's Debian package for `target`, made by cargo-deb from [`build`]'s binary, with the
/// md5sums cargo-deb leaves out (`agent/debian/add-md5sums.sh`, as `cross/release.sh` does).
/// Made at most once per process, like the build.
pub fn deb(target: &'static str) -> Result<PathBuf> {
    static DEBS: [OnceLock<Result<PathBuf, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    once_per_target(&DEBS, target, "package", deb_uncached)
}

fn deb_uncached(target: &'static str) -> Result<PathBuf> {
    build(target)?;
    cargo_deb("flightnode-agent", target, "release")
}

/// The hub's Debian package (amd64: the hub runs in clusters and on x86_64 workstations), made by
/// cargo-deb from [`build`]'s static hub and kubectl plugin, with md5sums like the agent's. Made
/// from the [`HUB_PROFILE`] build the image test uses (the same code as a `release` build, which
/// `cross/release.sh` packages). Made at most once per process.
pub fn hub_deb() -> Result<PathBuf> {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| {
        build(X86_64)
            .and_then(|_| cargo_deb("flightnode-hub", X86_64, HUB_PROFILE))
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// `cargo deb` of `package` from the `profile` build for `target` (already built), plus md5sums.
fn cargo_deb(package: &str, target: &'static str, profile: &str) -> Result<PathBuf> {
    let out_dir = target_dir().join("debian").join(target);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = cargo()
        // The profile already strips; cargo-deb's own strip would need the cross binutils.
        .args([
            "deb",
            "--locked",
            "--no-build",
            "--no-strip",
            "-p",
            package,
            "--target",
            target,
            "--profile",
            profile,
        ])
        .arg("--output")
        .arg(&out_dir)
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        let text = output_text(&out);
        if text.contains("no such command") {
            bail!(
                "cargo-deb is not installed: `cargo install cargo-deb --locked` (./test.sh does; \
                 a whole-suite run logs that install in target/release-builds/prebuild.log)"
            );
        }
        bail!("cargo deb of {package} for {target} failed:\n{text}");
    }
    // cargo-deb prints the path of the package it wrote as its last line.
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| {
            Path::new(l.trim_end())
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("deb"))
        })
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb did not print the package path")?;
    ensure!(
        path.is_file(),
        "cargo deb reported {} but it does not exist",
        path.display()
    );
    let script = workspace_root().join("agent/debian/add-md5sums.sh");
    run(Command::new(&script).arg(&path)).with_context(|| format!("adding md5sums to {}", path.display()))?;
    Ok(path)
}

/// The Debian mirror of this machine's own bookworm apt source (where its packages come from),
/// or `FLIGHTNODE_DEBIAN_MIRROR`.
fn debian_mirror() -> Result<String> {
    if let Some(mirror) = std::env::var_os("FLIGHTNODE_DEBIAN_MIRROR") {
        return Ok(mirror.to_string_lossy().into_owned());
    }
    let out = run(Command::new("apt-get").args(["indextargets", "--format", "$(REPO_URI) $(RELEASE)"]))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, release)| *release == "bookworm")
        .map(|(uri, _)| uri.to_string())
        .context(
            "no bookworm apt source on this machine to take the Debian mirror from \
             (run apt-get update, or set FLIGHTNODE_DEBIAN_MIRROR)",
        )
}

/// A minimal Debian 12 root (mmdebstrap minbase), built once and cached as a tarball under
/// `target/debian-root/`; every call unpacks a fresh copy into `dest` (which must be empty).
pub fn debian_root(dest: &Path) -> Result<()> {
    let cache = workspace_root().join("target/debian-root");
    let tarball = cache.join("bookworm-minbase.tar");
    if !tarball.is_file() {
        std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        // Written next to the cache and renamed, so an interrupted run never leaves half a root.
        let partial = cache.join(format!("bookworm-minbase.{}.partial.tar", std::process::id()));
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--variant=minbase", "--mode=root", "bookworm"])
            .arg(&partial)
            .arg(debian_mirror()?);
        run(&mut cmd).context("mmdebstrap of a Debian 12 root (apt-get install mmdebstrap; needs root)")?;
        std::fs::rename(&partial, &tarball)
            .with_context(|| format!("renaming {} to {}", partial.display(), tarball.display()))?;
    }
    run(Command::new("tar").arg("-xpf").arg(&tarball).arg("-C").arg(dest))
        .with_context(|| format!("unpacking {} into {}", tarball.display(), dest.display()))?;
    Ok(())
}
