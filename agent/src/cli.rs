//! Subcommand bodies and terminal output.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use flightnode_agent::bundle::{self, CreateOptions, TrustedKeys};
use flightnode_agent::config::Config;
use flightnode_agent::daemon::control;
use flightnode_agent::engine::{Engine, Observer, Outcome, Request, derive_upgrade_id};
use flightnode_agent::proto::error::Chain;
use flightnode_agent::proto::status::{DeviceStatus, LastUpgrade};
use flightnode_agent::proto::{Slot, UpgradeResult};
use flightnode_agent::state::DeviceState;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit status when reboot mode requested a reboot that did not happen.
const EXIT_REBOOT_PENDING: u8 = 3;
/// Exit status when SIGINT/SIGTERM paused a download.
const EXIT_INTERRUPTED: u8 = 130;

/// Ctrl-C or SIGTERM pause the download (offset saved) instead of killing it mid-write.
fn pause_on_signal(rt: &tokio::runtime::Runtime, engine: &Engine) {
    let interrupts = engine.interrupts();
    rt.spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("\ninterrupted: pausing the download");
        interrupts.pause.store(true, std::sync::atomic::Ordering::SeqCst);
        // A stalled connection writes nothing, so the pause may never be seen. Every step is
        // write-ahead, so leaving now is as safe as pausing: the last checkpoint resumes.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        eprintln!("still waiting on the network; exiting, the next install resumes from the last checkpoint");
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    });
}

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Sign an image into a bundle (tar: manifest.json, manifest.sig, image).
    Create {
        /// Private key from `keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Firmware image.
        #[arg(long)]
        image: PathBuf,
        /// Firmware version (semver, e.g. 1.4.0).
        #[arg(long)]
        version: semver::Version,
        /// Anti-rollback counter; devices refuse bundles below their committed floor.
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// Hardware id this image runs on (repeat for several).
        #[arg(long, required = true)]
        compatible: Vec<String>,
        /// Refuse the bundle on devices after this long (e.g. 90d) from now.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// Bundle file to write.
        #[arg(long)]
        output: PathBuf,
        /// The flight-controller firmware this image flies with, as a semver requirement on the
        /// version the autopilot reports (e.g. ">=4.7.0, <4.8.0"). While the autopilot reports
        /// another, the agent keeps the vehicle from arming. Agents older than this option
        /// refuse bundles that carry it.
        #[arg(long, value_name = "REQ")]
        autopilot: Option<semver::VersionReq>,
        /// Write a chunked bundle (format 2): content-defined chunks, each zstd-compressed, so
        /// devices fetch only the chunks their running slot lacks. Needs agents that know format 2.
        #[arg(long)]
        chunked: bool,
        /// zstd level of the chunks (1-22; with --chunked).
        #[arg(long, requires = "chunked", value_parser = clap::value_parser!(i32).range(1..=22))]
        level: Option<i32>,
        /// KiB of the image before each chunk's segment its frame may refer to (with
        /// --chunked; at most 8192, default 4096). Devices hold about twice this while they
        /// write. 0 writes independent frames, the layout agents before chunk contexts read.
        #[arg(long, requires = "chunked", value_parser = clap::value_parser!(u32).range(0..=8192))]
        window_kib: Option<u32>,
        /// KiB of the image whose chunks share one context (with --chunked; 4-4096, default
        /// 256). Making a bundle digests the window once per segment: doubling the segment
        /// halves that work, and the chunks late in a segment lose the bytes just before them
        /// as context.
        #[arg(long, requires = "chunked", value_parser = clap::value_parser!(u32).range(4..=4096))]
        segment_kib: Option<u32>,
        /// Average chunk size in KiB (with --chunked; 16-1024, default 64); chunks are between
        /// a quarter and four times it. Smaller chunks find more of an update in the running
        /// slot (kernel modules, whose signature and version string change in every build) at
        /// the cost of a larger index.
        #[arg(long, requires = "chunked", value_parser = clap::value_parser!(u32).range(16..=1024))]
        chunk_kib: Option<u32>,
    },
    /// Check a bundle's signature and image hash; print its manifest.
    Verify {
        /// Trusted public key (repeat for several).
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// Bundle file.
        file: PathBuf,
    },
    /// Print a bundle's format, sizes and chunk count (from its manifest; nothing is verified).
    Info {
        /// Bundle file.
        file: PathBuf,
    },
}

/// Logs to the journal under systemd (structured fields kept), human-readable to stderr otherwise.
pub fn init_logging(verbose: u8, daemon: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let default = match (verbose, daemon) {
        (0, false) => LevelFilter::WARN,
        (0, true) | (1, _) => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    // NB: `Targets` (`info,flightnode_agent::mqtt=debug`), not `EnvFilter`: its span and field
    // filters need a regex engine, a few hundred KiB of the drone's binary for nobody.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(default));
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .init(),
    }
}

pub fn run(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stop requested");
            stop.cancel();
        });
        flightnode_agent::daemon::run(cfg, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The running daemon's control socket, if there is one.
fn daemon(cfg: &Config) -> Option<std::os::unix::net::UnixStream> {
    control::connect(&cfg.state_dir)
}

pub fn keygen(out_dir: &Path) -> Result<ExitCode> {
    let paths = bundle::keygen(out_dir)?;
    println!("private key: {} (keep it off devices)", paths.private.display());
    println!(
        "public key:  {} (list it in trusted_keys)",
        paths.public.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn bundle(cmd: BundleCommand) -> Result<ExitCode> {
    match cmd {
        BundleCommand::Create {
            key,
            image,
            version,
            security_version,
            compatible,
            expires_in,
            output,
            autopilot,
            chunked,
            level,
            window_kib,
            segment_kib,
            chunk_kib,
        } => {
            let expires = expires_in.map(|d| time::OffsetDateTime::now_utc() + d);
            let opts = CreateOptions {
                version,
                security_version,
                compatible,
                expires,
                autopilot,
                chunked: chunked.then(|| bundle::Chunking {
                    level: level.unwrap_or(bundle::chunked::DEFAULT_LEVEL),
                    window: window_kib.map_or(bundle::chunked::DEFAULT_WINDOW, |k| k * 1024),
                    segment: segment_kib.map_or(bundle::chunked::SEGMENT, |k| k * 1024),
                    avg_size: chunk_kib.map_or(bundle::chunked::AVG_SIZE, |k| k * 1024),
                }),
            };
            let m = bundle::create(&key, &image, &opts, &output)?;
            println!(
                "{}: version {} for {}, image {} bytes, sha256 {}",
                output.display(),
                m.version,
                m.compatible.join(", "),
                m.image.size,
                m.image.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Verify { key, file } => {
            let keys = TrustedKeys::load(&key)?;
            match bundle::verify_file(&file, &keys) {
                Ok(header) => {
                    print!("{}", String::from_utf8_lossy(&header.manifest.to_bytes()));
                    println!("OK: {} verified, signed by key {}", file.display(), header.key_id);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {}: {}: {}", file.display(), e.code(), Chain(&e));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        BundleCommand::Info { file } => {
            let m = bundle::read_manifest_file(&file)?;
            let len = std::fs::metadata(&file).map_or(0, |m| m.len());
            println!("bundle:   {} ({len} bytes)", file.display());
            println!("format:   {}", m.format);
            println!(
                "version:  {} (security version {})",
                m.version, m.security_version
            );
            println!("image:    {} bytes, sha256 {}", m.image.size, m.image.sha256);
            if let Some(c) = &m.chunks {
                let ratio = c.data_size as f64 / (m.image.size.max(1)) as f64;
                println!(
                    "chunks:   {} ({} {}/{}/{} bytes min/avg/max), index {} bytes",
                    c.count, c.chunker, c.min_size, c.avg_size, c.max_size, c.index_size
                );
                println!(
                    "data:     {} bytes {} ({:.1} % of the image)",
                    c.data_size,
                    c.compression,
                    ratio * 100.0
                );
                match c.context {
                    Some(x) => println!(
                        "context:  {} bytes before each {}-byte segment",
                        x.window, x.segment
                    ),
                    None => println!("context:  none (independent frames)"),
                }
            }
            println!("(not verified: run bundle verify --key for that)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open_engine(config: &Path) -> Result<(tokio::runtime::Runtime, Engine)> {
    open_engine_with(Config::load(config)?)
}

fn open_engine_with(cfg: Config) -> Result<(tokio::runtime::Runtime, Engine)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = Engine::open(cfg, rt.handle().clone())?;
    Ok((rt, engine))
}

/// Prints phases and a progress bar (on a terminal) or a line per 10 % (otherwise).
struct Progress {
    tty: bool,
    started: Instant,
    last_draw: Option<Instant>,
    last_decile: u64,
    phase: Option<flightnode_agent::proto::Phase>,
}

impl Observer for Progress {
    fn changed(&mut self, state: &DeviceState) {
        let phase = state.phase();
        if self.phase != Some(phase) {
            if self.tty && self.last_draw.is_some() {
                eprintln!();
                self.last_draw = None;
            }
            if phase != flightnode_agent::proto::Phase::Idle {
                eprintln!("phase: {phase}");
            }
            self.phase = Some(phase);
        }
    }

    fn progress(&mut self, bytes: u64, total: u64) {
        let total = total.max(1);
        if self.tty {
            if self
                .last_draw
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
                && bytes < total
            {
                return;
            }
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let filled = usize::try_from(bytes.min(total) * 30 / total).unwrap_or(30);
            eprint!(
                "\r[{}{}] {:>3}%  {:.1}/{:.1} MiB  {:.1} MiB/s ",
                "#".repeat(filled),
                "-".repeat(30 - filled.min(30)),
                bytes * 100 / total,
                bytes as f64 / 1_048_576.0,
                total as f64 / 1_048_576.0,
                bytes as f64 / 1_048_576.0 / secs
            );
            let _ = std::io::stderr().flush();
            self.last_draw = Some(Instant::now());
        } else {
            let decile = bytes * 10 / total;
            if decile > self.last_decile {
                self.last_decile = decile;
                eprintln!("written {} of {} bytes ({}%)", bytes, total, decile * 10);
            }
        }
    }
}

fn report(last: &LastUpgrade) -> ExitCode {
    let version = last.version.as_deref().unwrap_or("?");
    match (&last.result, &last.error) {
        (UpgradeResult::Committed, _) => println!("committed: version {version} is active"),
        (UpgradeResult::AlreadyInstalled, _) => {
            println!("already installed: version {version}, nothing written");
        }
        (result, Some(e)) => eprintln!("{result}: {}: {}", e.code, e.message),
        (result, None) => eprintln!("{result}"),
    }
    if last.result.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn outcome(o: Outcome) -> ExitCode {
    match o {
        Outcome::Idle => {
            println!("nothing in flight");
            ExitCode::SUCCESS
        }
        Outcome::Finished(last) => report(&last),
        Outcome::Paused => {
            eprintln!("paused: the download offset is saved; run the same install again to resume");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Outcome::AwaitingReboot { slot } => {
            eprintln!(
                "reboot requested into slot {slot}, but the system is still up; the trial happens on the next boot"
            );
            ExitCode::from(EXIT_REBOOT_PENDING)
        }
    }
}

pub fn install(
    config: &Path,
    source: String,
    allow_downgrade: bool,
    upgrade_id: Option<String>,
) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    if let Some(stream) = daemon(&cfg) {
        return install_via_daemon(stream, source, allow_downgrade, upgrade_id);
    }
    let (rt, mut engine) = open_engine_with(cfg)?;
    pause_on_signal(&rt, &engine);
    engine.set_observer(Box::new(new_progress()));
    let id = upgrade_id.unwrap_or_else(|| derive_upgrade_id(&source));
    let o = engine.install(Request {
        id,
        source,
        allow_downgrade,
    })?;
    Ok(outcome(o))
}

fn new_progress() -> Progress {
    Progress {
        tty: std::io::stderr().is_terminal(),
        started: Instant::now(),
        last_draw: None,
        last_decile: 0,
        phase: None,
    }
}

fn install_via_daemon(
    stream: std::os::unix::net::UnixStream,
    source: String,
    allow_downgrade: bool,
    upgrade_id: Option<String>,
) -> Result<ExitCode> {
    let mut progress = new_progress();
    let mut code = ExitCode::FAILURE;
    let req = control::Request::Install {
        source,
        allow_downgrade,
        upgrade_id,
    };
    control::call(stream, &req, |r| match r {
        control::Response::Progress(p) => progress.progress(p.bytes, p.total),
        control::Response::Done(last) => {
            if progress.last_draw.is_some() {
                eprintln!();
            }
            code = report(&last);
        }
        control::Response::Error { code: c, message } => eprintln!("{c}: {message}"),
        control::Response::Outcome(o) | control::Response::Message(o) => eprintln!("{o}"),
        control::Response::Status(_) => {}
    })
    .context("talking to the running agent")?;
    Ok(code)
}

pub fn resume(config: &Path) -> Result<ExitCode> {
    let (rt, mut engine) = open_engine(config)?;
    pause_on_signal(&rt, &engine);
    Ok(outcome(engine.resume()?))
}

fn print_status(s: &DeviceStatus) {
    let slot = |name: Slot, st: &flightnode_agent::proto::status::SlotStatus| {
        let mut marks = Vec::new();
        if s.active_slot == name {
            marks.push("active");
        }
        if s.booted_slot == name {
            marks.push("booted");
        }
        println!(
            "  slot {name}: {:<6} {:<12} {}",
            format!("{:?}", st.state).to_lowercase(),
            st.version.as_deref().unwrap_or("-"),
            marks.join(", ")
        );
    };
    println!(
        "device {}: committed {} (security floor {})",
        s.device_id, s.committed_version, s.security_floor
    );
    slot(Slot::A, &s.slots.a);
    slot(Slot::B, &s.slots.b);
    match (&s.upgrade, &s.progress) {
        (Some(u), Some(p)) => println!(
            "upgrade {}: {} → slot {} ({}/{} bytes) from {}",
            u.upgrade_id, s.phase, u.target_slot, p.bytes, p.total, u.source
        ),
        (Some(u), None) => println!(
            "upgrade {}: {} → slot {} from {}",
            u.upgrade_id, s.phase, u.target_slot, u.source
        ),
        (None, _) => println!("phase: idle"),
    }
    if let Some(u) = &s.upgrade
        && s.phase == flightnode_agent::proto::Phase::Testing
        && s.booted_slot != u.target_slot
    {
        println!(
            "trial of slot {} pending: the bootloader tries it at the next boot (slot {} runs)",
            u.target_slot, s.booted_slot
        );
    }
    if let Some(last) = &s.last_upgrade {
        let err = last
            .error
            .as_ref()
            .map(|e| format!(" ({}: {})", e.code, e.message))
            .unwrap_or_default();
        println!(
            "last upgrade {}: {} {}{err}",
            last.upgrade_id,
            last.result,
            last.version.as_deref().unwrap_or("")
        );
    }
}

pub fn status(config: &Path, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let s = match daemon(&cfg) {
        Some(stream) => {
            let mut status = None;
            let mut error = None;
            control::call(stream, &control::Request::Status, |r| match r {
                control::Response::Status(s) => status = Some(*s),
                control::Response::Error { code, message } => error = Some(format!("{code}: {message}")),
                _ => {}
            })
            .context("talking to the running agent")?;
            match (status, error) {
                (Some(s), _) => s,
                (None, e) => bail!("the running agent gave no status: {}", e.unwrap_or_default()),
            }
        }
        // Read-only: a status never settles, adopts or writes anything.
        None => Engine::inspect(&cfg)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_slot(which: &str, booted: Slot) -> Result<Slot> {
    Ok(match which {
        "booted" => booted,
        "other" => !booted,
        s => match Slot::parse(s) {
            Some(slot) => slot,
            None => bail!("unknown slot {s:?}: use booted, other, a or b"),
        },
    })
}

pub fn mark(config: &Path, which: &str, good: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    if let Some(stream) = daemon(&cfg) {
        let booted = match daemon(&cfg) {
            Some(s) => {
                let mut booted = None;
                control::call(s, &control::Request::Status, |r| {
                    if let control::Response::Status(s) = r {
                        booted = Some(s.booted_slot);
                    }
                })?;
                booted.context("the running agent gave no status")?
            }
            None => bail!("the running agent went away"),
        };
        let slot = parse_slot(which, booted)?;
        let mut result = Ok(ExitCode::SUCCESS);
        control::call(stream, &control::Request::Mark { slot, good }, |r| match r {
            control::Response::Message(m) => println!("{m}"),
            control::Response::Error { message, .. } => result = Err(anyhow::anyhow!(message)),
            _ => {}
        })?;
        return result;
    }
    let (_rt, mut engine) = open_engine_with(cfg)?;
    let slot = parse_slot(which, engine.status()?.booted_slot)?;
    println!("{}", engine.mark(slot, good)?);
    Ok(ExitCode::SUCCESS)
}
