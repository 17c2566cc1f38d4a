//! `flightnode-agent run`: the service on every drone.
//!
//! # Layout
//! - [`worker`]: the engine thread and the job queue in front of it.
//! - [`authority`]: which MQTT commands are obeyed (hub-signed, for this drone, not expired).
//! - [`commands`]: what a command does given what is in flight (dedupe, busy, cancel), and the
//!   history of ended upgrades.
//! - [`queued`]: accepted MQTT commands kept in the store until their install ends.
//! - [`reports`]: `firmware/<id>/status` reports and their persistent sequence.
//! - [`control`]: the local socket for `status`, `install`, `mark-good`/`mark-bad`.
//! - [`notify`]: systemd READY/WATCHDOG/STATUS.
//!
//! The links themselves are [`crate::mqtt`] and [`crate::hub_link`]; neither can block the engine.

pub mod authority;
pub mod commands;
pub mod control;
pub mod notify;
pub mod queued;
pub mod reports;
pub mod worker;

mod serve;

pub use serve::{DaemonError, run};
