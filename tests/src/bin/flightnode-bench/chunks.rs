//! `chunks`: bytes on the wire for a full plain (format 1) download, a full chunked (format 2)
//! download and a chunked update over the older slot, of a real ext4 image, next to `zstd -19`
//! of the image and `xdelta3`/`bsdiff` deltas where installed; install time and the agent's own
//! peak RSS.
//!
//! The two images are built here with `mkfs.ext4 -d` (no root needed) from generated trees: 40 (per 256 MiB)
//! "packages" of binaries (token-structured, about 2:1 compressible), text (docs, configs) and
//! already-compressed blobs. Version 2 upgrades one package (every file replaced), rewrites a
//! few configs, patches two binaries in place and adds a file: a few percent of the content.
//!
//! With `--real-files DIR,...` the images are tar archives of this machine's own files instead
//! (`--size-mib` of them, in name order): version 2 changes about 3 % of the files, the first
//! near the start, each growing, so every byte after the first change moves, as an update of a
//! root filesystem image moves what follows a grown file.

use crate::{mib, mib_s};
use anyhow::{Context, Result, bail};
use flightnode_tests::agent::{binary, run_ok};
use flightnode_tests::http_server::BundleServer;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Packages in a 256 MiB image (scaled with `--size-mib`, so the tree fits the file system).
const PACKAGES_PER_256_MIB: u64 = 40;
/// mtime of every generated file (what a reproducible build sets via `SOURCE_DATE_EPOCH`).
const EPOCH_V1: u64 = 1_780_000_000;
const EPOCH_V2: u64 = 1_790_000_000;

struct Rng(u64);

impl Rng {
    fn new(seed: &str) -> Self {
        Self(
            seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            }) | 1,
        )
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Shared vocabularies, so files compress like real ones (words repeat across files).
struct Vocab {
    words: Vec<String>,
    tokens: Vec<[u8; 8]>,
}

impl Vocab {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "below(n) < n: a length under 11 and a letter offset under 26"
    )]
    fn new() -> Self {
        let mut r = Rng::new("vocab");
        let words = (0..3000)
            .map(|_| {
                let len = 2 + r.below(9) as usize;
                (0..len).map(|_| (b'a' + r.below(26) as u8) as char).collect()
            })
            .collect();
        let tokens = (0..16384).map(|_| r.next().to_le_bytes()).collect();
        Self { words, tokens }
    }

    fn text(&self, seed: &str, len: usize) -> Vec<u8> {
        let mut r = Rng::new(seed);
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            let n = 4 + r.below(12);
            for _ in 0..n {
                // Skewed choice: common words are common.
                let i = (r.below(3000) * r.below(3000) / 3000) as usize;
                out.extend_from_slice(self.words[i].as_bytes());
                out.push(b' ');
            }
            out.push(b'\n');
        }
        out.truncate(len);
        out
    }

    fn binary(&self, seed: &str, len: usize) -> Vec<u8> {
        let mut r = Rng::new(seed);
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            if r.below(6) == 0 {
                out.extend_from_slice(&r.next().to_le_bytes());
            } else {
                let i = (r.below(16384) * r.below(16384) / 16384) as usize;
                out.extend_from_slice(&self.tokens[i]);
            }
        }
        out.truncate(len);
        out
    }

    fn random(seed: &str, len: usize) -> Vec<u8> {
        let mut r = Rng::new(seed);
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&r.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

fn write(root: &Path, rel: &str, bytes: &[u8], epoch: u64) -> Result<()> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, bytes)?;
    let f = std::fs::File::options().write(true).open(&path)?;
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(epoch))?;
    Ok(())
}

/// The files of package `p` at package version `pv`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "every size is below(n) plus a constant, under 1 MiB: fits any usize"
)]
fn package(v: &Vocab, root: &Path, p: u64, pv: u32, epoch: u64) -> Result<()> {
    let mut r = Rng::new(&format!("pkg{p}"));
    let tag = format!("pkg{p}-v{pv}");
    let files = 6 + r.below(6);
    for f in 0..files {
        let size = (40_000 + r.below(500_000)) as usize;
        let bytes = v.binary(&format!("{tag}-bin{f}"), size);
        write(root, &format!("usr/lib/pkg{p:02}/lib{f}.so"), &bytes, epoch)?;
    }
    write(
        root,
        &format!("usr/bin/tool{p:02}"),
        &v.binary(&format!("{tag}-tool"), 300_000 + r.below(700_000) as usize),
        epoch,
    )?;
    for f in 0..4 {
        let size = (5_000 + r.below(60_000)) as usize;
        write(
            root,
            &format!("usr/share/doc/pkg{p:02}/doc{f}.txt"),
            &v.text(&format!("{tag}-doc{f}"), size),
            epoch,
        )?;
    }
    let blob = (100_000 + r.below(400_000)) as usize;
    write(
        root,
        &format!("usr/share/pkg{p:02}/data.gz"),
        &Vocab::random(&format!("{tag}-blob"), blob),
        epoch,
    )?;
    write(
        root,
        &format!("etc/pkg{p:02}.conf"),
        &v.text(&format!("{tag}-conf"), 2_000 + r.below(6_000) as usize),
        epoch,
    )?;
    Ok(())
}

/// Generates version `version` (1 or 2) of the tree.
fn tree(v: &Vocab, root: &Path, version: u32, packages: u64) -> Result<()> {
    for p in 0..packages {
        // Version 2 upgrades package 7.
        let (pv, epoch) = if version == 2 && p == 7 {
            (2, EPOCH_V2)
        } else {
            (1, EPOCH_V1)
        };
        package(v, root, p, pv, epoch)?;
    }
    if version == 2 {
        for p in [3u64, 11, 19, 23, 31].map(|p| p % packages) {
            write(
                root,
                &format!("etc/pkg{p:02}.conf"),
                &v.text(&format!("conf-v2-{p}"), 4_000),
                EPOCH_V2,
            )?;
        }
        for p in [13u64, 29].map(|p| p % packages) {
            let path = root.join(format!("usr/lib/pkg{p:02}/lib0.so"));
            let mut bytes = std::fs::read(&path)?;
            let mid = bytes.len() / 2;
            bytes[mid..mid + 64].copy_from_slice(&Vocab::random(&format!("patch{p}"), 64));
            write(root, &format!("usr/lib/pkg{p:02}/lib0.so"), &bytes, EPOCH_V2)?;
        }
        write(root, "usr/bin/newtool", &v.binary("newtool", 1_000_000), EPOCH_V2)?;
    }
    write(
        root,
        "etc/os-release",
        format!("VERSION_ID={version}\n").as_bytes(),
        EPOCH_V1,
    )?;
    Ok(())
}

/// One file in `CHANGE_EVERY` changes in version 2 of a real-file image (about 3 %).
const CHANGE_EVERY: usize = 33;

/// Regular files under `dirs`, in name order, until they add up to `budget` bytes: (path, size).
fn real_files(dirs: &[PathBuf], budget: u64) -> Result<Vec<(PathBuf, u64)>> {
    fn walk(dir: &Path, budget: u64, total: &mut u64, out: &mut Vec<(PathBuf, u64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if *total >= budget {
                return;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, budget, total, out);
            } else if meta.is_file() && meta.len() > 0 && std::fs::File::open(&path).is_ok() {
                *total += meta.len();
                out.push((path, meta.len()));
            }
        }
    }
    let (mut total, mut out) = (0, Vec::new());
    for dir in dirs {
        walk(dir, budget, &mut total, &mut out);
    }
    if total < budget {
        bail!(
            "only {} MiB of readable files under the --real-files directories, {} MiB asked",
            total / crate::MIB,
            budget / crate::MIB
        );
    }
    Ok(out)
}

/// Version `version` of the real-file tree under `root`: the files as they are, or in version 2
/// every `CHANGE_EVERY`th one changed (three 48-byte patches and 1536 new bytes in its middle).
/// Returns how many files changed.
#[allow(
    clippy::cast_possible_truncation,
    reason = "below(n) < n, and n is a file length held in memory"
)]
fn real_tree(files: &[(PathBuf, u64)], root: &Path, version: u32) -> Result<usize> {
    let mut changed = 0;
    for (k, (path, _)) in files.iter().enumerate() {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let mut bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if version == 2 && k % CHANGE_EVERY == 3 {
            let seed = path.display().to_string();
            let mut r = Rng::new(&seed);
            let len = bytes.len() as u64;
            for p in 0..3 {
                let at = r.below(len.saturating_sub(48)) as usize;
                let end = (at + 48).min(bytes.len());
                bytes[at..end].copy_from_slice(&Vocab::random(&format!("{seed}{p}"), end - at));
            }
            let mid = bytes.len() / 2;
            let tail = bytes.split_off(mid);
            bytes.extend_from_slice(&Vocab::random(&format!("{seed}-new"), 1536));
            bytes.extend_from_slice(&tail);
            changed += 1;
        }
        write(root, &rel.display().to_string(), &bytes, EPOCH_V1)?;
    }
    Ok(changed)
}

/// A tar of `tree`, the same bytes for the same files (names sorted, owners and times fixed).
fn tar(tree: &Path, image: &Path) -> Result<()> {
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--format=gnu",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg(format!("--mtime=@{EPOCH_V1}"))
        .arg("-cf")
        .arg(image)
        .arg("-C")
        .arg(tree)
        .arg(".")
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar of {} failed", tree.display());
    }
    Ok(())
}

fn mkfs(tree: &Path, image: &Path, size_mib: u64) -> Result<()> {
    let st = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-U",
            "6b1e2d3c-0f5a-4c8e-9d7b-1a2b3c4d5e6f",
            "-E",
        ])
        .arg("hash_seed=1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b,root_owner=0:0")
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .env("E2FSPROGS_FAKE_TIME", EPOCH_V1.to_string())
        .status()
        .context("mkfs.ext4 (apt install e2fsprogs)")?;
    if !st.success() {
        bail!("mkfs.ext4 failed for {}", image.display());
    }
    Ok(())
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Output size of a shell command writing to `out`, or None when the tool is missing.
fn tool_size(tool: &str, script: &str, out: &Path) -> Result<Option<(u64, f64)>> {
    if !has(tool) {
        return Ok(None);
    }
    let t = Instant::now();
    let st = Command::new("sh").arg("-c").arg(script).status()?;
    if !st.success() {
        eprintln!("{script} failed; its row is left out");
        return Ok(None);
    }
    let secs = t.elapsed().as_secs_f64();
    let len = std::fs::metadata(out)?.len();
    let _ = std::fs::remove_file(out);
    Ok(Some((len, secs)))
}

/// A fresh device directory with its config (with `[download] chunk_workers` when `workers` is
/// given, else the agent's default); returns the config path.
fn device(dir: &Path, name: &str, workers: Option<u64>) -> Result<PathBuf> {
    let dev = dir.join(name);
    std::fs::create_dir_all(dev.join("slots"))?;
    std::fs::write(dev.join("slots/a.img"), b"factory")?;
    let config = dev.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"bench\"\nhardware = \"bench-hw\"\nstate_dir = {:?}\ntrusted_keys = [{:?}]\n[slots]\nbackend = \"file\"\na = {:?}\nb = {:?}\n",
            dev.join("state").display().to_string(),
            dir.join("keys/release.pub").display().to_string(),
            dev.join("slots/a.img").display().to_string(),
            dev.join("slots/b.img").display().to_string()
        ) + &workers.map_or_else(String::new, |n| format!("[download]\nchunk_workers = {n}\n")),
    )?;
    Ok(config)
}

/// What one install of the agent cost.
#[derive(Clone, Copy)]
struct Cost {
    /// Wall time.
    secs: f64,
    /// Peak RSS of the agent, KiB.
    kib: u64,
    /// CPU time of the agent, user + system, every thread.
    cpu: f64,
}

/// Runs the agent's install.
///
/// The agent is started by a fresh `flightnode-bench child-rusage` process, not by this one: the
/// kernel counts the memory of the process an `exec` replaces into the new program's peak, and
/// here that would be this bench with both images in memory.
fn install(agent: &Path, config: &Path, url: &str) -> Result<Cost> {
    let out = tempfile::NamedTempFile::new()?;
    let t = Instant::now();
    let st = Command::new(std::env::current_exe()?)
        .arg("child-rusage")
        .arg(out.path())
        .arg(agent)
        .arg("--config")
        .arg(config)
        .args(["install", url])
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("install of {url} failed ({st})");
    }
    let usage = std::fs::read_to_string(out.path())?;
    let mut fields = usage.split_whitespace();
    let kib = fields.next().unwrap_or_default().parse()?;
    let cpu = fields.next().unwrap_or_default().parse()?;
    Ok(Cost { secs, kib, cpu })
}

/// `child-rusage OUT PROGRAM ARGS...`: runs the program, writes its peak RSS (KiB, from
/// `wait4`) and its CPU seconds (user + system) to OUT and exits with its status. Run from a small process, so what the program's
/// `exec` replaced does not count.
pub(crate) fn child_rusage(args: &[String]) -> Result<()> {
    let [out, program, rest @ ..] = args else {
        bail!("usage: flightnode-bench child-rusage OUT PROGRAM [ARGS...]");
    };
    let child = Command::new(program).args(rest).spawn()?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child; status and usage are valid out-parameters.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if r != pid {
        bail!("wait4 on {program} failed: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    std::fs::write(
        out,
        format!(
            "{} {:.3}",
            usage.ru_maxrss,
            secs(usage.ru_utime) + secs(usage.ru_stime)
        ),
    )?;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{program} failed (wait status {status})");
    }
    Ok(())
}

/// Makes a bundle of `image`: format 1 with `chunking` None, else format 2 with its level, context
/// window and segment, and chunk size. Returns the seconds it took.
fn create(
    agent: &Path,
    dir: &Path,
    image: &Path,
    version: &str,
    out: &Path,
    chunking: Option<&Options>,
) -> Result<f64> {
    let key = dir.join("keys/release.key").display().to_string();
    let img = image.display().to_string();
    let o = out.display().to_string();
    let mut args = vec![
        "bundle",
        "create",
        "--key",
        &key,
        "--image",
        &img,
        "--version",
        version,
        "--compatible",
        "bench-hw",
        "--output",
        &o,
    ];
    // Only the settings given on the command line: the rest are the agent's own defaults, which
    // the table reads back from the bundle (`bundle info`) rather than keeping a copy here.
    let given: Vec<(&str, String)> = chunking.map_or_else(Vec::new, |o| {
        [
            ("--level", o.level),
            ("--window-kib", o.window_kib),
            ("--segment-kib", o.segment_kib),
            ("--chunk-kib", o.chunk_kib),
        ]
        .into_iter()
        .filter_map(|(flag, v)| v.map(|v| (flag, v.to_string())))
        .collect()
    });
    if chunking.is_some() {
        args.push("--chunked");
    }
    for (flag, v) in &given {
        args.extend([*flag, v.as_str()]);
    }
    let t = Instant::now();
    run_ok(agent, &args)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Installs `url` on a fresh device with `workers` chunk workers (`None`: the agent's default).
fn fresh_install(agent: &Path, dir: &Path, url: &str, workers: Option<u64>) -> Result<Cost> {
    let cfg = device(dir, "fresh", workers)?;
    let r = install(agent, &cfg, url)?;
    std::fs::remove_dir_all(dir.join("fresh"))?;
    Ok(r)
}

/// What `chunks` measures.
pub(crate) struct Options {
    /// Size of each generated image.
    pub size_mib: u64,
    /// zstd level of the chunked bundles (`None`: `bundle create`'s default).
    pub level: Option<u64>,
    /// Context window of the chunked bundles, KiB (`None`: `bundle create`'s default).
    pub window_kib: Option<u64>,
    /// Context segment of the chunked bundles, KiB (`None`: `bundle create`'s default).
    pub segment_kib: Option<u64>,
    /// Average chunk size of the chunked bundles, KiB (`None`: `bundle create`'s default).
    pub chunk_kib: Option<u64>,
    /// Fresh installs per format; the table shows the median.
    pub runs: u64,
    /// false skips `zstd -19`, `xdelta3` and `bsdiff` of the image (minutes at 256 MiB), for
    /// measuring the installs alone.
    pub baselines: bool,
    /// Runs `bsdiff` above 64 MiB too (tens of minutes per 64 MiB, 17 times the image in memory).
    pub bsdiff: bool,
    /// An existing (version 1, version 2) image pair instead of the generated one.
    pub images: Option<(PathBuf, PathBuf)>,
    /// Tar images of `size_mib` of the files under these directories instead of generated ones.
    pub real_files: Option<Vec<PathBuf>>,
    /// Installs format 2 twice per round, with `[download] chunk_workers` = 1 and = this, side
    /// by side (`None`: once, with the agent's default).
    pub chunk_workers: Option<u64>,
}

/// One way of installing that the table has a row for.
struct Variant {
    name: String,
    path: &'static str,
    workers: Option<u64>,
    secs: Vec<f64>,
    cpu: Vec<f64>,
    kib: u64,
}

impl Variant {
    fn new(name: String, path: &'static str, workers: Option<u64>) -> Self {
        Self {
            name,
            path,
            workers,
            secs: Vec::new(),
            cpu: Vec::new(),
            kib: 0,
        }
    }
}

/// How the agent picks its chunk workers without `[download] chunk_workers`.
fn default_workers() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u64::try_from(cores.saturating_sub(1).clamp(1, 4)).unwrap_or(1)
}

pub(crate) fn chunks(o: &Options) -> Result<()> {
    let Options { size_mib, runs, .. } = *o;
    let agent = binary("flightnode-agent")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    run_ok(
        &agent,
        &["keygen", "--out-dir", &dir.join("keys").display().to_string()],
    )?;
    let (img1, img2, what) = if let Some((old, new)) = &o.images {
        for img in [old, new] {
            std::fs::metadata(img).with_context(|| format!("reading the image {}", img.display()))?;
        }
        let what = format!("given images {} -> {}", old.display(), new.display());
        (old.clone(), new.clone(), what)
    } else if let Some(dirs) = &o.real_files {
        let files = real_files(dirs, size_mib * crate::MIB)?;
        let (img1, img2) = (dir.join("v1.img"), dir.join("v2.img"));
        let mut changed = 0;
        for (version, img) in [(1, &img1), (2, &img2)] {
            let root = dir.join(format!("tree{version}"));
            eprintln!(
                "copying {} real files into tree {version} and its tar image",
                files.len()
            );
            changed = real_tree(&files, &root, version)?;
            tar(&root, img)?;
            std::fs::remove_dir_all(&root)?;
        }
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let what = format!(
            "tar images of {} real files ({size_mib} MiB from {}), version 2 = {changed} files ({:.1} %) changed and grown, \
             everything after the first change shifted",
            files.len(),
            names.join(", "),
            100.0 * changed as f64 / files.len() as f64
        );
        (img1, img2, what)
    } else {
        let vocab = Vocab::new();
        let packages = (size_mib * PACKAGES_PER_256_MIB / 256).max(8);
        let (img1, img2) = (dir.join("v1.img"), dir.join("v2.img"));
        for (version, img) in [(1, &img1), (2, &img2)] {
            let root = dir.join(format!("tree{version}"));
            eprintln!("generating tree {version} and its {size_mib} MiB ext4 image");
            tree(&vocab, &root, version, packages)?;
            mkfs(&root, img, size_mib)?;
            std::fs::remove_dir_all(&root)?;
        }
        let what = format!(
            "generated ext4 images of {size_mib} MiB, version 2 = one package upgraded, 5 configs rewritten, \
             2 binaries patched, 1 file added"
        );
        (img1, img2, what)
    };
    let image_len = std::fs::metadata(&img2)?.len();
    eprintln!("creating bundles");
    let plain2 = dir.join("plain2.fnb");
    let chunked1 = dir.join("chunked1.fnb");
    let chunked2 = dir.join("chunked2.fnb");
    let t_plain = create(&agent, dir, &img2, "2.0.0", &plain2, None)?;
    create(&agent, dir, &img1, "1.1.0", &chunked1, Some(o))?;
    let t_chunked = create(&agent, dir, &img2, "2.0.0", &chunked2, Some(o))?;
    let settings = chunk_settings(&agent, &chunked2, o.level)?;
    eprintln!("format 2 bundles: {settings}");

    let server = BundleServer::start_blocking()?;
    for (path, file) in [
        ("/plain2.fnb", &plain2),
        ("/chunked1.fnb", &chunked1),
        ("/chunked2.fnb", &chunked2),
    ] {
        server.put_file(path, file)?;
    }
    let load_before = loadavg();
    eprintln!("installing (load average {load_before})");
    let worker_settings = match o.chunk_workers {
        Some(n) => vec![Some(1), Some(n)],
        None => vec![None],
    };
    let label = |w: Option<u64>| match w {
        Some(1) => ", 1 chunk worker".to_owned(),
        Some(n) => format!(", {n} chunk workers"),
        None => format!(", default {} chunk worker(s)", default_workers()),
    };
    let mut variants = vec![Variant::new(
        "full download, format 1 (plain image)".into(),
        "/plain2.fnb",
        None,
    )];
    for &w in &worker_settings {
        variants.push(Variant::new(
            format!("full download, format 2{}", label(w)),
            "/chunked2.fnb",
            w,
        ));
    }
    // Alternating, so a slow moment of this shared machine does not fall on one format only; the
    // format 2 installs swap places every round.
    let runs = runs.max(1);
    for round in 0..runs {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if round % 2 == 1 {
            order[1..].reverse();
        }
        for k in order {
            let v = &mut variants[k];
            let c = fresh_install(&agent, dir, &server.url(v.path), v.workers)?;
            v.secs.push(c.secs);
            v.cpu.push(c.cpu);
            v.kib = v.kib.max(c.kib);
        }
    }
    for v in &variants {
        eprintln!("{}: install s {:.2?}, CPU s {:.2?}", v.name, v.secs, v.cpu);
    }
    let sent1 = server.bytes_sent_for("/plain2.fnb") / runs;
    let sent2 = server.bytes_sent_for("/chunked2.fnb") / (runs * worker_settings.len() as u64);
    let mut updates = Vec::new();
    for &w in &worker_settings {
        let cfg = device(dir, "update", w)?;
        install(&agent, &cfg, &server.url("/chunked1.fnb"))?;
        server.reset_counters();
        let cost = install(&agent, &cfg, &server.url("/chunked2.fnb"))?;
        let sent = server.bytes_sent_for("/chunked2.fnb");
        let requests = server.requests_for("/chunked2.fnb").len();
        std::fs::remove_dir_all(dir.join("update"))?;
        updates.push((
            format!(
                "update over version 1, format 2 ({requests} requests){}",
                label(w)
            ),
            sent,
            cost,
        ));
    }
    let load_after = loadavg();

    eprintln!("baselines");
    let (zstd19, xdelta, bsdiff) = if o.baselines {
        baseline_sizes(&img1, &img2, dir, o.bsdiff)?
    } else {
        eprintln!("--no-baselines: zstd, xdelta3 and bsdiff skipped");
        (None, None, None)
    };

    let pct = |b: u64| 100.0 * b as f64 / image_len as f64;
    println!("{what}; version 2 is {:.1} MiB", mib(image_len));
    println!(
        "installs: median of {runs} per row, alternating; load average {load_before} before, {load_after} after; \
         the agent's default here is {} chunk worker(s)",
        default_workers()
    );
    println!(
        "{:<64} {:>12} {:>9} {:>10} {:>8} {:>10} {:>12}",
        "transfer", "bytes", "% image", "install s", "CPU s", "MiB/s", "peak RSS MiB"
    );
    let row = |name: &str, bytes: u64, secs: f64, cpu: f64, rss: u64| {
        println!(
            "{name:<64} {bytes:>12} {:>8.2}% {secs:>10.2} {cpu:>8.2} {:>10.1} {:>12.1}",
            pct(bytes),
            mib_s(image_len, secs),
            rss as f64 / 1024.0
        );
    };
    let medians: Vec<(f64, f64)> = variants
        .iter()
        .map(|v| (crate::median(v.secs.clone()), crate::median(v.cpu.clone())))
        .collect();
    for (v, &(secs, cpu)) in variants.iter().zip(&medians) {
        let sent = if v.path == "/plain2.fnb" { sent1 } else { sent2 };
        row(&v.name, sent, secs, cpu, v.kib);
    }
    println!("format 2: {settings}");
    for (name, sent, cost) in &updates {
        row(name, *sent, cost.secs, cost.cpu, cost.kib);
    }
    let other = |name: &str, r: Option<(u64, f64)>| match r {
        Some((bytes, secs)) => println!(
            "{name:<64} {bytes:>12} {:>8.2}%   (made in {secs:.1} s)",
            pct(bytes)
        ),
        None => println!("{name:<64} {:>12}", "n/a"),
    };
    other("zstd -19 of the image", zstd19);
    other("xdelta3 -9 delta v1 -> v2", xdelta);
    other("bsdiff delta v1 -> v2", bsdiff);
    println!("bundle create: format 1 {t_plain:.1} s, format 2 {t_chunked:.1} s");
    let t1 = medians[0].0;
    let ratios: Vec<String> = variants[1..]
        .iter()
        .zip(&medians[1..])
        .map(|(v, &(t2, _))| format!("{:.2}{}", t1 / t2, label(v.workers)))
        .collect();
    println!(
        "goals: update / full image = {:.1} % (<= 10 %); full chunked / zstd -19 = {}; install throughput format 2 / format 1 = {} (>= 0.8)",
        pct(updates[0].1),
        zstd19.map_or("n/a".into(), |(z, _)| format!(
            "{:.3} (<= 1.05)",
            sent2 as f64 / z as f64
        )),
        ratios.join("; ")
    );
    Ok(())
}

/// The 1, 5 and 15 minute load averages, as the kernel reports them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// How `bundle` was chunked, as `bundle info` reads it from the manifest: "zstd -19, 4096/256 KiB
/// context, 64 KiB chunks". The manifest does not record the level: `level` is the one given, if
/// any.
fn chunk_settings(agent: &Path, bundle: &Path, level: Option<u64>) -> Result<String> {
    let out = Command::new(agent)
        .args(["bundle", "info"])
        .arg(bundle)
        .output()
        .with_context(|| format!("running {} bundle info", agent.display()))?;
    let info = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "bundle info {} failed: {}",
            bundle.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "chunks:   N (fastcdc MIN/AVG/MAX bytes min/avg/max), ..." and
    // "context:  W bytes before each S-byte segment" (or "context:  none ...").
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("bundle info {} has no {name:?} line:\n{info}", bundle.display()))
    };
    let kib = |bytes: &str| bytes.parse::<u64>().map(|b| b / 1024).ok();
    let avg = field("chunks:")?
        .split_whitespace()
        .nth(2)
        .and_then(|sizes| sizes.split('/').nth(1))
        .and_then(kib)
        .with_context(|| format!("bundle info {}: cannot read the chunk sizes", bundle.display()))?;
    let context = field("context:")?;
    let words: Vec<&str> = context.split_whitespace().collect();
    let context = match (words.first().copied().and_then(kib), words.get(4)) {
        (Some(w), Some(seg)) => {
            let seg = seg.strip_suffix("-byte").and_then(kib).unwrap_or(0);
            format!("{w}/{seg} KiB context")
        }
        _ => "no context".to_owned(),
    };
    let level = level.map_or_else(|| "zstd, default level".to_owned(), |l| format!("zstd -{l}"));
    Ok(format!("{level}, {context}, {avg} KiB chunks"))
}

/// Sizes of `zstd -19` of the image and of the `xdelta3`/`bsdiff` deltas, where installed.
type Sizes = (Option<(u64, f64)>, Option<(u64, f64)>, Option<(u64, f64)>);

fn baseline_sizes(img1: &Path, img2: &Path, dir: &Path, force_bsdiff: bool) -> Result<Sizes> {
    let (i1, i2) = (img1.display(), img2.display());
    let zst = dir.join("img.zst");
    let zstd19 = tool_size(
        "zstd",
        &format!("zstd -q -19 -T0 -f -o {} {i2}", zst.display()),
        &zst,
    )?;
    let len1 = std::fs::metadata(img1)?.len();
    // xdelta3 finds matches only within its source window: the whole of version 1.
    let window = len1.next_power_of_two().max(1 << 24);
    let xd = dir.join("img.xd3");
    let xdelta = tool_size(
        "xdelta3",
        &format!("xdelta3 -e -9 -f -B {window} -s {i1} {i2} {}", xd.display()),
        &xd,
    )?;
    let bsd = dir.join("img.bsdiff");
    // bsdiff's suffix sort takes minutes per 10 MiB and 17x the image in memory.
    let bsdiff = if force_bsdiff || len1 <= 64 * crate::MIB {
        eprintln!("bsdiff (tens of minutes per 64 MiB)");
        tool_size("bsdiff", &format!("bsdiff {i1} {i2} {}", bsd.display()), &bsd)?
    } else {
        eprintln!("bsdiff skipped above 64 MiB (--bsdiff runs it anyway)");
        None
    };

    Ok((zstd19, xdelta, bsdiff))
}
