//! flightnode-release: the release engineer's tool for the TUF repository of bundles.
//!
//! A repository holds the bundles as TUF targets and the four signed roles drones verify before
//! downloading one (see `docs/src/operator/tuf.md`). Every command that changes metadata is given
//! the key files it signs with; keys never live in the repository.

mod keys;
mod repo;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keys::PemKey;
use repo::{Expiries, KeyRef, Repo, Signing};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tough::schema::RoleType;

/// Maintain the TUF repository of flightnode bundles: make it, add bundles, refresh the
/// timestamp, rotate and revoke keys.
#[derive(Parser)]
#[command(name = "flightnode-release", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 signing key (PKCS#8 PEM, mode 0600) and print its TUF key id.
    Keygen {
        /// Key file to create; never overwritten.
        out: PathBuf,
    },
    /// Make a new repository: root version 1 listing the keys and thresholds of each role, and
    /// empty targets, snapshot and timestamp. Ship DIR/root.json with the drones ([tuf] root).
    Init {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
        /// Signatures root needs.
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        /// Signatures targets needs.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        /// Signatures snapshot needs.
        #[arg(long, default_value_t = 1)]
        snapshot_threshold: u64,
        /// Signatures timestamp needs.
        #[arg(long, default_value_t = 1)]
        timestamp_threshold: u64,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
    /// Add a bundle as a target (copied to DIR/targets/NAME), then sign new targets, snapshot
    /// and timestamp versions. Needs the targets, snapshot and timestamp keys.
    Add {
        #[command(flatten)]
        repo: RepoArg,
        /// The bundle (made with flightnode-agent bundle create).
        bundle: PathBuf,
        /// Target name; drones look a bundle up by the last segment of its URL, so serve it under
        /// this name. Default: the bundle's file name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
    /// Sign a new timestamp for the current snapshot: run it more often than the timestamp
    /// expiry, or drones refuse the repository (tuf_expired). Needs the timestamp key only.
    Timestamp {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
        /// How long the new timestamp is valid.
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        timestamp_expires: Duration,
    },
    /// Sign a new root version with the same keys and a new expiry (--root-expires): do it on
    /// the offline machine well before root.json expires, or drones refuse the repository.
    RenewRoot {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
    /// Replace a key of a role (planned rotation): a new root version, signed by a threshold of
    /// the current root keys (and of the new ones when the root key is rotated), then targets,
    /// snapshot and timestamp re-signed. Drones follow without a config change.
    Rotate {
        #[command(flatten)]
        repo: RepoArg,
        /// The role whose key changes.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The key leaving the role: its key file or its key id.
        #[arg(long)]
        old: String,
        /// The key file taking its place.
        #[arg(long)]
        new: PathBuf,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
    /// Remove a key from a role (a leaked or lost key): a new root version without it, signed
    /// by a threshold of the current root keys, then targets, snapshot and timestamp re-signed
    /// by the remaining keys. Metadata signed by the revoked key alone is refused from then on.
    Revoke {
        #[command(flatten)]
        repo: RepoArg,
        /// The role the key leaves.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The revoked key: its key file or its key id.
        #[arg(long)]
        key: String,
        /// A key file to list in its place (needed when fewer keys than the threshold remain).
        #[arg(long)]
        replace_with: Option<PathBuf>,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        expiries: ExpiryArgs,
    },
}

#[derive(Args)]
struct RepoArg {
    /// The repository directory.
    #[arg(long)]
    repo: PathBuf,
}

/// The key files a command signs with (repeat a flag for several keys).
#[derive(Args)]
struct KeyArgs {
    /// Root key file (keep root keys offline).
    #[arg(long = "root-key")]
    root: Vec<PathBuf>,
    /// Targets key file.
    #[arg(long = "targets-key")]
    targets: Vec<PathBuf>,
    /// Snapshot key file.
    #[arg(long = "snapshot-key")]
    snapshot: Vec<PathBuf>,
    /// Timestamp key file.
    #[arg(long = "timestamp-key")]
    timestamp: Vec<PathBuf>,
}

impl KeyArgs {
    fn signing(&self) -> Signing {
        let load = |v: &Vec<PathBuf>| v.iter().map(|p| PemKey::new(p)).collect();
        Signing {
            root: load(&self.root),
            targets: load(&self.targets),
            snapshot: load(&self.snapshot),
            timestamp: load(&self.timestamp),
        }
    }
}

/// How long newly signed metadata stays valid (humantime: 365d, 12h).
#[derive(Args)]
#[allow(
    clippy::struct_field_names,
    reason = "the fields are the command-line flags --ROLE-expires"
)]
struct ExpiryArgs {
    /// Root validity.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    root_expires: Duration,
    /// Targets validity.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    targets_expires: Duration,
    /// Snapshot validity.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    snapshot_expires: Duration,
    /// Timestamp validity.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    timestamp_expires: Duration,
}

impl ExpiryArgs {
    fn expiries(&self) -> Expiries {
        Expiries {
            root: self.root_expires,
            targets: self.targets_expires,
            snapshot: self.snapshot_expires,
            timestamp: self.timestamp_expires,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Root,
    Targets,
    Snapshot,
    Timestamp,
}

impl From<RoleArg> for RoleType {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Root => RoleType::Root,
            RoleArg::Targets => RoleType::Targets,
            RoleArg::Snapshot => RoleType::Snapshot,
            RoleArg::Timestamp => RoleType::Timestamp,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Keygen { out } => {
            let id = keys::keygen(&out)?;
            println!("{id}");
        }
        Command::Init {
            repo,
            keys,
            root_threshold,
            targets_threshold,
            snapshot_threshold,
            timestamp_threshold,
            expiries,
        } => {
            let thresholds = HashMap::from([
                (RoleType::Root, root_threshold),
                (RoleType::Targets, targets_threshold),
                (RoleType::Snapshot, snapshot_threshold),
                (RoleType::Timestamp, timestamp_threshold),
            ]);
            Repo::new(&repo.repo)
                .init(&keys.signing(), &thresholds, &expiries.expiries())
                .await?;
            println!(
                "repository made in {}; ship {} with the drones",
                repo.repo.display(),
                repo.repo.join("root.json").display()
            );
        }
        Command::Add {
            repo,
            bundle,
            name,
            keys,
            expiries,
        } => {
            let name = match name {
                Some(n) => n,
                None => bundle
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("the bundle path has no file name; pass --name")?
                    .to_owned(),
            };
            Repo::new(&repo.repo)
                .add(&bundle, &name, &keys.signing(), &expiries.expiries())
                .await?;
            println!("target {name} added");
        }
        Command::Timestamp {
            repo,
            keys,
            timestamp_expires,
        } => {
            Repo::new(&repo.repo)
                .timestamp(&keys.signing(), timestamp_expires)
                .await?;
            println!("timestamp re-signed");
        }
        Command::RenewRoot { repo, keys, expiries } => {
            Repo::new(&repo.repo)
                .change_keys(RoleType::Root, None, None, &keys.signing(), &expiries.expiries())
                .await?;
            println!("root re-signed");
        }
        Command::Rotate {
            repo,
            role,
            old,
            new,
            keys,
            expiries,
        } => {
            Repo::new(&repo.repo)
                .change_keys(
                    role.into(),
                    Some(&KeyRef::parse(&old)),
                    Some(&PemKey::new(&new)),
                    &keys.signing(),
                    &expiries.expiries(),
                )
                .await?;
            println!("{} key rotated", RoleType::from(role));
        }
        Command::Revoke {
            repo,
            role,
            key,
            replace_with,
            keys,
            expiries,
        } => {
            Repo::new(&repo.repo)
                .change_keys(
                    role.into(),
                    Some(&KeyRef::parse(&key)),
                    replace_with.as_deref().map(PemKey::new).as_ref(),
                    &keys.signing(),
                    &expiries.expiries(),
                )
                .await?;
            println!("{} key {key} revoked", RoleType::from(role));
        }
    }
    Ok(())
}
