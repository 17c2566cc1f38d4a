//! TUF mode in the download step: the target is verified before the first bundle byte is
//! fetched, and the whole bundle is compared with its target entry before the slot it was
//! written to may become active.

use super::{Engine, Stop};
use crate::bundle;
use crate::tuf::{TrustedTarget, TufError, trusted_now};
use flightnode_proto::{ErrorCode, Manifest, Slot};
use sha2::Digest;
use std::io::Read;

fn refuse(e: &TufError) -> Stop {
    Stop::Upgrade(e.code(), flightnode_proto::error::chain(e))
}

impl Engine {
    /// TUF mode: the upgrade's target entry, verified through the metadata chain at the trusted
    /// time (once per upgrade and agent start). `None` without `[tuf]`.
    pub(super) fn tuf_target(&mut self) -> Result<Option<TrustedTarget>, Stop> {
        let Some(tuf) = &self.tuf else {
            return Ok(None);
        };
        let u = self.upgrade()?;
        if let Some((id, target)) = &self.tuf_target
            && *id == u.id
        {
            return Ok(Some(target.clone()));
        }
        let (id, source) = (u.id.clone(), u.source.clone());
        let target = tuf
            .target(&source, trusted_now(&self.clock))
            .map_err(|e| self.interrupted().unwrap_or_else(|| refuse(&e)))?;
        self.tuf_target = Some((id, target.clone()));
        Ok(Some(target))
    }

    /// TUF mode, after the image is written and matched its manifest, before the slot is staged:
    /// the bundle's bytes (header and tail fetched again, the image read back from the slot,
    /// which also covers a download resumed after a restart) must have the target's length and
    /// sha256. The header fetched again must still hold the accepted manifest.
    pub(super) fn tuf_check_bundle(&mut self, manifest: &Manifest, slot: Slot) -> Result<(), Stop> {
        let Some(target) = self.tuf_target()? else {
            return Ok(());
        };
        let u = self.upgrade()?.clone();
        let fetch_stop = |this: &Self, e: crate::download::DownloadError| {
            this.interrupted()
                .unwrap_or(Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))
        };
        let read_stop = |this: &Self, what: &str, e: std::io::Error| {
            this.interrupted()
                .unwrap_or_else(|| match crate::download::DownloadError::from_io(&e) {
                    Some(d) => Stop::Upgrade(d.code(), flightnode_proto::error::chain(d)),
                    None => Stop::Upgrade(
                        ErrorCode::DownloadFailed,
                        format!("reading the {what} of bundle {} again failed: {e}", u.source),
                    ),
                })
        };
        let mut hasher = sha2::Sha256::new();
        let mut head = Vec::new();
        self.fetcher
            .open_range(&u.source, 0, u.image_offset)
            .map_err(|e| fetch_stop(self, e))?
            .read_to_end(&mut head)
            .map_err(|e| read_stop(self, "header", e))?;
        let header = bundle::read_header(&mut head.as_slice(), &self.keys)
            .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
        if header.manifest != *manifest || header.image_offset != u.image_offset {
            return Err(Stop::Upgrade(
                ErrorCode::TufTargetMismatch,
                format!(
                    "bundle {} changed since its manifest was accepted; refusing to stage slot {slot}",
                    u.source
                ),
            ));
        }
        hasher.update(&head);
        self.slots
            .hash_prefix(slot, manifest.image.size, &mut hasher)
            .map_err(|e| Stop::Upgrade(e.code(), flightnode_proto::error::chain(&e)))?;
        let mut tail = self
            .fetcher
            .open(&u.source, u.image_offset + manifest.image.size)
            .map_err(|e| fetch_stop(self, e))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail_len = 0u64;
        loop {
            // The tail is tar padding and end-of-archive blocks; past the target's length it can
            // only be a mismatch, so stop reading there.
            let n = tail.read(&mut buf).map_err(|e| read_stop(self, "tail", e))?;
            if n == 0 || head.len() as u64 + manifest.image.size + tail_len > target.length {
                break;
            }
            hasher.update(&buf[..n]);
            tail_len += n as u64;
        }
        let length = head.len() as u64 + manifest.image.size + tail_len;
        target.check(length, &hasher.finalize()).map_err(|e| refuse(&e))?;
        tracing::info!(target = %target.name, length, slot = %slot, "bundle matches its TUF target");
        Ok(())
    }
}
