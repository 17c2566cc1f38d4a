//! flightnode wire and file contracts, in one place.
//!
//! # Layout
//! - [`manifest`]: the signed bundle manifest and the bundle file layout.
//! - [`codes`]: error codes and upgrade results shared by the CLI, MQTT and the hub.
//! - [`status`]: the JSON the agent prints for `status --json` and publishes on MQTT.
//!
//! Every type here rejects unknown fields: a contract that silently ignores what it does not
//! understand cannot be trusted to reject what it should.
#![deny(missing_docs)]

pub mod codes;
pub mod manifest;
pub mod status;

pub use status::{Phase, Slot, SlotState};

pub use codes::{ErrorCode, UpgradeResult};
pub use manifest::Manifest;
