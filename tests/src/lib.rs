//! flightnode fleet harness: real processes on loopback for end-to-end tests, demo and benchmarks.
//!
//! - [`boot_sim`]: power-on simulator for reboot mode (U-Boot, GRUB, example script backend).
//! - [`http_server`]: a bundle HTTP server that honours `Range` and injects faults.

pub mod boot_sim;
pub mod fake_kube;
pub mod http_server;
