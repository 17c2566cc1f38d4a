//! Device-side acceptance of a verified manifest: hardware, expiry, version and security floor.
//!
//! Runs after the signature check and before a single image byte is written, in the order the
//! checks are documented: compatible, expiry, version policy.

use flightnode_proto::ErrorCode;
use flightnode_proto::manifest::Manifest;
use time::OffsetDateTime;

/// What the device holds that the policy needs.
pub struct Device<'a> {
    /// `hardware` from the config.
    pub hardware: &'a str,
    /// The committed version.
    pub committed: &'a semver::Version,
    /// The persisted security floor.
    pub security_floor: u64,
}

/// A refusal, with its contract code and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Contract code.
    pub code: ErrorCode,
    /// What and why.
    pub message: String,
}

fn refuse(code: ErrorCode, message: String) -> Result<(), Refusal> {
    Err(Refusal { code, message })
}

/// Checks a verified manifest against the device. `AlreadyInstalled` comes back as a refusal too:
/// the caller treats it as success with nothing written.
pub fn check(
    m: &Manifest,
    dev: &Device<'_>,
    allow_downgrade: bool,
    now: OffsetDateTime,
) -> Result<(), Refusal> {
    if !m.compatible.iter().any(|hw| hw == dev.hardware) {
        return refuse(
            ErrorCode::IncompatibleHardware,
            format!(
                "bundle is for {:?}, this device is {:?}",
                m.compatible, dev.hardware
            ),
        );
    }
    if let Some(expires) = m.expires
        && expires <= now
    {
        return refuse(
            ErrorCode::Expired,
            format!("bundle {} expired at {expires}", m.version),
        );
    }
    if m.security_version < dev.security_floor {
        return refuse(
            ErrorCode::Downgrade,
            format!(
                "bundle {} has security version {}, below this device's floor {}; it can never be installed here",
                m.version, m.security_version, dev.security_floor
            ),
        );
    }
    if m.version == *dev.committed {
        return refuse(
            ErrorCode::AlreadyInstalled,
            format!("version {} is already installed", m.version),
        );
    }
    if m.version < *dev.committed && !allow_downgrade {
        return refuse(
            ErrorCode::Downgrade,
            format!(
                "bundle {} is older than the installed {}; pass --allow-downgrade to install it anyway",
                m.version, dev.committed
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::manifest::{FORMAT_VERSION, ImageInfo};

    fn manifest(version: &str, security_version: u64) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            version: version.parse().unwrap(),
            security_version,
            compatible: vec!["hw1".into()],
            created: OffsetDateTime::UNIX_EPOCH,
            expires: None,
            image: ImageInfo {
                size: 1,
                sha256: "0".repeat(64),
            },
            chunks: None,
            autopilot: None,
        }
    }

    fn code(m: &Manifest, allow: bool) -> Option<ErrorCode> {
        let committed = semver::Version::new(2, 0, 0);
        let dev = Device {
            hardware: "hw1",
            committed: &committed,
            security_floor: 5,
        };
        check(m, &dev, allow, OffsetDateTime::now_utc())
            .err()
            .map(|r| r.code)
    }

    #[test]
    fn version_policy() {
        assert_eq!(code(&manifest("2.1.0", 5), false), None);
        assert_eq!(
            code(&manifest("2.0.0", 5), false),
            Some(ErrorCode::AlreadyInstalled)
        );
        assert_eq!(code(&manifest("1.9.0", 5), false), Some(ErrorCode::Downgrade));
        assert_eq!(code(&manifest("1.9.0", 5), true), None);
        // The security floor holds even when downgrades are allowed.
        assert_eq!(code(&manifest("3.0.0", 4), true), Some(ErrorCode::Downgrade));
    }

    #[test]
    fn hardware_and_expiry() {
        let mut m = manifest("3.0.0", 5);
        m.compatible = vec!["other".into()];
        assert_eq!(code(&m, false), Some(ErrorCode::IncompatibleHardware));
        let mut m = manifest("3.0.0", 5);
        m.expires = Some(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(code(&m, false), Some(ErrorCode::Expired));
    }
}
