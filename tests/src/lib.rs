//! flightnode fleet harness: real processes on loopback for end-to-end tests, demo and benchmarks.
//!
//! - [`agent`]: locating and running the real binaries.
//! - [`browser`]: a real headless chromium for page tests, over the DevTools protocol on a pipe.
//! - [`apiserver`]: a real kube-apiserver + etcd per test (envtest-style), found via `FLIGHTNODE_K8S_DIR`.
//! - [`fc_standin`]: a pymavlink flight controller stand-in, scripted (arm, takeoff, land, battery).
//! - [`sitl`]: a real autopilot, ArduPilot Copter SITL, found via `FLIGHTNODE_ARDUPILOT_DIR`, and a pilot for it.
//! - [`fake_kube`]: an HTTP fake of the Kubernetes API that checks every status write.
//! - [`boot_sim`]: power-on simulator for reboot mode (U-Boot, GRUB, example script backend).
//! - [`uboot_qemu`]: real U-Boot under qemu-system-aarch64, its environment in pflash.
//! - [`vboard`]: a virtual arm64 board from Debian packages (U-Boot, kernel, systemd, the agent's .deb) under qemu.
//! - [`fleet_page`]: the hub's fleet page as a person sees it, read through [`browser`].
//! - [`fleet`]: broker, hub and N drones as real processes on loopback; the demo and the end-to-end tests use it.
//! - [`load`]: gRPC load generator for the hub (paced fleet, phase bursts, flood) and a no-op hub.
//! - [`fuzz`]: input mutation for the seeded fuzz smoke tests.
//! - [`http_server`]: a bundle HTTP server that honours `Range` and injects faults.
//! - [`mosquitto`]: the real Debian broker on a free port, plain or with the example mTLS + ACL config.
//! - [`powercut`]: a FUSE layer that keeps only fsynced data and namespace changes, and cuts the power.
//! - [`pki`]: a test CA, server and client certificates for mutual TLS (broker and hub).
//! - [`poll`]: waiting for what a test observes from outside; `tool`: running the host's tools.
//! - [`release`]: the static release builds, the agent's Debian packages and a clean Debian root.
//! - [`docs`]: the book under `docs/`: mdBook to build it, and a checker for its links and the README's.
//! - [`reference`]: the reference pages, read the way the tests that keep them true compare them with the code.

pub mod agent;
pub mod apiserver;
pub mod boot_sim;
pub mod browser;
pub mod docs;
pub mod fake_kube;
pub mod fc_standin;
pub mod fleet;
pub mod fleet_page;
pub mod fuzz;
pub mod http_server;
pub mod load;
pub mod mosquitto;
pub mod pki;
pub mod poll;
pub mod powercut;
pub mod reference;
pub mod release;
pub mod sitl;
pub(crate) mod tool;
pub mod uboot_qemu;
pub mod vboard;
