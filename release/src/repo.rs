//! The repository on disk and the operations that change it.
//!
//! ```text
//! DIR/root.json               the newest root (ship version 1 with the drones: [tuf] root)
//! DIR/metadata/N.root.json    every root version; each next one signed by the previous root keys
//! DIR/metadata/root.json      the newest root again
//! DIR/metadata/targets.json   the bundles (targets), signed by the targets keys
//! DIR/metadata/snapshot.json  the targets.json version, length and hash, signed by the snapshot keys
//! DIR/metadata/timestamp.json the snapshot.json version, length and hash, signed by the timestamp keys
//! DIR/targets/NAME            the bundles; serve them under the same name
//! ```
//!
//! Keys never live in the repository: each command is given the key files it signs with.

use crate::keys::{PemKey, key_id};
use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tough::editor::signed::SignedRole;
use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{
    Hashes, KeyHolder, Metafile, Role, RoleKeys, RoleType, Root, Signed, Snapshot, Target, Targets, Timestamp,
};

const SPEC_VERSION: &str = "1.0.0";
/// The four top-level roles, in the order they are listed.
pub const ROLES: [RoleType; 4] = [
    RoleType::Root,
    RoleType::Targets,
    RoleType::Snapshot,
    RoleType::Timestamp,
];

/// A repository directory.
pub struct Repo {
    dir: PathBuf,
}

/// The keys a command signs with, by role.
#[derive(Default)]
pub struct Signing {
    /// Root keys (offline).
    pub root: Vec<PemKey>,
    /// Targets keys.
    pub targets: Vec<PemKey>,
    /// Snapshot keys.
    pub snapshot: Vec<PemKey>,
    /// Timestamp keys.
    pub timestamp: Vec<PemKey>,
}

impl Signing {
    fn of(&self, role: RoleType) -> &[PemKey] {
        match role {
            RoleType::Root => &self.root,
            RoleType::Targets => &self.targets,
            RoleType::Snapshot => &self.snapshot,
            _ => &self.timestamp,
        }
    }

    fn sources(&self, role: RoleType) -> Vec<Box<dyn KeySource>> {
        self.of(role).iter().map(PemKey::source).collect()
    }
}

/// How long each role is valid from now.
pub struct Expiries {
    /// root.json.
    pub root: Duration,
    /// targets.json.
    pub targets: Duration,
    /// snapshot.json.
    pub snapshot: Duration,
    /// timestamp.json.
    pub timestamp: Duration,
}

fn from_now(d: Duration) -> Result<DateTime<Utc>> {
    let d = chrono::Duration::from_std(d).context("expiry too far in the future")?;
    Ok(Utc::now() + d)
}

fn next(v: NonZeroU64) -> NonZeroU64 {
    v.saturating_add(1)
}

/// A key to remove or replace: a key file, or a key id (hex) as `keygen` printed it.
pub enum KeyRef {
    /// A PEM key file.
    File(PemKey),
    /// A TUF key id.
    Id(String),
}

impl KeyRef {
    /// A path to an existing file is a key file; anything else is a key id.
    pub fn parse(s: &str) -> Self {
        if Path::new(s).is_file() {
            Self::File(PemKey::new(Path::new(s)))
        } else {
            Self::Id(s.to_ascii_lowercase())
        }
    }

    fn id(&self) -> Result<String> {
        match self {
            Self::File(k) => key_id(&k.tuf_key()?),
            Self::Id(id) => Ok(id.clone()),
        }
    }
}

impl Repo {
    /// The repository in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    fn metadata(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    fn read<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "{}: cannot read (is {} a repository made by init?)",
                path.display(),
                self.dir.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not TUF metadata", path.display()))
    }

    /// The newest root.
    pub fn root(&self) -> Result<Signed<Root>> {
        self.read(&self.dir.join("root.json"))
    }

    fn write(path: &Path, bytes: &[u8]) -> Result<()> {
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// A new repository: root version 1 with `keys` (and thresholds) for each role, and empty
    /// targets, snapshot and timestamp, all signed.
    pub async fn init(
        &self,
        keys: &Signing,
        thresholds: &HashMap<RoleType, u64>,
        exp: &Expiries,
    ) -> Result<()> {
        if self.dir.join("root.json").exists() {
            bail!(
                "{}: already holds a repository (root.json); refusing to overwrite it",
                self.dir.display()
            );
        }
        let mut root = Root {
            spec_version: SPEC_VERSION.into(),
            consistent_snapshot: false,
            version: NonZeroU64::MIN,
            expires: from_now(exp.root)?,
            keys: HashMap::new(),
            roles: HashMap::new(),
            _extra: HashMap::new(),
        };
        for role in ROLES {
            let list = keys.of(role);
            let threshold = thresholds.get(&role).copied().unwrap_or(1);
            if list.is_empty() {
                bail!("no --{role}-key given: every role needs at least one key");
            }
            if threshold == 0 || threshold > list.len() as u64 {
                bail!("--{role}-threshold {threshold} needs 1 to {} keys", list.len());
            }
            let mut ids = Vec::new();
            for k in list {
                let key = k.tuf_key()?;
                let id: Decoded<Hex> = key.key_id().context("cannot compute a key id")?;
                root.keys.insert(id.clone(), key);
                ids.push(id);
            }
            root.roles.insert(
                role,
                RoleKeys {
                    keyids: ids,
                    threshold: NonZeroU64::new(threshold).unwrap_or(NonZeroU64::MIN),
                    _extra: HashMap::new(),
                },
            );
        }
        self.write_root(root, None, keys).await?;
        let targets = Targets::new(SPEC_VERSION.into(), NonZeroU64::MIN, from_now(exp.targets)?);
        self.publish(targets, keys, exp).await
    }

    /// Signs `root` (its version is the next one) with the root keys given, checks it verifies
    /// with its own root keys and, after version 1, with the previous root's, and writes it.
    async fn write_root(&self, root: Root, previous: Option<&Signed<Root>>, keys: &Signing) -> Result<()> {
        let rng = ring::rand::SystemRandom::new();
        let sources = keys.sources(RoleType::Root);
        let mut signed = SignedRole::new(root.clone(), &KeyHolder::Root(root.clone()), &sources, &rng)
            .await
            .context("cannot sign root.json with the --root-key files given")?;
        if let Some(old) = previous {
            // The old root keys' threshold makes the new root trusted by the drones that have the
            // old one; with a rotated root key both sets sign.
            if let Ok(by_old) =
                SignedRole::new(root.clone(), &KeyHolder::Root(old.signed.clone()), &sources, &rng).await
            {
                signed = signed.add_old_signatures(by_old.signed().signatures.clone())?;
            }
            old.signed.verify_role(signed.signed()).with_context(|| {
                format!(
                    "root version {} is not signed by a threshold ({}) of the root keys of version {}: pass more --root-key files",
                    root.version,
                    old.signed.roles.get(&RoleType::Root).map_or(0, |r| r.threshold.get()),
                    old.signed.version
                )
            })?;
        }
        root.verify_role(signed.signed()).with_context(|| {
            format!(
                "root version {} is not signed by a threshold of its own root keys: pass more --root-key files",
                root.version
            )
        })?;
        let bytes = signed.buffer();
        Self::write(
            &self.metadata().join(format!("{}.root.json", root.version)),
            bytes,
        )?;
        Self::write(&self.metadata().join("root.json"), bytes)?;
        Self::write(&self.dir.join("root.json"), bytes)
    }

    /// Signs `targets` (next version), a snapshot listing it and a timestamp listing that, and
    /// writes them, timestamp last.
    async fn publish(&self, mut targets: Targets, keys: &Signing, exp: &Expiries) -> Result<()> {
        let root = self.root()?.signed;
        let holder = KeyHolder::Root(root.clone());
        let rng = ring::rand::SystemRandom::new();
        let old_targets: Option<Signed<Targets>> = self.read(&self.metadata().join("targets.json")).ok();
        targets.version = old_targets.map_or(NonZeroU64::MIN, |t| next(t.signed.version));
        targets.expires = from_now(exp.targets)?;
        let signed_targets = SignedRole::new(targets, &holder, &keys.sources(RoleType::Targets), &rng)
            .await
            .context("cannot sign targets.json: pass --targets-key files listed for targets in root.json (enough for its threshold)")?;
        let old_snapshot: Option<Signed<Snapshot>> = self.read(&self.metadata().join("snapshot.json")).ok();
        let mut snapshot = Snapshot::new(
            SPEC_VERSION.into(),
            old_snapshot.map_or(NonZeroU64::MIN, |s| next(s.signed.version)),
            from_now(exp.snapshot)?,
        );
        snapshot.meta.insert(
            "targets.json".into(),
            metafile(&signed_targets, signed_targets.signed().signed.version),
        );
        let signed_snapshot = SignedRole::new(snapshot, &holder, &keys.sources(RoleType::Snapshot), &rng)
            .await
            .context(
                "cannot sign snapshot.json: pass --snapshot-key files listed for snapshot in root.json",
            )?;
        let signed_timestamp = self
            .sign_timestamp(&root, &signed_snapshot, keys, exp.timestamp)
            .await?;
        Self::write(&self.metadata().join("targets.json"), signed_targets.buffer())?;
        Self::write(&self.metadata().join("snapshot.json"), signed_snapshot.buffer())?;
        Self::write(&self.metadata().join("timestamp.json"), signed_timestamp.buffer())
    }

    async fn sign_timestamp(
        &self,
        root: &Root,
        snapshot: &SignedRole<Snapshot>,
        keys: &Signing,
        expires: Duration,
    ) -> Result<SignedRole<Timestamp>> {
        let old: Option<Signed<Timestamp>> = self.read(&self.metadata().join("timestamp.json")).ok();
        let mut timestamp = Timestamp::new(
            SPEC_VERSION.into(),
            old.map_or(NonZeroU64::MIN, |t| next(t.signed.version)),
            from_now(expires)?,
        );
        timestamp.meta.insert(
            "snapshot.json".into(),
            metafile(snapshot, snapshot.signed().signed.version),
        );
        SignedRole::new(
            timestamp,
            &KeyHolder::Root(root.clone()),
            &keys.sources(RoleType::Timestamp),
            &ring::rand::SystemRandom::new(),
        )
        .await
        .context("cannot sign timestamp.json: pass --timestamp-key files listed for timestamp in root.json")
    }

    /// Adds `bundle` as target `name` (copied to `targets/NAME`) and re-signs.
    pub async fn add(&self, bundle: &Path, name: &str, keys: &Signing, exp: &Expiries) -> Result<()> {
        let target_name =
            tough::TargetName::new(name).with_context(|| format!("{name:?} is not a valid target name"))?;
        if name.contains('/') {
            bail!(
                "target name {name:?} must be one path segment: the agent looks a bundle up by the last segment of its URL"
            );
        }
        let target = Target::from_path(bundle)
            .await
            .with_context(|| format!("{}: cannot read the bundle", bundle.display()))?;
        let mut targets: Signed<Targets> = self.read(&self.metadata().join("targets.json"))?;
        targets.signed.targets.insert(target_name, target);
        let dest = self.dir.join("targets").join(name);
        std::fs::create_dir_all(self.dir.join("targets"))
            .and_then(|()| std::fs::copy(bundle, &dest).map(|_| ()))
            .with_context(|| format!("cannot copy {} to {}", bundle.display(), dest.display()))?;
        self.publish(targets.signed, keys, exp).await
    }

    /// A new timestamp (next version, new expiry) for the current snapshot.
    pub async fn timestamp(&self, keys: &Signing, expires: Duration) -> Result<()> {
        let root = self.root()?.signed;
        let path = self.metadata().join("snapshot.json");
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let snapshot: Signed<Snapshot> = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not TUF metadata", path.display()))?;
        let meta = Metafile {
            length: Some(bytes.len() as u64),
            hashes: Some(Hashes {
                sha256: ring::digest::digest(&ring::digest::SHA256, &bytes)
                    .as_ref()
                    .to_vec()
                    .into(),
                _extra: HashMap::new(),
            }),
            version: snapshot.signed.version,
            _extra: HashMap::new(),
        };
        let old: Option<Signed<Timestamp>> = self.read(&self.metadata().join("timestamp.json")).ok();
        let mut timestamp = Timestamp::new(
            SPEC_VERSION.into(),
            old.map_or(NonZeroU64::MIN, |t| next(t.signed.version)),
            from_now(expires)?,
        );
        timestamp.meta.insert("snapshot.json".into(), meta);
        let signed = SignedRole::new(
            timestamp,
            &KeyHolder::Root(root),
            &keys.sources(RoleType::Timestamp),
            &ring::rand::SystemRandom::new(),
        )
        .await
        .context(
            "cannot sign timestamp.json: pass --timestamp-key files listed for timestamp in root.json",
        )?;
        Self::write(&self.metadata().join("timestamp.json"), signed.buffer())
    }

    /// A new root version where `role` lists `add` instead of `remove` (either may be absent),
    /// signed by the root keys given; then, unless the role is root, targets, snapshot and
    /// timestamp re-signed with the keys of the new root.
    pub async fn change_keys(
        &self,
        role: RoleType,
        remove: Option<&KeyRef>,
        add: Option<&PemKey>,
        keys: &Signing,
        exp: &Expiries,
    ) -> Result<()> {
        let old = self.root()?;
        let mut root = old.signed.clone();
        root.version = next(root.version);
        root.expires = from_now(exp.root)?;
        let entry = root
            .roles
            .get_mut(&role)
            .with_context(|| format!("root.json lists no {role} role"))?;
        if let Some(remove) = remove {
            let id = remove.id()?;
            let before = entry.keyids.len();
            entry.keyids.retain(|k| hex::encode(k.as_ref() as &[u8]) != id);
            if entry.keyids.len() == before {
                bail!(
                    "key {id} is not a {role} key in root.json version {}",
                    old.signed.version
                );
            }
        }
        if let Some(add) = add {
            let key = add.tuf_key()?;
            let id: Decoded<Hex> = key.key_id().context("cannot compute a key id")?;
            if entry.keyids.contains(&id) {
                bail!(
                    "key {} is already a {role} key",
                    hex::encode(id.as_ref() as &[u8])
                );
            }
            entry.keyids.push(id.clone());
            root.keys.insert(id, key);
        }
        let entry = &root.roles[&role];
        if (entry.keyids.len() as u64) < entry.threshold.get() {
            bail!(
                "the {role} role would keep {} key(s) for a threshold of {}: give a replacement key",
                entry.keyids.len(),
                entry.threshold
            );
        }
        // Keys no role lists any more leave root.json.
        let used: Vec<Decoded<Hex>> = root.roles.values().flat_map(|r| r.keyids.clone()).collect();
        root.keys.retain(|id, _| used.contains(id));
        self.write_root(root, Some(&old), keys).await?;
        if role != RoleType::Root {
            let targets: Signed<Targets> = self.read(&self.metadata().join("targets.json"))?;
            self.publish(targets.signed, keys, exp).await?;
        }
        Ok(())
    }
}

fn metafile<T: Role + serde::Serialize>(role: &SignedRole<T>, version: NonZeroU64) -> Metafile {
    Metafile {
        length: Some(*role.length()),
        hashes: Some(Hashes {
            sha256: role.sha256().to_vec().into(),
            _extra: HashMap::new(),
        }),
        version,
        _extra: HashMap::new(),
    }
}
