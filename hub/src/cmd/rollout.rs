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

/// `NAME VERSION WAVE SUCCEEDED FAILED TOTAL HALTED COMPLETE NEXT-WINDOW`, like the printer
/// columns.
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
            "NEXT-WINDOW",
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
            s.maintenance_window
                .and_then(|w| w.next_open_time)
                .unwrap_or_else(|| "<none>".to_owned()),
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
    if let Some(line) = s.maintenance_window.as_ref().map(window_line) {
        let _ = writeln!(out, "{line}");
    }
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

/// `status.maintenanceWindow` as one line: open until when, or closed until when.
fn window_line(w: &crate::api::rollout::MaintenanceWindowStatus) -> String {
    let next = w.next_open_time.as_deref();
    match (w.open, w.close_time.as_deref(), next) {
        (true, Some(close), Some(next)) => {
            format!("maintenance window open, closes {close} (next opens {next})")
        }
        (true, Some(close), None) => format!("maintenance window open, closes {close}"),
        (true, None, _) => "maintenance window open".to_owned(),
        (false, _, Some(next)) => {
            format!("maintenance window closed: nothing new is dispatched until it opens {next}")
        }
        (false, _, None) => "maintenance window closed, and none opens in the years ahead".to_owned(),
    }
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
    fn the_window_line_says_when_dispatch_starts_or_stops() {
        use crate::api::rollout::MaintenanceWindowStatus;
        let mut r = rollout(1, 1, &[]);
        if let Some(s) = r.status.as_mut() {
            s.maintenance_window = Some(MaintenanceWindowStatus {
                open: false,
                close_time: None,
                next_open_time: Some("2026-12-07T22:00:00+01:00".into()),
            });
        }
        let text = render(&r, &[]);
        assert!(
            text.contains("maintenance window closed: nothing new is dispatched until it opens 2026-12-07T22:00:00+01:00"),
            "{text}"
        );
        let row = table(std::slice::from_ref(&r));
        assert!(
            row.contains("NEXT-WINDOW") && row.contains("2026-12-07T22:00:00+01:00"),
            "{row}"
        );
        if let Some(s) = r.status.as_mut() {
            s.maintenance_window = Some(MaintenanceWindowStatus {
                open: true,
                close_time: Some("2026-12-08T04:00:00+01:00".into()),
                next_open_time: Some("2026-12-08T22:00:00+01:00".into()),
            });
        }
        let text = render(&r, &[]);
        assert!(
            text.contains("maintenance window open, closes 2026-12-08T04:00:00+01:00 (next opens 2026-12-08T22:00:00+01:00)"),
            "{text}"
        );
        assert!(!render(&rollout(1, 1, &[]), &[]).contains("maintenance window"));
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

/// `rollout pause|resume NAME`: sets `spec.paused`, reading the rollout first so the write
/// carries its `resourceVersion` (a concurrent edit is a conflict, retried on the fresh object).
/// Works against a cluster and a local hub alike. Returns whether anything changed.
pub async fn set_paused(
    client: &Client,
    namespace: &str,
    name: &str,
    paused: bool,
    by: &str,
) -> Result<bool> {
    let api: Api<FirmwareRollout> = Api::namespaced(client.clone(), namespace);
    let what = format!("rollout {name} in namespace {namespace}");
    for _ in 0..3 {
        let mut r = api.get(name).await.map_err(|e| request_error(&what, e))?;
        if r.spec.paused == paused {
            return Ok(false);
        }
        r.spec.paused = paused;
        // The rollout's history names who paused it.
        r.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                crate::api::rollout::ANNOTATION_EDITED_BY.to_owned(),
                by.to_owned(),
            );
        // NB: the status subresource is the controller's; a replace of the object leaves it.
        r.status = None;
        match api.replace(name, &kube::api::PostParams::default(), &r).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(request_error(&what, e)),
        }
    }
    Err(Error::Invalid(format!(
        "{what}: it kept changing under the write; try again"
    )))
}

/// `rollout history NAME`: the rollout's recorded events (waves advanced, halts, completion),
/// oldest first, under a line naming its generation and target. A local hub keeps them in its
/// store; a cluster has them as Events about the rollout (repeats of one reason there may be
/// folded into one series, as kubectl shows them).
pub async fn history(client: &Client, namespace: &str, name: &str, local: bool) -> Result<String> {
    let api: Api<FirmwareRollout> = Api::namespaced(client.clone(), namespace);
    let what = format!("rollout {name} in namespace {namespace}");
    let r = api.get(name).await.map_err(|e| request_error(&what, e))?;
    let mut rows: Vec<[String; 4]> = vec![["TIME", "TYPE", "REASON", "MESSAGE"].map(str::to_owned)];
    if local {
        let url = format!("/apis/edge.drone.io/v1/namespaces/{namespace}/firmwarerollouts/{name}/events");
        let req = http::Request::get(url)
            .body(Vec::new())
            .map_err(|e| Error::Invalid(format!("events of {what}: {e}")))?;
        let list: serde_json::Value = client.request(req).await.map_err(|e| request_error(&what, e))?;
        for e in list["items"].as_array().into_iter().flatten() {
            let text = |k: &str| e[k].as_str().unwrap_or("").to_owned();
            rows.push([text("time"), text("type"), text("reason"), text("note")]);
        }
    } else {
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
        let params = ListParams::default().fields(&format!(
            "involvedObject.kind=FirmwareRollout,involvedObject.name={name}"
        ));
        let mut items = events
            .list(&params)
            .await
            .map_err(|e| request_error(&format!("events of {what}"), e))?
            .items;
        let when = |e: &k8s_openapi::api::core::v1::Event| {
            e.event_time
                .as_ref()
                .map(|t| t.0.to_string())
                .or_else(|| e.last_timestamp.as_ref().map(|t| t.0.to_string()))
                .unwrap_or_default()
        };
        items.sort_by_key(|e| when(e));
        for e in &items {
            rows.push([
                when(e),
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default(),
            ]);
        }
    }
    let status = r.status.clone().unwrap_or_default();
    let mut out = format!(
        "rollout {name}: generation {}, target {} ({}) since generation {}\n",
        r.metadata.generation.unwrap_or(1),
        r.spec.version,
        r.spec.url,
        status.target_generation.unwrap_or(1),
    );
    if rows.len() == 1 {
        out.push_str("No events recorded.\n");
    } else {
        out.push_str(&super::table(&rows));
    }
    Ok(out)
}

/// Who the user is, for the rollout's history: on a cluster the name the API server knows
/// (a SelfSubjectReview), on a local hub the login name. Self-reported for the history's sake;
/// the API server's audit log is the record that cannot be forged.
pub async fn whoami(client: &Client, local: bool) -> String {
    let login = || {
        std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "local user".to_owned())
    };
    if local {
        return login();
    }
    let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
    let Ok(req) = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap_or_default())
    else {
        return login();
    };
    match client.request::<serde_json::Value>(req).await {
        Ok(review) => review["status"]["userInfo"]["username"]
            .as_str()
            .map_or_else(login, str::to_owned),
        Err(e) => {
            tracing::debug!(error = %e, "SelfSubjectReview failed; naming the login user");
            login()
        }
    }
}

/// How an operator request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// Carried out: the history's message.
    Done(String),
    /// Refused by the controller: why.
    Refused(String),
    /// Written, but no controller carried it out in time.
    Pending,
}

/// Writes an operator request (`abort`, `resume`, `promote`) into the rollout's
/// [`crate::api::rollout::ANNOTATION_REQUEST`] annotation (with `paused` also set to false for
/// a resume of a paused rollout) and waits up to `wait` for the controller to carry it out.
pub async fn request(
    client: &Client,
    namespace: &str,
    name: &str,
    action: &str,
    by: &str,
    unpause: bool,
    wait: Duration,
) -> Result<Requested> {
    let api: Api<FirmwareRollout> = Api::namespaced(client.clone(), namespace);
    let what = format!("rollout {name} in namespace {namespace}");
    let now = time::OffsetDateTime::now_utc();
    let at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let id = format!("{action}-{}", now.unix_timestamp_nanos());
    let q = crate::api::rollout::Request {
        action: action.to_owned(),
        id: id.clone(),
        by: by.to_owned(),
        at,
    };
    let text = serde_json::to_string(&q).map_err(|e| Error::Encode(e.into()))?;
    let mut written = false;
    for _ in 0..3 {
        let mut r = api.get(name).await.map_err(|e| request_error(&what, e))?;
        let notes = r.metadata.annotations.get_or_insert_with(Default::default);
        notes.insert(crate::api::rollout::ANNOTATION_REQUEST.to_owned(), text.clone());
        if unpause && r.spec.paused {
            r.spec.paused = false;
            notes.insert(
                crate::api::rollout::ANNOTATION_EDITED_BY.to_owned(),
                by.to_owned(),
            );
        }
        r.status = None;
        match api.replace(name, &kube::api::PostParams::default(), &r).await {
            Ok(_) => {
                written = true;
                break;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(request_error(&what, e)),
        }
    }
    if !written {
        return Err(Error::Invalid(format!(
            "{what}: it kept changing under the write; try again"
        )));
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = api.get(name).await.map_err(|e| request_error(&what, e))?;
        let status = r.status.unwrap_or_default();
        if status.last_request.as_deref() == Some(id.as_str()) {
            // The entry the controller wrote for it: the newest one by this user.
            let entry = status
                .history
                .iter()
                .rev()
                .find(|h| h.by == by && h.action != "Edited");
            return Ok(match entry {
                Some(h) if h.action == "Refused" => Requested::Refused(h.message.clone()),
                Some(h) => Requested::Done(h.message.clone()),
                None => Requested::Done(String::new()),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Requested::Pending);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether the rollout is halted by its breaker or aborted (what `resume` lifts), and whether it
/// is complete for its target (what `abort` refuses).
pub fn halted_or_complete(r: &FirmwareRollout) -> (bool, bool) {
    let conditions = r
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let halted = conditions.iter().any(|c| {
        c.type_ == condition::HALTED
            && c.status == "True"
            && matches!(c.reason.as_str(), "CircuitBreakerTripped" | "Aborted")
    });
    let complete = conditions
        .iter()
        .any(|c| c.type_ == condition::COMPLETE && c.status == "True");
    (halted, complete)
}
