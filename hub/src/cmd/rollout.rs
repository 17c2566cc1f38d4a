//! The rollout commands: `flightnode-hub get rollouts`, `rollout status NAME` (a live view) and
//! `apply -f FILE` for the local store (a Kubernetes-shaped API, so the kube client reads it).

use crate::api::flightnode::FlightNode;
use crate::api::rollout::{FirmwareRollout, condition};
use crate::{Error, Result};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

fn api(client: &Client, namespace: Option<&str>) -> Api<FirmwareRollout> {
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn cond<'a>(r: &'a FirmwareRollout, type_: &str) -> Option<&'a crate::api::meta::Condition> {
    r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// `NAME VERSION WAVE SUCCEEDED FAILED TOTAL HALTED COMPLETE`, like the printer columns.
pub fn table(rollouts: &[FirmwareRollout]) -> String {
    let mut rows = vec![
        [
            "NAME",
            "VERSION",
            "WAVE",
            "SUCCEEDED",
            "FAILED",
            "TOTAL",
            "HALTED",
            "COMPLETE",
        ]
        .map(str::to_owned),
    ];
    for r in rollouts {
        let s = r.status.clone().unwrap_or_default();
        let status_of = |t: &str| cond(r, t).map_or_else(|| "<none>".to_owned(), |c| c.status.clone());
        rows.push([
            r.name_any(),
            r.spec.version.clone(),
            if s.wave.is_empty() {
                "<none>".to_owned()
            } else {
                s.wave.clone()
            },
            s.counts.succeeded.to_string(),
            s.counts.failed_total.to_string(),
            s.counts.total.to_string(),
            status_of(condition::HALTED),
            status_of(condition::COMPLETE),
        ]);
    }
    super::table(&rows)
}

/// Lists rollouts, by name.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<FirmwareRollout>> {
    let mut items = api(client, namespace)
        .list(&ListParams::default())
        .await
        .map_err(|e| request_error("list FirmwareRollouts", e))?
        .items;
    items.sort_by_key(ResourceExt::name_any);
    Ok(items)
}

/// The status of one rollout as text: wave, counts, conditions, and the drones it touches.
pub fn render(r: &FirmwareRollout, nodes: &[FlightNode]) -> String {
    let s = r.status.clone().unwrap_or_default();
    let c = s.counts;
    let mut out = format!(
        "rollout {} → {} ({})\nwave {}  total {}  succeeded {}  in progress {}  waiting {}  not started {}\n\
         failed {}  rejected {}  rolled back {}  timed out {}  pinned {}  superseded {}\n",
        r.name_any(),
        r.spec.version,
        r.spec.url,
        if s.wave.is_empty() { "-" } else { &s.wave },
        c.total,
        c.succeeded,
        c.in_progress,
        c.waiting,
        c.not_started,
        c.failed,
        c.rejected,
        c.rolled_back,
        c.timed_out,
        c.pinned,
        c.superseded,
    );
    for cond in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<12} {:<6} {}{}",
            cond.type_,
            cond.status,
            cond.reason,
            if cond.message.is_empty() {
                String::new()
            } else {
                format!(": {}", cond.message)
            }
        );
    }
    let mine: Vec<&FlightNode> = nodes
        .iter()
        .filter(|n| {
            n.annotations()
                .get(crate::api::rollout::ANNOTATION_ROLLOUT)
                .is_some_and(|v| v.split('/').next() == Some(r.name_any().as_str()))
        })
        .collect();
    if !mine.is_empty() {
        out.push_str("  DRONE                 FIRMWARE    SYNC\n");
        for n in mine {
            let st = n.status.clone().unwrap_or_default();
            let fw = st
                .firmware
                .and_then(|f| f.committed_version)
                .unwrap_or_else(|| "-".into());
            let sync = st
                .firmware_sync
                .map_or_else(|| "-".into(), |s| format!("{} {}", s.reason, s.message));
            let _ = writeln!(out, "  {:<21} {:<11} {}", n.name_any(), fw, sync);
            if let Some(reason) = st
                .wait_reason
                .as_deref()
                .filter(|_| st.phase.as_deref() == Some("Waiting"))
            {
                // Held on the drone (flight gate, metered link, download window, charger).
                let _ = writeln!(out, "  {:<21} └ waiting: {reason}", "");
            }
            if let Some(why) = st.last_upgrade.as_ref().and_then(cause) {
                let _ = writeln!(out, "  {:<21} {why}", "");
            }
        }
    }
    out
}

/// Why a drone's last upgrade did not commit, for the per-drone list: result, error code and the
/// drone's own message (for a rollback, the end of its health check's output, or that the trial
/// boot never came up). `None` when it committed or there is no last upgrade.
fn cause(last: &crate::api::flightnode::LastUpgrade) -> Option<String> {
    let result = last.result.as_deref()?;
    if matches!(result, "Committed" | "AlreadyInstalled") {
        return None;
    }
    let mut why = format!("└ {result}");
    if let Some(code) = last.error_code.as_deref().filter(|c| !c.is_empty()) {
        let _ = write!(why, " {code}");
    }
    if let Some(message) = last.error_message.as_deref().filter(|m| !m.is_empty()) {
        let _ = write!(why, ": {message}");
    }
    Some(why)
}

/// How `rollout status` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// Every wave finished.
    Complete,
    /// The circuit breaker tripped: the `Halted` condition's message.
    Halted(String),
    /// It cannot progress: the `Progressing` condition is False with this (reason, message):
    /// `InvalidSpec`, or `ProgressDeadlineExceeded`.
    Stalled(String, String),
    /// None of these yet (only without `watch`; a paused rollout is not halted).
    InProgress,
}

/// Reasons of a `Progressing=False` condition that no waiting will change.
const STALLED: [&str; 2] = ["InvalidSpec", "ProgressDeadlineExceeded"];

/// How a rollout stands, or `None` while it is still going (or its status is of an earlier
/// generation: like `kubectl rollout status`, conditions count only once the controller has
/// observed the current spec).
pub fn verdict(r: &FirmwareRollout) -> Option<Watched> {
    let observed = r.status.as_ref().and_then(|s| s.observed_generation);
    if r.metadata.generation.is_some() && observed != r.metadata.generation {
        return None;
    }
    if cond(r, condition::COMPLETE).is_some_and(|c| c.status == "True") {
        return Some(Watched::Complete);
    }
    if let Some(c) = cond(r, condition::HALTED).filter(|c| c.status == "True" && c.reason != "Paused") {
        return Some(Watched::Halted(c.message.clone()));
    }
    cond(r, condition::PROGRESSING)
        .filter(|c| c.status == "False" && STALLED.contains(&c.reason.as_str()))
        .map(|c| Watched::Stalled(c.reason.clone(), c.message.clone()))
}

/// The line `rollout status` prints while the controller has not seen the current spec.
fn unobserved(r: &FirmwareRollout) -> Option<String> {
    let generation = r.metadata.generation?;
    let observed = r.status.as_ref().and_then(|s| s.observed_generation);
    (observed != Some(generation)).then(|| {
        format!(
            "waiting for the controller to observe generation {generation} (the status below is of {})",
            observed.map_or_else(|| "no generation yet".to_owned(), |g| format!("generation {g}"))
        )
    })
}

/// A request's error, with the server's own message when it answered.
fn request_error(what: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 404 => Error::Invalid(format!("{what}: not found ({})", s.message)),
        kube::Error::Api(s) => Error::Invalid(format!("{what}: HTTP {} {}: {}", s.code, s.reason, s.message)),
        other => Error::Invalid(format!("{what}: {other}")),
    }
}

/// `rollout status NAME`: prints the status; with `watch`, again on every change until the
/// rollout is complete or halted. Returns how it ended.
pub async fn status(
    client: &Client,
    namespace: &str,
    name: &str,
    watch: bool,
    interval: Duration,
    out: &mut (dyn Write + Send),
) -> Result<Watched> {
    let io = |e: std::io::Error| Error::Encode(e.into());
    let rollouts: Api<FirmwareRollout> = Api::namespaced(client.clone(), namespace);
    let nodes: Api<FlightNode> = Api::namespaced(client.clone(), namespace);
    let mut last = String::new();
    loop {
        let r = rollouts
            .get(name)
            .await
            .map_err(|e| request_error(&format!("rollout {name} in namespace {namespace}"), e))?;
        let listed = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| request_error(&format!("FlightNodes in namespace {namespace}"), e))?
            .items;
        let mut text = render(&r, &listed);
        if let Some(line) = unobserved(&r) {
            text = format!("{line}\n{text}");
        }
        if text != last {
            writeln!(out, "{text}").map_err(io)?;
            out.flush().map_err(io)?;
            last = text;
        }
        if let Some(ended) = verdict(&r) {
            return Ok(ended);
        }
        if !watch {
            return Ok(Watched::InProgress);
        }
        tokio::time::sleep(interval).await;
    }
}

/// `apply -f FILE` against a local hub: FirmwareRollouts are created or replaced, FlightNodes get
/// their `spec.firmware` / `spec.firmwareVersion` patched. Returns one line per object.
pub async fn apply(client: &Client, namespace: &str, yaml: &str) -> Result<Vec<String>> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| Error::Invalid(format!("YAML: {e}")))?;
    let mut lines = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let name = doc
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| Error::Invalid(format!("a {kind} without metadata.name")))?
            .to_owned();
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(|n| n.as_str())
            .unwrap_or(namespace)
            .to_owned();
        let path = match kind.as_str() {
            "FirmwareRollout" => format!("/apis/edge.drone.io/v1/namespaces/{ns}/firmwarerollouts/{name}"),
            "FlightNode" => format!("/apis/edge.drone.io/v1/namespaces/{ns}/flightnodes/{name}"),
            other => {
                return Err(Error::Invalid(format!(
                    "apply -f: kind {other:?} is not served by the local store"
                )));
            }
        };
        let req = if kind == "FirmwareRollout" {
            let r: FirmwareRollout = serde_json::from_value(doc)
                .map_err(|e| Error::Invalid(format!("FirmwareRollout {name}: {e}")))?;
            let body = serde_json::to_vec(&r).map_err(|e| Error::Encode(e.into()))?;
            http::Request::put(path)
                .header("content-type", "application/json")
                .body(body)
        } else {
            let spec = doc.get("spec").cloned().unwrap_or_default();
            let merge = serde_json::json!({ "spec": {
                "firmware": spec.get("firmware").cloned().unwrap_or(serde_json::Value::Null),
            }});
            let body = serde_json::to_vec(&merge).map_err(|e| Error::Encode(e.into()))?;
            http::Request::patch(path)
                .header("content-type", "application/merge-patch+json")
                .body(body)
        }
        .map_err(|e| Error::Invalid(e.to_string()))?;
        client
            .request_text(req)
            .await
            .map_err(|e| request_error(&format!("{kind} {name}"), e))?;
        lines.push(format!("{} {name} configured", kind.to_lowercase()));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::meta::Condition;
    use crate::api::rollout::{FirmwareRolloutSpec, FirmwareRolloutStatus};

    fn rollout(generation: i64, observed: i64, conditions: &[(&str, &str, &str)]) -> FirmwareRollout {
        let mut r = FirmwareRollout::new("fleet", FirmwareRolloutSpec::default());
        r.metadata.generation = Some(generation);
        r.status = Some(FirmwareRolloutStatus {
            observed_generation: Some(observed),
            conditions: conditions
                .iter()
                .map(|(t, s, reason)| Condition {
                    type_: (*t).into(),
                    status: (*s).into(),
                    reason: (*reason).into(),
                    message: format!("{t} {reason}"),
                    ..Condition::default()
                })
                .collect(),
            ..FirmwareRolloutStatus::default()
        });
        r
    }

    #[test]
    fn conditions_count_only_for_the_observed_generation() {
        let done = [(condition::COMPLETE, "True", "AllWavesFinished")];
        assert_eq!(verdict(&rollout(1, 1, &done)), Some(Watched::Complete));
        // A new spec the controller has not seen: the old Complete says nothing about it.
        assert_eq!(verdict(&rollout(2, 1, &done)), None);
        assert!(
            unobserved(&rollout(2, 1, &done))
                .unwrap()
                .contains("generation 2")
        );
        assert!(unobserved(&rollout(2, 2, &done)).is_none());
    }

    #[test]
    fn a_held_drone_shows_why_it_waits() {
        let r = rollout(1, 1, &[]);
        let mut node = crate::api::flightnode::new_flightnode("drone-1", "default", "hw");
        node.metadata.annotations = Some(
            [(
                crate::api::rollout::ANNOTATION_ROLLOUT.to_owned(),
                "fleet/1".to_owned(),
            )]
            .into(),
        );
        node.status = Some(crate::api::flightnode::FlightNodeStatus {
            phase: Some("Waiting".into()),
            wait_reason: Some("metered_link".into()),
            ..Default::default()
        });
        let text = render(&r, &[node.clone()]);
        assert!(text.contains("└ waiting: metered_link"), "{text}");
        node.status = Some(crate::api::flightnode::FlightNodeStatus {
            phase: Some("Downloading".into()),
            ..Default::default()
        });
        assert!(!render(&r, &[node]).contains("waiting:"));
    }

    #[test]
    fn halted_stalled_and_paused() {
        let halted = [(condition::HALTED, "True", "BreakerTripped")];
        assert!(matches!(
            verdict(&rollout(1, 1, &halted)),
            Some(Watched::Halted(_))
        ));
        let paused = [(condition::HALTED, "True", "Paused")];
        assert_eq!(verdict(&rollout(1, 1, &paused)), None);
        for reason in ["InvalidSpec", "ProgressDeadlineExceeded"] {
            let stalled = [(condition::PROGRESSING, "False", reason)];
            assert_eq!(
                verdict(&rollout(1, 1, &stalled)),
                Some(Watched::Stalled(reason.into(), format!("Progressing {reason}")))
            );
        }
        let waiting = [(condition::PROGRESSING, "False", "WaitingForSoak")];
        assert_eq!(verdict(&rollout(1, 1, &waiting)), None);
    }
}
