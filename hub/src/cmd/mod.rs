//! Layer 6, the commands of the `flightnode-hub` binary, on top of every other layer.
//!
//! - [`serve`]: `serve`: TLS, store choice, the heartbeat side, the controllers, gRPC and HTTP.
//! - [`http`]: serve's HTTP port: `/metrics`, `/healthz`, `/readyz` and the local store's
//!   Kubernetes-shaped API.
//! - [`ui`]: the live fleet page on serve's HTTP port (`/ui`), read-only unless the request is
//!   authorised to act.
//! - [`broker`]: serve's embedded MQTT broker for laptops and the demo (feature
//!   `embedded-broker`).
//! - [`get`]: `get`, a kubectl-like table of `FlightNode`s.
//! - [`rollout`]: `get rollouts`, `rollout status NAME` and `apply -f FILE`.
//! - [`upgrade`]: `upgrade` and `cancel`, one MQTT command for one drone.
//! - [`verb`]: the rollout verbs (pause, resume, abort, promote, retry), shared by the CLI and
//!   the fleet page.
//!
//! `crd` prints [`crate::api::crd_yaml`].

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod fleet;
pub mod get;
pub mod http;
pub mod rollout;
pub mod serve;
pub mod ui;
pub mod upgrade;
pub mod verb;

/// Rows as kubectl prints them: each column as wide as its widest cell, three spaces apart, no
/// trailing blanks.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
