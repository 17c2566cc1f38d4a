//! TUF mode: bundles are targets of a TUF repository, and the agent verifies the repository's
//! metadata chain before the first byte of a bundle is downloaded.
//!
//! What is checked, in this order, each with its own [`ErrorCode`]:
//! - **root**: starting from the newest root this device trusts (the shipped `tuf.root`, or a
//!   newer one kept in the state directory), each next `N.root.json` must be signed by a
//!   threshold of the old *and* the new root's keys, and is kept as soon as it is verified
//!   (`root.rs`). This is how keys are rotated and revoked without touching a drone's config
//!   (`tuf_signature`, `tuf_rollback`).
//! - **timestamp → snapshot → targets**: each signed by a threshold of its role's keys in the
//!   root (`tuf_signature`), never older than the version already trusted (`tuf_rollback`, kept
//!   across restarts in `<state_dir>/tuf/`), and each file's version, length and hash exactly as
//!   the role above lists them (`tuf_mix_and_match`). tough enforces these.
//! - **expiry**: tough is loaded with [`ExpirationEnforcement::Unsafe`] because a drone's clock
//!   cannot be trusted blindly; every role's `expires` is compared here with the `now` the caller
//!   passes, from [`trusted_now`] (`tuf_expired`, a freeze attack).
//! - **the target**: the bundle's name is the last path segment of its URL; it must be listed in
//!   the verified targets metadata (`tuf_target_unknown`, before any bundle byte is fetched), and
//!   the bundle's length and sha256 must be the listed ones (`tuf_target_mismatch`, before the
//!   written slot may be activated).
//!
//! The bundle's own ed25519 manifest signature (`trusted_keys`) stays the inner check.

mod clock;
mod root;
mod transport;

pub use clock::trusted_now;
pub use transport::AgentTransport;

use chrono::{DateTime, Utc};
use flightnode_proto::ErrorCode;
use std::path::{Path, PathBuf};
use tough::schema::RoleType;
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};
use url::Url;

use crate::config::TufConfig;

/// Why TUF refused a bundle, or could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TufError {
    /// The shipped root (`tuf.root`) or the kept one cannot be read or is not a signed root.
    #[error("TUF root {}: {reason}; ship the repository's root.json there (see the TUF repository guide)", path.display())]
    Root {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The metadata directory in the state directory cannot be created or written.
    #[error("TUF metadata store {}: {reason}; check the state directory and its permissions", path.display())]
    Store {
        /// The directory or file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// `tuf.metadata_url` is not a URL a metadata file name can be joined to.
    #[error("tuf.metadata_url {url:?} is invalid: {reason}")]
    Url {
        /// The configured value.
        url: String,
        /// Why.
        reason: String,
    },
    /// A role's `expires` is not later than the trusted time.
    #[error(
        "TUF {role} metadata (version {version}) from {url} expired at {expires}, and the trusted time is {now}; refusing it (freeze attack, or the repository's {role} was not re-signed in time)"
    )]
    Expired {
        /// root, timestamp, snapshot or targets.
        role: String,
        /// Its version.
        version: u64,
        /// Its expiry.
        expires: DateTime<Utc>,
        /// The trusted time.
        now: DateTime<Utc>,
        /// The metadata URL.
        url: String,
    },
    /// tough itself reported an expired role (not with the enforcement the agent loads it with).
    #[error("TUF metadata from {url} expired: {detail}; refusing it (freeze attack)")]
    ExpiredReported {
        /// tough's message.
        detail: String,
        /// The metadata URL.
        url: String,
    },
    /// The repository offered an older version than the trusted one.
    #[error(
        "TUF {role} metadata from {url} is version {offered}, older than the trusted version {trusted}; refusing it (rollback attack, or a stale mirror)"
    )]
    Rollback {
        /// The role.
        role: String,
        /// Version this device trusts.
        trusted: u64,
        /// Version offered.
        offered: u64,
        /// The metadata URL.
        url: String,
    },
    /// Files that do not belong together.
    #[error(
        "TUF metadata from {url} does not match itself: {detail}; refusing it (mix-and-match attack, or a repository caught mid-update: retry)"
    )]
    MixAndMatch {
        /// What differs.
        detail: String,
        /// The metadata URL.
        url: String,
    },
    /// Not signed by a threshold of trusted keys, or not a valid metadata file.
    #[error(
        "TUF metadata from {url} is not trusted: {detail}; it must be signed by a threshold of the keys its role has in the root (a revoked key no longer counts)"
    )]
    Signature {
        /// What failed.
        detail: String,
        /// The metadata URL.
        url: String,
    },
    /// The metadata could not be fetched.
    #[error("cannot fetch TUF metadata from {url}: {detail}; check tuf.metadata_url and the network")]
    Fetch {
        /// What failed.
        detail: String,
        /// The metadata URL.
        url: String,
    },
    /// The bundle is not a target.
    #[error(
        "bundle {source_url}: target {name:?} is not listed in the verified TUF targets metadata (version {targets_version}); refusing it before downloading anything (add it with flightnode-release add)"
    )]
    TargetUnknown {
        /// Target name.
        name: String,
        /// The bundle URL or path.
        source_url: String,
        /// Version of the targets metadata looked in.
        targets_version: u64,
    },
    /// The bundle differs from its target entry.
    #[error(
        "bundle {source_url}: its {what} is {actual} but the TUF targets metadata says {expected} for target {name:?}; refusing it, nothing was activated"
    )]
    TargetMismatch {
        /// Target name.
        name: String,
        /// The bundle URL or path.
        source_url: String,
        /// `length` or `sha256`.
        what: &'static str,
        /// Listed value.
        expected: String,
        /// Value of the bundle.
        actual: String,
    },
    /// Anything else tough reported (a local failure).
    #[error("TUF verification failed: {detail}")]
    Other {
        /// tough's error.
        detail: String,
    },
}

impl TufError {
    /// The contract code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Expired { .. } | Self::ExpiredReported { .. } => ErrorCode::TufExpired,
            Self::Rollback { .. } => ErrorCode::TufRollback,
            Self::MixAndMatch { .. } => ErrorCode::TufMixAndMatch,
            Self::Signature { .. } => ErrorCode::TufSignature,
            Self::Fetch { .. } => ErrorCode::TufFetch,
            Self::TargetUnknown { .. } => ErrorCode::TufTargetUnknown,
            Self::TargetMismatch { .. } => ErrorCode::TufTargetMismatch,
            Self::Root { .. } | Self::Store { .. } | Self::Url { .. } | Self::Other { .. } => {
                ErrorCode::Internal
            }
        }
    }

    /// Maps a tough error to the check that failed. `url` is the metadata base URL.
    pub fn from_tough(e: &tough::error::Error, base: &Url) -> Self {
        use tough::error::Error as T;
        let url = base.to_string();
        let detail = flightnode_proto::error::chain(e);
        match e {
            T::OlderMetadata {
                role,
                current_version,
                new_version,
                ..
            } => Self::Rollback {
                role: role.to_string(),
                trusted: *current_version,
                offered: *new_version,
                url,
            },
            T::ExpiredMetadata { .. } => Self::ExpiredReported { detail, url },
            // A snapshot or targets file whose hash or version is not the one the role above
            // lists; a file longer than listed is cut at its listed length.
            T::HashMismatch { .. } | T::VersionMismatch { .. } | T::MetaMissing { .. } => {
                Self::MixAndMatch { detail, url }
            }
            T::MaxSizeExceeded { specifier, .. }
                if matches!(*specifier, "timestamp.json" | "snapshot.json") =>
            {
                Self::MixAndMatch { detail, url }
            }
            T::VerifyMetadata { .. }
            | T::VerifyRoleMetadata { .. }
            | T::VerifyTrustedMetadata { .. }
            | T::ParseMetadata { .. }
            | T::ParseTrustedMetadata { .. }
            | T::SpecVersion { .. } => Self::Signature { detail, url },
            // A stream check (a hash or a length listed by the role above) fails inside the
            // transport's stream: the cause is tough's own error.
            T::Transport { source, .. } => {
                match std::error::Error::source(source)
                    .and_then(|inner| inner.downcast_ref::<tough::error::Error>())
                {
                    Some(inner) => Self::from_tough(inner, base),
                    None => Self::Fetch { detail, url },
                }
            }
            T::MaxSizeExceeded { .. } | T::MaxUpdatesExceeded { .. } => Self::Fetch { detail, url },
            _ => Self::Other { detail },
        }
    }
}

/// A bundle's entry in the verified targets metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedTarget {
    /// Target name (the last path segment of the bundle URL).
    pub name: String,
    /// The bundle URL or path it was looked up for.
    pub source: String,
    /// Listed length in bytes.
    pub length: u64,
    /// Listed sha256.
    pub sha256: Vec<u8>,
}

impl TrustedTarget {
    /// Refuses a bundle of another length.
    pub fn check_length(&self, length: u64) -> Result<(), TufError> {
        if length == self.length {
            return Ok(());
        }
        Err(self.mismatch("length", self.length.to_string(), length.to_string()))
    }

    /// Refuses a bundle of another length or sha256.
    pub fn check(&self, length: u64, sha256: &[u8]) -> Result<(), TufError> {
        self.check_length(length)?;
        if sha256 == self.sha256.as_slice() {
            return Ok(());
        }
        Err(self.mismatch("sha256", hex::encode(&self.sha256), hex::encode(sha256)))
    }

    fn mismatch(&self, what: &'static str, expected: String, actual: String) -> TufError {
        TufError::TargetMismatch {
            name: self.name.clone(),
            source_url: self.source.clone(),
            what,
            expected,
            actual,
        }
    }
}

/// The target name of a bundle: the last path segment of its URL (or the file name of a path).
pub fn target_name(source: &str) -> &str {
    let path = source.split(['?', '#']).next().unwrap_or(source);
    path.rsplit('/').next().unwrap_or(path)
}

/// The device's TUF client: the configured repository, the shipped root, and the metadata it
/// trusts in `<state_dir>/tuf/`.
pub struct Tuf {
    shipped_root: PathBuf,
    metadata_url: Url,
    dir: PathBuf,
    transport: AgentTransport,
    rt: tokio::runtime::Handle,
}

/// Longest a metadata update (timestamp, snapshot, targets) or one root fetch may take: the
/// download's own stall detection does not reach tough's fetches, and a server that accepts and
/// then stalls must not hold the upgrade forever.
const METADATA_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(2);

/// File name of the newest trusted root in `<state_dir>/tuf/`.
const KEPT_ROOT: &str = "root.json";
/// tough's datastore (trusted timestamp, snapshot, targets) under `<state_dir>/tuf/`.
const DATASTORE: &str = "metadata";

impl Tuf {
    /// Checks the configuration (the shipped root must be a root signed by its own threshold)
    /// and prepares `<state_dir>/tuf/`.
    pub fn new(
        cfg: &TufConfig,
        state_dir: &Path,
        client: reqwest::Client,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, TufError> {
        let mut base = cfg.metadata_url.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        let metadata_url = Url::parse(&base).map_err(|e| TufError::Url {
            url: cfg.metadata_url.clone(),
            reason: e.to_string(),
        })?;
        let tuf = Self {
            shipped_root: cfg.root.clone(),
            metadata_url,
            dir: state_dir.join("tuf"),
            transport: AgentTransport::new(client),
            rt,
        };
        read_root(&tuf.shipped_root)?;
        std::fs::create_dir_all(tuf.dir.join(DATASTORE)).map_err(|e| TufError::Store {
            path: tuf.dir.join(DATASTORE),
            reason: e.to_string(),
        })?;
        Ok(tuf)
    }

    /// Verifies the repository's metadata chain at `now` and returns the target `source` names.
    /// Must not be called from inside the async runtime (it blocks on it).
    pub fn target(&self, source: &str, now: DateTime<Utc>) -> Result<TrustedTarget, TufError> {
        let name = target_name(source).to_owned();
        let repo = self.load(now)?;
        let targets = &repo.targets().signed;
        let unknown = || TufError::TargetUnknown {
            name: name.clone(),
            source_url: source.to_owned(),
            targets_version: targets.version.get(),
        };
        let target_name = TargetName::new(name.clone()).map_err(|_| unknown())?;
        let target = targets.targets.get(&target_name).ok_or_else(unknown)?;
        tracing::info!(target = %name, length = target.length, targets_version = targets.version.get(),
            snapshot_version = repo.snapshot().signed.version.get(),
            timestamp_version = repo.timestamp().signed.version.get(),
            root_version = repo.root().signed.version.get(), "TUF target verified");
        Ok(TrustedTarget {
            name,
            source: source.to_owned(),
            length: target.length,
            sha256: target.hashes.sha256.to_vec(),
        })
    }

    /// Loads and verifies the chain, checks every role's expiry at `now`, and keeps the newest
    /// root.
    fn load(&self, now: DateTime<Utc>) -> Result<tough::Repository, TufError> {
        let root_bytes = self.update_root()?;
        let loader = RepositoryLoader::new(&root_bytes, self.metadata_url.clone(), self.metadata_url.clone())
            .transport(self.transport.clone())
            .datastore(self.dir.join(DATASTORE))
            .expiration_enforcement(ExpirationEnforcement::Unsafe);
        let repo = self
            .rt
            .block_on(async { tokio::time::timeout(METADATA_TIMEOUT, loader.load()).await })
            .map_err(|_| self.timed_out())?
            .map_err(|e| TufError::from_tough(&e, &self.metadata_url))?;
        let expiries = [
            (
                RoleType::Root,
                repo.root().signed.version,
                repo.root().signed.expires,
            ),
            (
                RoleType::Timestamp,
                repo.timestamp().signed.version,
                repo.timestamp().signed.expires,
            ),
            (
                RoleType::Snapshot,
                repo.snapshot().signed.version,
                repo.snapshot().signed.expires,
            ),
            (
                RoleType::Targets,
                repo.targets().signed.version,
                repo.targets().signed.expires,
            ),
        ];
        for (role, version, expires) in expiries {
            if expires <= now {
                return Err(TufError::Expired {
                    role: role.to_string(),
                    version: version.get(),
                    expires,
                    now,
                    url: self.metadata_url.to_string(),
                });
            }
        }
        Ok(repo)
    }

    fn timed_out(&self) -> TufError {
        TufError::Fetch {
            detail: format!("no complete answer within {}s", METADATA_TIMEOUT.as_secs()),
            url: self.metadata_url.to_string(),
        }
    }

    /// The newest root this device trusts: the kept one when it is newer than the shipped one.
    /// A kept root that cannot be read stops TUF mode (`internal`) rather than falling back to
    /// the shipped root, which may still trust keys revoked since.
    fn trusted_root(&self) -> Result<Vec<u8>, TufError> {
        let (shipped_version, shipped) = read_root(&self.shipped_root)?;
        let kept_path = self.dir.join(KEPT_ROOT);
        if !kept_path.exists() {
            return Ok(shipped);
        }
        let (kept_version, kept) = read_root(&kept_path).map_err(|e| TufError::Store {
            path: kept_path.clone(),
            reason: format!(
                "{e}; remove it only if the shipped root ({}) is known to trust no revoked key",
                self.shipped_root.display()
            ),
        })?;
        Ok(if kept_version >= shipped_version {
            kept
        } else {
            shipped
        })
    }

    /// Keeps a verified root (its exact bytes) as the newest trusted one, durably: a restart
    /// or power cut never starts from an older root again.
    fn keep_root(&self, bytes: &[u8], version: u64) -> Result<(), TufError> {
        let path = self.dir.join(KEPT_ROOT);
        let store = |e: &dyn std::fmt::Display| TufError::Store {
            path: path.clone(),
            reason: e.to_string(),
        };
        let tmp = self.dir.join(format!("{KEPT_ROOT}.tmp"));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| store(&e))?;
        tracing::info!(path = %path.display(), version, "TUF root verified and kept");
        Ok(())
    }
}

/// Reads a root file: its version and bytes. The signatures are checked by tough on load.
fn read_root(path: &Path) -> Result<(u64, Vec<u8>), TufError> {
    let err = |reason: String| TufError::Root {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read it ({e})")))?;
    let root: tough::schema::Signed<tough::schema::Root> =
        serde_json::from_slice(&bytes).map_err(|e| err(format!("not a TUF root.json ({e})")))?;
    root.signed
        .verify_role(&root)
        .map_err(|e| err(format!("not signed by a threshold of its own root keys ({e})")))?;
    Ok((root.signed.version.get(), bytes))
}

#[cfg(test)]
mod tests;
