//! `flightnode-hub upgrade` / `cancel`: builds the command (from a bundle URL, or from a bundle
//! file published under a base URL); [`crate::controller::mqtt::publish`] sends it and waits for
//! the broker's PUBACK.

use crate::{Error, Result};
use flightnode_proto::mqtt::{Command, UpgradeCommand, derive_upgrade_id};
use std::io::Read;
use std::path::Path;

/// The firmware version in a bundle's manifest (the first tar entry, `manifest.json`).
pub fn bundle_version(path: &Path) -> Result<semver::Version> {
    let bad = |m: String| Error::Invalid(format!("bundle {}: {m}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut header = [0u8; 512];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let name_end = header[..100].iter().position(|b| *b == 0).unwrap_or(100);
    if &header[..name_end] != flightnode_proto::manifest::MANIFEST_ENTRY.as_bytes() {
        return Err(bad("the first entry is not manifest.json".into()));
    }
    let size_field = String::from_utf8_lossy(&header[124..136]);
    let size = u64::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .map_err(|e| bad(format!("manifest size: {e}")))?;
    if size > flightnode_proto::manifest::MAX_MANIFEST_BYTES {
        return Err(bad(format!("manifest is {size} bytes")));
    }
    let mut manifest = vec![0u8; usize::try_from(size).map_err(|e| bad(e.to_string()))?];
    file.read_exact(&mut manifest).map_err(|e| bad(e.to_string()))?;
    let manifest = flightnode_proto::Manifest::parse(&manifest).map_err(|e| bad(e.to_string()))?;
    Ok(manifest.version)
}

/// Builds the upgrade command: from a URL, or from a bundle file published under a base URL.
pub fn upgrade_command(
    url: Option<&str>,
    bundle: Option<&Path>,
    base_url: Option<&str>,
    upgrade_id: Option<String>,
    allow_downgrade: bool,
) -> Result<Command> {
    let (url, version) = match (url, bundle, base_url) {
        (Some(url), None, None) => (url.to_owned(), None),
        (None, Some(bundle), Some(base)) => {
            let file = bundle.file_name().and_then(|f| f.to_str()).ok_or_else(|| {
                Error::Invalid(format!("bundle path {} has no file name", bundle.display()))
            })?;
            (
                format!("{}/{file}", base.trim_end_matches('/')),
                Some(bundle_version(bundle)?),
            )
        }
        _ => {
            return Err(Error::Invalid(
                "give --url URL, or --bundle FILE with --base-url URL".into(),
            ));
        }
    };
    let upgrade_id = upgrade_id.unwrap_or_else(|| derive_upgrade_id(&url));
    let cmd = Command::Upgrade(UpgradeCommand {
        upgrade_id,
        url,
        version,
        allow_downgrade,
    });
    // The agent parses strictly: refuse here what it would refuse.
    flightnode_proto::mqtt::parse_command(cmd.to_json(None).as_bytes(), "_")
        .map_err(|e| Error::Invalid(format!("command would be refused by the agent: {e}")))?;
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() -> Result<()> {
        let cmd = upgrade_command(Some("https://fw/b.fnb"), None, None, None, false)?;
        assert_eq!(cmd.upgrade_id(), derive_upgrade_id("https://fw/b.fnb"));
        assert!(upgrade_command(Some("ftp://x"), None, None, None, false).is_err());
        assert!(upgrade_command(None, None, Some("http://x"), None, false).is_err());
        Ok(())
    }
}
