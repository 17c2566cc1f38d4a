//! ed25519 signing keys in PKCS#8 PEM files, as tough's [`KeySource`].
//!
//! tough's own `LocalKeySource` reads ed25519 keys as DER only, and only PKCS#8 v2; these are
//! PEM (`-----BEGIN PRIVATE KEY-----`), v1 (as `openssl genpkey -algorithm ed25519` writes) or v2
//! (as `flightnode-release keygen` writes).

use anyhow::{Context, Result, bail};
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tough::async_trait;
use tough::key_source::KeySource;
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key};
use tough::sign::Sign;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A PEM key file given on the command line.
#[derive(Debug, Clone)]
pub struct PemKey {
    path: PathBuf,
}

impl PemKey {
    /// The key in `path` (read when it is used).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// Loads the key pair.
    pub fn load(&self) -> Result<Ed25519KeyPair> {
        let text = std::fs::read(&self.path)
            .with_context(|| format!("{}: cannot read key file", self.path.display()))?;
        let pem = pem::parse(&text).with_context(|| {
            format!(
                "{}: not a PEM file (expected -----BEGIN PRIVATE KEY-----)",
                self.path.display()
            )
        })?;
        if pem.tag() != "PRIVATE KEY" {
            bail!(
                "{}: PEM block is {:?}, expected an ed25519 \"PRIVATE KEY\" (PKCS#8)",
                self.path.display(),
                pem.tag()
            );
        }
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents()).map_err(|e| {
            anyhow::anyhow!(
                "{}: not an ed25519 PKCS#8 key ({e}); make one with flightnode-release keygen",
                self.path.display()
            )
        })
    }

    /// The key as TUF lists it in root.json.
    pub fn tuf_key(&self) -> Result<Key> {
        Ok(tuf_key(&self.load()?))
    }

    /// As tough's key source.
    pub fn source(&self) -> Box<dyn KeySource> {
        Box::new(self.clone())
    }
}

fn tuf_key(pair: &Ed25519KeyPair) -> Key {
    Key::Ed25519 {
        keyval: Ed25519Key {
            public: pair.public_key().as_ref().to_vec().into(),
            _extra: HashMap::new(),
        },
        scheme: Ed25519Scheme::Ed25519,
        _extra: HashMap::new(),
    }
}

struct Signer(Ed25519KeyPair);

#[async_trait]
impl Sign for Signer {
    fn tuf_key(&self) -> Key {
        tuf_key(&self.0)
    }

    async fn sign(&self, msg: &[u8], _rng: &(dyn SecureRandom + Sync)) -> Result<Vec<u8>, BoxError> {
        Ok(self.0.sign(msg).as_ref().to_vec())
    }
}

#[async_trait]
impl KeySource for PemKey {
    async fn as_sign(&self) -> Result<Box<dyn Sign>, BoxError> {
        let pair = self.load().map_err(|e| -> BoxError { format!("{e:#}").into() })?;
        Ok(Box::new(Signer(pair)))
    }

    async fn write(&self, _value: &str, _key_id_hex: &str) -> Result<(), BoxError> {
        Err(format!(
            "{}: flightnode-release never overwrites a key file",
            self.path.display()
        )
        .into())
    }
}

/// Writes a new ed25519 key (PKCS#8 v2 PEM, mode 0600) to `path`; refuses to overwrite one.
/// Returns its TUF key id.
pub fn keygen(path: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let der =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("cannot generate a key: {e}"))?;
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot create key file (it must not exist yet)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}: cannot write key file", path.display()))?;
    key_id(&PemKey::new(path).tuf_key()?)
}

/// The TUF key id (hex) of a key.
pub fn key_id(key: &Key) -> Result<String> {
    Ok(hex::encode(
        key.key_id().context("cannot compute a key id")?.as_ref() as &[u8],
    ))
}
