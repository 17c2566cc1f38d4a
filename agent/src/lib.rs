//! flightnode-agent: signed A/B firmware upgrades with automatic rollback.
//!
//! # Layout
//! - [`config`]: `agent.toml`, with documented defaults.
//! - [`bundle`]: keys, `bundle create`, and the streaming bundle reader that verifies before it writes.
//! - [`tuf`]: TUF mode — the repository's metadata chain (root, timestamp, snapshot, targets)
//!   verified before a bundle is downloaded, and the bundle checked against its target entry.
//! - [`policy`]: device-side acceptance of a verified manifest (hardware, expiry, version, security floor).
//! - [`download`]: bundle sources: a local file or HTTP(S) with `Range` resume, retries and timeouts.
//! - [`slot`]: where images go — the `file` and `block` slot backends.
//! - [`boot`]: bootloader backends for reboot mode — `uboot`, `grub`, `script` (RAUC's vocabulary).
//! - [`activation`]: switching the active slot — a `current` pointer + apply command, or a trial boot.
//! - [`hooks`]: running the configured apply, health and reboot commands with a timeout.
//! - [`child`]: child processes in their own process group, killed as a group past a deadline.
//! - [`state`]: what the device knows (slots, committed version, floor, upgrade in flight) and its
//!   transitions. Transitions change memory only; [`store`] writes them.
//! - [`store`]: sled persistence of [`state::DeviceState`], flushed before every side effect.
//! - [`engine`]: the upgrade flow — install, resume after a crash, commit or roll back.
//! - [`flight`]: the flight gate — flight state over MAVLink (read only) and the `[flight]` policy
//!   that holds an upgrade in phase `waiting` while the vehicle is armed or flying.
//! - [`daemon`]: `flightnode-agent run` — the engine thread, command rules, control socket, systemd.
//! - [`failpoint`]: test-only crash points (debug builds only).
//! - [`netpolicy`]: the download's link policy — metered links (defer or throttle), rate caps,
//!   the download window.
//! - [`clock`]: the trusted time (GPS, the hub's signed time, a persisted floor) for command expiry.
//! - [`mqtt`]: the MQTT link — commands in, status reports out.
//! - [`hub_link`]: heartbeats to the hub over gRPC; [`outbox`] keeps events until acknowledged;
//!   [`resources`] samples CPU, memory, disk and temperature.

pub mod activation;
pub mod boot;
pub mod bundle;
pub mod child;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod download;
pub mod engine;
pub mod failpoint;
pub mod flight;
#[doc(hidden)]
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hooks;
pub mod hub_link;
pub mod mqtt;
pub mod netpolicy;
pub mod outbox;
pub mod policy;
pub mod resources;
pub mod slot;
pub mod state;
pub mod store;
pub mod tuf;

pub use flightnode_proto as proto;
