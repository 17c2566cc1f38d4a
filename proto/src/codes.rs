//! Error codes and upgrade results: snake_case strings shared by every contract.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an upgrade did not end in `committed`. The string form is the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bundle is not a well-formed flightnode bundle (layout, sizes, JSON, fields).
    MalformedBundle,
    /// The manifest signature does not verify with the key that claims it.
    SignatureInvalid,
    /// The bundle is signed by a key that is not in `trusted_keys`.
    UntrustedKey,
    /// The device's hardware id is not in the manifest's `compatible` list.
    IncompatibleHardware,
    /// The manifest's `expires` is in the past.
    Expired,
    /// The bundle's version is lower than the committed one, or its security version is below the floor.
    Downgrade,
    /// The bundle's version is already committed; nothing was written. A success.
    AlreadyInstalled,
    /// The image is shorter or longer than the manifest's `size`.
    SizeMismatch,
    /// The image's sha256 differs from the manifest's.
    HashMismatch,
    /// The bundle could not be fetched (HTTP error, connection lost, timeouts, retries exhausted).
    DownloadFailed,
    /// Chunked bundle: a chunk's data does not decompress to its declared size (a decompression
    /// bomb is cut there) or does not match its signed sha256. Nothing of it was written.
    ChunkInvalid,
    /// Chunked bundle: the server answered a `Range` request with something else than the range
    /// (a `200` with the whole bundle); a chunked download needs `Range` support.
    RangeUnsupported,
    /// The target slot is too small for the image, or the disk is full.
    NoSpace,
    /// The health check failed after the switch; the old slot is active again.
    HealthCheckFailed,
    /// The new slot never came up; the bootloader fell back to the old slot.
    TrialBootFailed,
    /// Another upgrade is in flight.
    Busy,
    /// The upgrade was canceled before anything was activated.
    Canceled,
    /// The flight gate held the upgrade for longer than `flight.max_wait`; nothing was activated
    /// (or, if the switch had begun, the old slot was restored once the vehicle allowed it).
    FlightGateTimeout,
    /// The upgrade in flight was recorded by a newer agent in a form this agent cannot carry on
    /// (a phase, slot or manifest it does not know): the board fell back to this older image.
    /// The upgrade was dropped, the slot that runs is kept and the other one is marked bad.
    StateTooNew,
    /// TUF mode: a metadata role (root, timestamp, snapshot or targets) expired before the time
    /// the agent trusts: a freeze attack, or a repository whose timestamp was not refreshed.
    TufExpired,
    /// TUF mode: the repository offered a metadata version older than the one the device already
    /// trusts (rollback attack). The device keeps the newer one.
    TufRollback,
    /// TUF mode: metadata files that do not belong together (a snapshot or targets file whose
    /// version, length or hash differs from what the timestamp or snapshot says).
    TufMixAndMatch,
    /// TUF mode: metadata not signed by a threshold of the keys its role has in the trusted root
    /// (a revoked or unknown key, a bad signature, an unreadable file).
    TufSignature,
    /// TUF mode: the bundle's name (the last segment of its URL) is not a target of the verified
    /// targets metadata. Nothing was downloaded.
    TufTargetUnknown,
    /// TUF mode: the bundle's length or sha256 differs from its entry in the verified targets
    /// metadata. Nothing was activated.
    TufTargetMismatch,
    /// TUF mode: the repository's metadata could not be fetched (unreachable, HTTP error).
    TufFetch,
    /// Anything else: a local I/O or configuration failure. The message says which.
    Internal,
}

impl ErrorCode {
    /// All codes, in documentation order.
    pub const ALL: [ErrorCode; 27] = [
        Self::MalformedBundle,
        Self::SignatureInvalid,
        Self::UntrustedKey,
        Self::IncompatibleHardware,
        Self::Expired,
        Self::Downgrade,
        Self::AlreadyInstalled,
        Self::SizeMismatch,
        Self::HashMismatch,
        Self::DownloadFailed,
        Self::ChunkInvalid,
        Self::RangeUnsupported,
        Self::NoSpace,
        Self::HealthCheckFailed,
        Self::TrialBootFailed,
        Self::Busy,
        Self::Canceled,
        Self::FlightGateTimeout,
        Self::StateTooNew,
        Self::TufExpired,
        Self::TufRollback,
        Self::TufMixAndMatch,
        Self::TufSignature,
        Self::TufTargetUnknown,
        Self::TufTargetMismatch,
        Self::TufFetch,
        Self::Internal,
    ];

    /// The contract string, e.g. `hash_mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedBundle => "malformed_bundle",
            Self::SignatureInvalid => "signature_invalid",
            Self::UntrustedKey => "untrusted_key",
            Self::IncompatibleHardware => "incompatible_hardware",
            Self::Expired => "expired",
            Self::Downgrade => "downgrade",
            Self::AlreadyInstalled => "already_installed",
            Self::SizeMismatch => "size_mismatch",
            Self::HashMismatch => "hash_mismatch",
            Self::DownloadFailed => "download_failed",
            Self::ChunkInvalid => "chunk_invalid",
            Self::RangeUnsupported => "range_unsupported",
            Self::NoSpace => "no_space",
            Self::HealthCheckFailed => "health_check_failed",
            Self::TrialBootFailed => "trial_boot_failed",
            Self::Busy => "busy",
            Self::Canceled => "canceled",
            Self::FlightGateTimeout => "flight_gate_timeout",
            Self::StateTooNew => "state_too_new",
            Self::TufExpired => "tuf_expired",
            Self::TufRollback => "tuf_rollback",
            Self::TufMixAndMatch => "tuf_mix_and_match",
            Self::TufSignature => "tuf_signature",
            Self::TufTargetUnknown => "tuf_target_unknown",
            Self::TufTargetMismatch => "tuf_target_mismatch",
            Self::TufFetch => "tuf_fetch",
            Self::Internal => "internal",
        }
    }

    /// The result an upgrade that stopped with this code ends in.
    pub fn result(self) -> UpgradeResult {
        match self {
            Self::AlreadyInstalled => UpgradeResult::AlreadyInstalled,
            Self::HealthCheckFailed | Self::TrialBootFailed => UpgradeResult::RolledBack,
            Self::Canceled => UpgradeResult::Canceled,
            Self::MalformedBundle
            | Self::SignatureInvalid
            | Self::UntrustedKey
            | Self::IncompatibleHardware
            | Self::Expired
            | Self::Downgrade
            | Self::SizeMismatch
            | Self::HashMismatch
            | Self::ChunkInvalid
            | Self::TufExpired
            | Self::TufRollback
            | Self::TufMixAndMatch
            | Self::TufSignature
            | Self::TufTargetUnknown
            | Self::TufTargetMismatch
            | Self::Busy => UpgradeResult::Rejected,
            Self::DownloadFailed
            | Self::TufFetch
            | Self::RangeUnsupported
            | Self::NoSpace
            | Self::FlightGateTimeout
            | Self::StateTooNew
            | Self::Internal => UpgradeResult::Failed,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an MQTT command was not obeyed (beside `malformed`): the `code` of the status report
/// and of the refusal event the hub receives. The string form is the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandRefusal {
    /// An unsigned command while `[commands] insecure_accept_unsigned` is off.
    CommandUnsigned,
    /// The signature does not verify with any configured hub key (another key, an altered
    /// command, no hub key configured).
    CommandUntrusted,
    /// The hub signed the command for another device.
    CommandWrongDevice,
    /// The trusted time is past the command's `not_after`.
    CommandExpired,
    /// The upgrade id was already seen with another bundle URL.
    CommandReplayed,
}

impl CommandRefusal {
    /// All codes, in documentation order.
    pub const ALL: [CommandRefusal; 5] = [
        Self::CommandUnsigned,
        Self::CommandUntrusted,
        Self::CommandWrongDevice,
        Self::CommandExpired,
        Self::CommandReplayed,
    ];

    /// The contract string, e.g. `command_expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CommandUnsigned => "command_unsigned",
            Self::CommandUntrusted => "command_untrusted",
            Self::CommandWrongDevice => "command_wrong_device",
            Self::CommandExpired => "command_expired",
            Self::CommandReplayed => "command_replayed",
        }
    }
}

impl fmt::Display for CommandRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeResult {
    /// The new image is active and committed.
    Committed,
    /// The bundle's version was already committed; nothing was written.
    AlreadyInstalled,
    /// The bundle was refused before anything was activated.
    Rejected,
    /// The upgrade could not be carried out (download, space, local error); the old image runs.
    Failed,
    /// The new image was activated, found unhealthy, and the old one is active again.
    RolledBack,
    /// The upgrade was canceled before anything was activated.
    Canceled,
}

impl UpgradeResult {
    /// The contract string, e.g. `rolled_back`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::AlreadyInstalled => "already_installed",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Canceled => "canceled",
        }
    }

    /// True when the device ends up on the requested version.
    pub fn is_success(self) -> bool {
        matches!(self, Self::Committed | Self::AlreadyInstalled)
    }
}

impl fmt::Display for UpgradeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_contract_strings() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }
}
