//! Signed bundles: keys, creation, and the streaming reader that verifies before it writes.
//!
//! The layout is documented in [`flightnode_proto::manifest`].
#![allow(unused_variables)]
// TEMPORARY STUB (replaced by the bundle branch)
#[allow(unused)]
const _STUB: () = ();
use flightnode_proto::manifest::Manifest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("read")]
    Read { source: std::io::Error },
    #[error("write")]
    Write { source: std::io::Error },
}
impl BundleError {
    pub fn code(&self) -> flightnode_proto::ErrorCode {
        todo!()
    }
    pub fn io_source(&self) -> Option<&std::io::Error> {
        todo!()
    }
}
pub struct KeyPaths {
    pub private: PathBuf,
    pub public: PathBuf,
}
pub fn keygen(out_dir: &Path) -> Result<KeyPaths, BundleError> {
    todo!()
}
pub struct TrustedKeys;
impl TrustedKeys {
    pub fn load(paths: &[PathBuf]) -> Result<Self, BundleError> {
        todo!()
    }
}
pub struct CreateOptions {
    pub version: semver::Version,
    pub security_version: u64,
    pub compatible: Vec<String>,
    pub expires: Option<time::OffsetDateTime>,
}
pub fn create(
    key: &Path,
    image: &Path,
    opts: &CreateOptions,
    output: &Path,
) -> Result<Manifest, BundleError> {
    todo!()
}
pub struct VerifiedHeader {
    pub manifest: Manifest,
    pub key_id: String,
    pub image_offset: u64,
}
pub fn read_header<R: Read>(r: &mut R, keys: &TrustedKeys) -> Result<VerifiedHeader, BundleError> {
    todo!()
}
pub fn copy_image<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    manifest: &Manifest,
    start: u64,
    hasher: sha2::Sha256,
) -> Result<(), BundleError> {
    todo!()
}
pub fn verify_file(path: &Path, keys: &TrustedKeys) -> Result<VerifiedHeader, BundleError> {
    todo!()
}
