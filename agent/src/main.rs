//! `flightnode-agent`: the command line. Everything here is argument handling and printing; the
//! work happens in the library.

mod cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Signed A/B firmware upgrades with automatic rollback, for drones and other things that must not brick.
#[derive(Parser)]
#[command(name = "flightnode-agent", version, about, long_about = None)]
struct Cli {
    /// Agent configuration.
    #[arg(long, global = true, env = "FLIGHTNODE_CONFIG", default_value = flightnode_agent::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a release signing key pair: DIR/release.key (private, mode 0600) and DIR/release.pub.
    Keygen {
        /// Directory for the key pair (created if missing; existing keys are never overwritten).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Create or verify signed bundles.
    #[command(subcommand)]
    Bundle(cli::BundleCommand),
    /// Download (or read), verify, write, switch to and health-check a bundle; roll back on failure.
    ///
    /// Exits 0 only when the image is committed or was already installed. Re-running after an
    /// interruption resumes the download where it stopped.
    Install {
        /// Bundle file path or http(s):// URL.
        source: String,
        /// Allow installing a lower version (the security floor still applies).
        #[arg(long)]
        allow_downgrade: bool,
        /// Upgrade id to record (default: derived from SOURCE).
        #[arg(long)]
        upgrade_id: Option<String>,
    },
    /// Show slots, versions, the upgrade in flight and how the last one ended.
    Status {
        /// Machine-readable output (keys documented in proto/).
        #[arg(long)]
        json: bool,
    },
    /// Mark a slot good (commits a slot on trial), like `rauc status mark-good`.
    MarkGood {
        /// `booted` (default), `other`, `a` or `b`.
        #[arg(default_value = "booted")]
        slot: String,
    },
    /// Mark a slot bad (rolls back a slot on trial), like `rauc status mark-bad`.
    MarkBad {
        /// `booted` (default), `other`, `a` or `b`.
        #[arg(default_value = "booted")]
        slot: String,
    },
    /// Run the agent service: MQTT commands, hub heartbeats, the local control socket, systemd
    /// notifications. Finishes whatever was in flight first.
    Run,
    /// Finish whatever was in flight: resume a download, evaluate a trial boot, complete a rollback.
    /// Run it once after every boot (the daemon does this itself).
    Resume,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rustls with ring, for HTTPS downloads, MQTT over TLS and gRPC to the hub; no OpenSSL anywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::init_logging(cli.verbose, matches!(cli.command, Command::Run));
    let result = match cli.command {
        Command::Keygen { out_dir } => cli::keygen(&out_dir),
        Command::Bundle(cmd) => cli::bundle(cmd),
        Command::Install {
            source,
            allow_downgrade,
            upgrade_id,
        } => cli::install(&cli.config, source, allow_downgrade, upgrade_id),
        Command::Status { json } => cli::status(&cli.config, json),
        Command::MarkGood { slot } => cli::mark(&cli.config, &slot, true),
        Command::MarkBad { slot } => cli::mark(&cli.config, &slot, false),
        Command::Resume => cli::resume(&cli.config),
        Command::Run => cli::run(&cli.config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
