//! Bundle sources: a local file, or HTTP(S) with `Range` resume, bounded retries and idle timeouts.
#![allow(unused_variables)]
// TEMPORARY STUB (replaced by the download branch)
#[allow(unused)]
const _STUB: () = ();
use crate::config::DownloadConfig;
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("x")]
    X,
}
impl DownloadError {
    pub fn code(&self) -> flightnode_proto::ErrorCode {
        flightnode_proto::ErrorCode::DownloadFailed
    }
}
pub struct Fetcher;
impl Fetcher {
    pub fn new(cfg: &DownloadConfig, rt: tokio::runtime::Handle) -> Result<Self, DownloadError> {
        todo!()
    }
    pub fn open(&self, source: &str, offset: u64) -> Result<BundleReader, DownloadError> {
        todo!()
    }
    pub fn bytes_received(&self) -> u64 {
        todo!()
    }
}
pub struct BundleReader;
impl std::io::Read for BundleReader {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        todo!()
    }
}
