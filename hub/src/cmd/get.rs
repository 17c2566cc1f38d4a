//! `flightnode-hub get`: lists `FlightNode`s like `kubectl get flightnodes`, from the local
//! hub's HTTP API (it is Kubernetes-shaped, so the kube client reads it) or from a cluster.

use crate::api::flightnode::FlightNode;
use crate::{Error, Result};
use kube::api::ListParams;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// Age like kubectl: `45s`, `3m12s`, `5h`, `2d`.
pub fn human_age(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=599 => format!("{}m{}s", secs / 60, secs % 60),
        600..=10_799 => format!("{}m", secs / 60),
        10_800..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn age_of(rfc3339: Option<&str>, now: time::OffsetDateTime) -> String {
    rfc3339
        .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        .map_or_else(|| "<none>".to_owned(), |t| human_age((now - t).whole_seconds()))
}

/// One table row: NAME, READY, PHASE, FIRMWARE, SLOT, FLIGHT, LAST-HEARTBEAT, AGE (the CRD's
/// printer columns).
pub fn row(node: &FlightNode, now: time::OffsetDateTime) -> [String; 8] {
    let status = node.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::api::flightnode::condition::READY)
        .map_or("<none>".to_owned(), |c| c.status.clone());
    let firmware = status.firmware.clone().unwrap_or_default();
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
    [
        node.metadata.name.clone().unwrap_or_default(),
        ready,
        status.phase.clone().unwrap_or_else(|| "<none>".into()),
        firmware.committed_version.unwrap_or_else(|| "<none>".into()),
        firmware.active_slot.unwrap_or_else(|| "<none>".into()),
        status.observed_state.clone().unwrap_or_else(|| "<none>".into()),
        age_of(status.last_heartbeat_time.as_deref(), now),
        age_of(created.as_deref(), now),
    ]
}

/// The table, with a header line.
pub fn table(nodes: &[FlightNode], now: time::OffsetDateTime, header: bool) -> String {
    let mut rows: Vec<[String; 8]> = Vec::new();
    if header {
        rows.push(
            [
                "NAME",
                "READY",
                "PHASE",
                "FIRMWARE",
                "SLOT",
                "FLIGHT",
                "LAST-HEARTBEAT",
                "AGE",
            ]
            .map(str::to_owned),
        );
    }
    rows.extend(nodes.iter().map(|n| row(n, now)));
    super::table(&rows)
}

/// Where to read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A hub's HTTP port (local store), e.g. `http://127.0.0.1:8080`.
    Server(String),
    /// The cluster from KUBECONFIG / in-cluster config.
    Kube,
}

/// `get` options.
#[derive(Debug, Clone)]
pub struct GetOptions {
    /// Where to read.
    pub source: Source,
    /// Namespace; `None`: all namespaces.
    pub namespace: Option<String>,
    /// Print JSON (a `FlightNodeList`) instead of a table.
    pub json: bool,
    /// Keep polling and print rows that changed.
    pub watch: bool,
    /// Poll interval with `watch`.
    pub interval: Duration,
}

async fn client(source: &Source) -> Result<Client> {
    match source {
        Source::Server(url) => crate::store::kube::client_for_url(url),
        Source::Kube => crate::store::kube::client_from_env().await,
    }
}

/// Lists `FlightNode`s, sorted by name.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<FlightNode>> {
    let api: Api<FlightNode> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut items = api.list(&ListParams::default()).await.map_err(Error::Kube)?.items;
    items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(items)
}

/// Runs `get`, printing to `out`.
pub async fn run(opts: GetOptions, out: &mut (dyn Write + Send)) -> Result<()> {
    let client = client(&opts.source).await?;
    let io = |e: std::io::Error| Error::Encode(e.into());
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut first = true;
    loop {
        let nodes = list(&client, opts.namespace.as_deref()).await?;
        if opts.json {
            let body = serde_json::json!({"apiVersion": crate::api::flightnode::API_VERSION, "kind": "FlightNodeList", "items": nodes});
            let text = serde_json::to_string_pretty(&body).map_err(|e| Error::Encode(e.into()))?;
            writeln!(out, "{text}").map_err(io)?;
        } else {
            let now = time::OffsetDateTime::now_utc();
            let changed: Vec<FlightNode> = nodes
                .into_iter()
                .filter(|n| {
                    let key = n.metadata.name.clone().unwrap_or_default();
                    let fingerprint = serde_json::to_string(&n.status).unwrap_or_default();
                    seen.insert(key, fingerprint.clone()).as_ref() != Some(&fingerprint)
                })
                .collect();
            if first && changed.is_empty() {
                writeln!(out, "No resources found").map_err(io)?;
            } else if !changed.is_empty() {
                write!(out, "{}", table(&changed, now, first)).map_err(io)?;
            }
        }
        out.flush().map_err(io)?;
        first = false;
        if !opts.watch {
            return Ok(());
        }
        tokio::time::sleep(opts.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(190), "3m10s");
        assert_eq!(human_age(7200), "120m");
        assert_eq!(human_age(4 * 3600), "4h");
        assert_eq!(human_age(3 * 86_400), "3d");
    }

    #[test]
    fn table_has_kubectl_columns() {
        let node = crate::api::flightnode::new_flightnode("drone-1", "default", "hw");
        let text = table(&[node], time::OffsetDateTime::now_utc(), true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[0].contains("LAST-HEARTBEAT"));
        assert!(lines[1].starts_with("drone-1"));
    }
}
