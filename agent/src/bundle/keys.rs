//! Release keys: generation, PEM loading, and the set of keys a device trusts.
//!
//! Keys are standard PEM (PKCS#8 private, SPKI public) so `openssl pkey -in release.key -text`
//! can inspect them and other tools can produce them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::TryRngCore;

use super::{BundleError, key_id};

/// File name of the private key written by [`keygen`].
pub const PRIVATE_KEY_FILE: &str = "release.key";
/// File name of the public key written by [`keygen`].
pub const PUBLIC_KEY_FILE: &str = "release.pub";

/// A key file is a few hundred bytes; anything much larger is the wrong file and is not slurped.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Where [`keygen`] put the key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPaths {
    /// `DIR/release.key`: PKCS#8 PEM, mode 0600. Keep it off devices.
    pub private: PathBuf,
    /// `DIR/release.pub`: SPKI PEM. Goes into the devices' `trusted_keys`.
    pub public: PathBuf,
}

/// Generates a release key pair in `out_dir` (created if missing).
///
/// Refuses to overwrite either file: losing a release key strands every device that trusts it.
/// The private key file is created with mode 0600 in the same `open` call (`O_EXCL`), so it is
/// never readable by others, not even briefly, and a planted symlink is not followed.
pub fn keygen(out_dir: &Path) -> Result<KeyPaths, BundleError> {
    let paths = KeyPaths {
        private: out_dir.join(PRIVATE_KEY_FILE),
        public: out_dir.join(PUBLIC_KEY_FILE),
    };
    for path in [&paths.private, &paths.public] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(BundleError::KeyExists { path: path.clone() });
        }
    }
    fs::create_dir_all(out_dir).map_err(|source| BundleError::KeyWrite {
        path: out_dir.to_path_buf(),
        source,
    })?;

    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| BundleError::KeyWrite {
            path: paths.private.clone(),
            source: std::io::Error::other(format!("operating system random source failed: {e}")),
        })?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);

    let encode_err = |path: &Path, e: String| BundleError::KeyWrite {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| encode_err(&paths.private, e.to_string()))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| encode_err(&paths.public, e.to_string()))?;

    write_new(&paths.private, private_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&paths.public, public_pem.as_bytes(), 0o644) {
        // Leave no half pair behind, so a retry is not refused by the private key alone.
        let _ = fs::remove_file(&paths.private);
        return Err(e);
    }
    if let Ok(dir) = File::open(out_dir) {
        let _ = dir.sync_all();
    }
    tracing::info!(key_id = %key_id(&key.verifying_key()), private = %paths.private.display(), "release key generated");
    Ok(paths)
}

/// Creates `path` exclusively with `mode` and writes `data` durably.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), BundleError> {
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(data)?;
        file.sync_all()
    };
    write().map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            BundleError::KeyExists {
                path: path.to_path_buf(),
            }
        } else {
            BundleError::KeyWrite {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Reads a (small) key file as text.
fn read_key_file(path: &Path) -> Result<(File, String), BundleError> {
    let read_err = |source| BundleError::KeyRead {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut text = String::new();
    (&file)
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    Ok((file, text))
}

/// Loads a PKCS#8 PEM ed25519 private key (as written by [`keygen`]).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, BundleError> {
    let (file, text) = read_key_file(path)?;
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "release private key is readable by group or others; chmod 600 it");
    }
    SigningKey::from_pkcs8_pem(&text).map_err(|e| BundleError::KeyParse {
        path: path.to_path_buf(),
        kind: "PKCS#8 PEM ed25519 private key",
        reason: e.to_string(),
    })
}

/// Loads an SPKI PEM ed25519 public key (as written by [`keygen`]). Weak (small-order) keys are
/// refused: anyone could forge signatures for them.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let (_, text) = read_key_file(path)?;
    let parse_err = |reason: String| BundleError::KeyParse {
        path: path.to_path_buf(),
        kind: "SPKI PEM ed25519 public key",
        reason,
    };
    let key = VerifyingKey::from_public_key_pem(&text).map_err(|e| parse_err(e.to_string()))?;
    if key.is_weak() {
        return Err(parse_err("the key is a weak (small-order) point".into()));
    }
    Ok(key)
}

/// The public keys a device accepts bundles from, indexed by [`key_id`].
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    /// Loads every listed public key. An empty list is an error: such a device would refuse all
    /// bundles, which is a configuration mistake better reported at startup.
    pub fn load(paths: &[PathBuf]) -> Result<Self, BundleError> {
        if paths.is_empty() {
            return Err(BundleError::NoTrustedKeys);
        }
        let keys = paths
            .iter()
            .map(|p| load_verifying_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(keys))
    }

    /// Trusts exactly `keys` (duplicates are harmless).
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    /// The trusted keys whose id is `id`. Normally one; a (practically impossible) id collision
    /// between two trusted keys yields both, and a signature is accepted if either verifies.
    pub fn with_id<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a VerifyingKey> + 'a {
        self.keys.iter().filter(move |(k, _)| k == id).map(|(_, k)| k)
    }

    /// Ids of all trusted keys, for messages and status.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted (only possible through [`TrustedKeys::new`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_private_0600_refuses_overwrite_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys/nested");
        let paths = keygen(&out).unwrap();
        let mode = fs::metadata(&paths.private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let private = fs::read_to_string(&paths.private).unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        let public = fs::read_to_string(&paths.public).unwrap();
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));

        let signing = load_signing_key(&paths.private).unwrap();
        let verifying = load_verifying_key(&paths.public).unwrap();
        assert_eq!(signing.verifying_key(), verifying);

        let err = keygen(&out).unwrap_err();
        assert!(matches!(err, BundleError::KeyExists { .. }), "{err}");
        assert_eq!(fs::read_to_string(&paths.private).unwrap(), private);

        // Only the public key left over still blocks: never mix a new private with an old public.
        fs::remove_file(&paths.private).unwrap();
        assert!(matches!(keygen(&out), Err(BundleError::KeyExists { .. })));
    }

    #[test]
    fn loaders_name_the_file_and_the_expected_kind() {
        let dir = tempfile::tempdir().unwrap();
        let paths = keygen(dir.path()).unwrap();
        let err = load_verifying_key(&paths.private).unwrap_err();
        assert!(err.to_string().contains("release.key"), "{err}");
        assert!(err.to_string().contains("public key"), "{err}");
        let err = load_signing_key(&paths.public).unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        let err = TrustedKeys::load(&[dir.path().join("missing.pub")]).unwrap_err();
        assert!(matches!(err, BundleError::KeyRead { .. }), "{err}");
        assert!(matches!(TrustedKeys::load(&[]), Err(BundleError::NoTrustedKeys)));
        let trusted = TrustedKeys::load(&[paths.public]).unwrap();
        assert_eq!(trusted.len(), 1);
    }
}
