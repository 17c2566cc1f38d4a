//! The root update (TUF 5.3), done here rather than inside tough's load so that every root
//! version verified is kept at once, before anything after it is checked. tough keeps nothing
//! of a load that fails later: a drone that verified root N+1 (a revocation) and then refused
//! the targets it found would start from root N again next time, and an attacker who stops
//! serving `N+1.root.json` would have the revoked key trusted again.

use super::{Tuf, TufError};
use futures_util::StreamExt;
use tough::schema::{RoleType, Root, Signed};
use tough::{Transport, TransportErrorKind};

/// Largest root.json accepted.
const MAX_ROOT_BYTES: usize = 1024 * 1024;
/// Most root versions walked in one update.
const MAX_ROOT_UPDATES: u64 = 1024;

impl Tuf {
    /// Walks from the newest trusted root to the newest the repository has, each next version
    /// signed by a threshold of the previous root's keys and of its own, keeping each one.
    /// Returns the bytes of the newest.
    pub(super) fn update_root(&self) -> Result<Vec<u8>, TufError> {
        let mut bytes = self.trusted_root()?;
        let start = parse(&bytes, self.metadata_url.as_ref())?;
        let mut root = start.clone();
        for _ in 0..MAX_ROOT_UPDATES {
            let next = root.signed.version.get() + 1;
            let Some(new_bytes) = self.fetch_root(next)? else {
                break;
            };
            let url = self.root_url(next)?.to_string();
            let new = parse(&new_bytes, &url)?;
            let signature = |e: &dyn std::fmt::Display, by: &str| TufError::Signature {
                detail: format!(
                    "root version {next} ({url}) is not signed by a threshold of {by} root keys: {e}"
                ),
                url: url.clone(),
            };
            root.signed
                .verify_role(&new)
                .map_err(|e| signature(&e, &format!("the version {} (trusted)", root.signed.version)))?;
            new.signed
                .verify_role(&new)
                .map_err(|e| signature(&e, "its own"))?;
            let version = new.signed.version.get();
            if version < next {
                return Err(TufError::Rollback {
                    role: RoleType::Root.to_string(),
                    trusted: root.signed.version.get(),
                    offered: version,
                    url,
                });
            }
            if version != next {
                return Err(TufError::MixAndMatch {
                    detail: format!("{url} holds root version {version}"),
                    url: self.metadata_url.to_string(),
                });
            }
            self.keep_root(&new_bytes, version)?;
            root = new;
            bytes = new_bytes;
        }
        // TUF 5.3.11: new timestamp or snapshot keys drop the versions trusted under the old
        // ones, so that versions an attacker pushed ahead with a stolen key do not lock drones out.
        if !same_keys(&start, &root, RoleType::Timestamp) || !same_keys(&start, &root, RoleType::Snapshot) {
            for file in ["timestamp.json", "snapshot.json"] {
                let path = self.dir.join(super::DATASTORE).join(file);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(TufError::Store {
                            path,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            tracing::info!(
                root_version = root.signed.version.get(),
                "TUF timestamp or snapshot keys changed: their trusted versions are dropped"
            );
        }
        Ok(bytes)
    }

    fn root_url(&self, version: u64) -> Result<url::Url, TufError> {
        let path = format!("{version}.root.json");
        self.metadata_url.join(&path).map_err(|e| TufError::Url {
            url: self.metadata_url.to_string(),
            reason: format!("cannot join {path}: {e}"),
        })
    }

    /// `N.root.json`, or `None` when the repository has no such version.
    fn fetch_root(&self, version: u64) -> Result<Option<Vec<u8>>, TufError> {
        let url = self.root_url(version)?;
        let fetch_err = |detail: String| TufError::Fetch {
            detail,
            url: url.to_string(),
        };
        let fetch = async {
            let mut stream = match self.transport.fetch(url.clone()).await {
                Ok(s) => s,
                Err(e) if e.kind() == TransportErrorKind::FileNotFound => return Ok(None),
                Err(e) => return Err(fetch_err(flightnode_proto::error::chain(&e))),
            };
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) if e.kind() == TransportErrorKind::FileNotFound => return Ok(None),
                    Err(e) => return Err(fetch_err(flightnode_proto::error::chain(&e))),
                };
                out.extend_from_slice(&chunk);
                if out.len() > MAX_ROOT_BYTES {
                    return Err(fetch_err(format!("larger than {MAX_ROOT_BYTES} bytes")));
                }
            }
            Ok(Some(out))
        };
        self.rt
            .block_on(async { tokio::time::timeout(super::METADATA_TIMEOUT, fetch).await })
            .map_err(|_| self.timed_out())?
    }
}

fn parse(bytes: &[u8], url: &str) -> Result<Signed<Root>, TufError> {
    serde_json::from_slice(bytes).map_err(|e| TufError::Signature {
        detail: format!("{url} is not a TUF root: {e}"),
        url: url.to_owned(),
    })
}

fn same_keys(a: &Signed<Root>, b: &Signed<Root>, role: RoleType) -> bool {
    a.signed.keys(role).eq(b.signed.keys(role))
}
