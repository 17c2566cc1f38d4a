//! `fleet` and `drone NAME` (also as `kubectl flightnode …`): the fleet at a glance, and one
//! drone described, from the same `FlightNode` objects `kubectl get fn` lists.

use crate::api::flightnode::{FlightNode, FlightNodeStatus, condition};
use crate::cmd::get::human_age;
use crate::{Error, Result};
use kube::Client;
use std::collections::BTreeMap;
use std::fmt::Write as _;

fn parse_time(t: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
}

fn age(t: Option<&str>, now: time::OffsetDateTime) -> String {
    t.and_then(parse_time).map_or_else(
        || "never".to_owned(),
        |t| format!("{} ago", human_age((now - t).whole_seconds())),
    )
}

fn cond<'a>(s: &'a FlightNodeStatus, type_: &str) -> Option<&'a crate::api::meta::Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

fn online(s: &FlightNodeStatus) -> bool {
    cond(s, condition::ONLINE).is_some_and(|c| c.status == "True")
}

/// Why a drone needs an operator's eye, most urgent first; `None` when it is fine. Offline, an
/// upgrade that did not commit last time, an upgrade held back, or a vehicle that may not arm.
pub fn attention(node: &FlightNode, now: time::OffsetDateTime) -> Option<String> {
    let s = node.status.clone().unwrap_or_default();
    if !online(&s) {
        return Some(format!(
            "offline: last heartbeat {}",
            age(s.last_heartbeat_time.as_deref(), now)
        ));
    }
    if let Some(l) = &s.last_upgrade
        && l.result.as_deref().is_some_and(|r| r != "Committed")
    {
        let mut why = format!(
            "last upgrade {} {}",
            l.version.as_deref().unwrap_or("?"),
            l.result.as_deref().unwrap_or("?")
        );
        if let Some(code) = &l.error_code {
            let _ = write!(why, " ({code})");
        }
        if let Some(m) = &l.error_message {
            let _ = write!(why, ": {m}");
        }
        return Some(why);
    }
    if let Some(reason) = &s.wait_reason {
        return Some(format!("upgrade waiting: {reason}"));
    }
    if let Some(lock) = &s.arm_lock {
        return Some(format!("may not arm ({}): {}", lock.reason, lock.message));
    }
    None
}

fn counts<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *by.entry(v).or_default() += 1;
    }
    by.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `fleet`: counts per version, phase, flight state and online, then the drones that need
/// attention and why.
pub fn summary(nodes: &[FlightNode], namespace: &str, now: time::OffsetDateTime) -> String {
    let statuses: Vec<FlightNodeStatus> = nodes
        .iter()
        .map(|n| n.status.clone().unwrap_or_default())
        .collect();
    let up = statuses.iter().filter(|s| online(s)).count();
    let mut out = format!(
        "Fleet in namespace {namespace}: {} drones, {up} online, {} offline\n",
        nodes.len(),
        nodes.len() - up
    );
    if nodes.is_empty() {
        return out;
    }
    let version = |s: &FlightNodeStatus| {
        s.firmware
            .as_ref()
            .and_then(|f| f.committed_version.clone())
            .unwrap_or_else(|| "<none>".into())
    };
    let versions: Vec<String> = statuses.iter().map(version).collect();
    let phases: Vec<String> = statuses
        .iter()
        .map(|s| s.phase.clone().unwrap_or_else(|| "<none>".into()))
        .collect();
    let flight: Vec<String> = statuses
        .iter()
        .map(|s| s.observed_state.clone().unwrap_or_else(|| "no link".into()))
        .collect();
    let _ = writeln!(
        out,
        "  Versions:  {}",
        counts(versions.iter().map(String::as_str))
    );
    let _ = writeln!(out, "  Phases:    {}", counts(phases.iter().map(String::as_str)));
    let _ = writeln!(out, "  Flight:    {}", counts(flight.iter().map(String::as_str)));
    let attention: Vec<(String, String)> = nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone().unwrap_or_default(), attention(n, now)?)))
        .collect();
    if attention.is_empty() {
        out.push_str("No drone needs attention.\n");
    } else {
        let _ = writeln!(out, "Needs attention ({}):", attention.len());
        let width = attention.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, why) in attention {
            let _ = writeln!(out, "  {name:width$}  {why}");
        }
    }
    out
}

/// `drone NAME`: slots, versions, flights since commit, the current and last upgrade with its
/// cause, the flight controller, conditions and the drone's recent events.
pub fn describe(node: &FlightNode, events: &[String], now: time::OffsetDateTime) -> String {
    let s = node.status.clone().unwrap_or_default();
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<16}{v}");
    };
    line("Name:", name);
    line("Namespace:", node.metadata.namespace.clone().unwrap_or_default());
    line(
        "Device id:",
        s.device_id.clone().unwrap_or_else(|| "<none>".into()),
    );
    line("Hardware:", node.spec.hardware_id.clone());
    line(
        "Online:",
        format!(
            "{} (last heartbeat {})",
            if online(&s) { "yes" } else { "no" },
            age(s.last_heartbeat_time.as_deref(), now)
        ),
    );
    let fw = s.firmware.clone().unwrap_or_default();
    line(
        "Firmware:",
        fw.committed_version.clone().unwrap_or_else(|| "<none>".into()),
    );
    if let Some(want) = &node.spec.firmware {
        line("Wanted:", format!("{} from {}", want.version, want.url));
    }
    line(
        "Active slot:",
        format!(
            "{} (booted {})",
            fw.active_slot.as_deref().unwrap_or("?"),
            fw.booted_slot.as_deref().unwrap_or("?")
        ),
    );
    for (slot, info) in [("a", &fw.slot_a), ("b", &fw.slot_b)] {
        let info = info.clone().unwrap_or_default();
        line(
            &format!("Slot {slot}:"),
            format!(
                "{} {}",
                info.state.as_deref().unwrap_or("?"),
                info.version.as_deref().unwrap_or("")
            )
            .trim_end()
            .to_owned(),
        );
    }
    if let Some(f) = fw.flights {
        line(
            "Flights:",
            format!(
                "{f} since commit ({} airborne)",
                fw.flight_time.as_deref().unwrap_or("0s")
            ),
        );
    }
    let mut phase = s.phase.clone().unwrap_or_else(|| "<none>".into());
    if let Some(w) = &s.wait_reason {
        let _ = write!(phase, " (waiting: {w})");
    }
    line("Phase:", phase);
    if let Some(u) = &s.current_upgrade {
        line(
            "Upgrade:",
            format!(
                "{} to {}",
                u.id.as_deref().unwrap_or("?"),
                u.version.as_deref().unwrap_or("?")
            ),
        );
    }
    if let Some(l) = &s.last_upgrade {
        let mut text = format!(
            "{} {}",
            l.version.as_deref().unwrap_or("?"),
            l.result.as_deref().unwrap_or("?"),
        );
        if l.finished_time.is_some() {
            let _ = write!(text, ", {}", age(l.finished_time.as_deref(), now));
        }
        if let Some(code) = &l.error_code {
            let _ = write!(text, "\n{:16}cause: {code}", "");
        }
        if let Some(m) = &l.error_message {
            let _ = write!(text, ": {m}");
        }
        line("Last upgrade:", text);
    }
    if let Some(lock) = &s.arm_lock {
        line("Arm lock:", format!("{}: {}", lock.reason, lock.message));
    }
    if let Some(source) = &s.clock_source {
        line("Clock:", format!("{source} (what command expiry is judged by)"));
    }
    if let Some(f) = &s.flight {
        let mut text = s.observed_state.clone().unwrap_or_else(|| "unknown".into());
        if let Some(b) = f.battery_percent {
            let _ = write!(text, ", battery {b}%");
        }
        if let Some(a) = &f.autopilot {
            let _ = write!(text, ", {a}");
        }
        if let Some(v) = &f.firmware_version {
            let _ = write!(text, " {v}");
        }
        line("Flight:", text);
    }
    let _ = writeln!(out, "Conditions:");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<18}{:<6}{:<26}{}",
            c.type_, c.status, c.reason, c.message
        );
    }
    let _ = writeln!(out, "Events:");
    if events.is_empty() {
        let _ = writeln!(out, "  <none>");
    }
    for e in events {
        let _ = writeln!(out, "  {e}");
    }
    out
}

/// The drone's recent events, newest last, one line each: the local hub's event log (phase
/// transitions the agent reported), or the cluster's Events about the object.
pub async fn events(client: &Client, namespace: &str, name: &str, local: bool) -> Result<Vec<String>> {
    if local {
        let url = format!("/apis/edge.drone.io/v1/namespaces/{namespace}/flightnodes/{name}/events");
        let req = http::Request::get(url)
            .body(Vec::new())
            .map_err(|e| Error::Invalid(format!("events of {name}: {e}")))?;
        let list: serde_json::Value = client.request(req).await.map_err(Error::Kube)?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let lines = items.iter().map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or("").to_owned();
            let mut line = format!("{}  {}", text("time"), text("phase"));
            for k in ["result", "errorCode", "message"] {
                if !text(k).is_empty() {
                    let _ = write!(line, "  {}", text(k));
                }
            }
            line
        });
        let mut lines: Vec<String> = lines.collect();
        let keep = lines.len().saturating_sub(10);
        return Ok(lines.split_off(keep));
    }
    let api: kube::Api<k8s_openapi::api::core::v1::Event> = kube::Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default().fields(&format!("involvedObject.name={name}"));
    let mut items = api.list(&params).await.map_err(Error::Kube)?.items;
    items.sort_by(|a, b| a.last_timestamp.cmp(&b.last_timestamp));
    let keep = items.len().saturating_sub(10);
    Ok(items
        .split_off(keep)
        .into_iter()
        .map(|e| {
            format!(
                "{}  {}  {}",
                e.last_timestamp.map(|t| t.0.to_string()).unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::flightnode::{ArmLock, Firmware, LastUpgrade, new_flightnode};
    use crate::api::meta::Condition;

    fn drone(name: &str, version: &str, online: bool) -> FlightNode {
        let mut n = new_flightnode(name, "default", "hw");
        n.status = Some(FlightNodeStatus {
            phase: Some("Idle".into()),
            firmware: Some(Firmware {
                committed_version: Some(version.into()),
                ..Firmware::default()
            }),
            conditions: vec![Condition {
                type_: condition::ONLINE.into(),
                status: if online { "True" } else { "False" }.into(),
                reason: String::new(),
                message: String::new(),
                last_transition_time: String::new(),
                observed_generation: None,
            }],
            last_heartbeat_time: Some("2026-12-06T10:00:00Z".into()),
            ..FlightNodeStatus::default()
        });
        n
    }

    #[test]
    fn the_fleet_summary_counts_and_names_the_drones_that_need_attention() {
        let now = parse_time("2026-12-06T10:05:00Z").unwrap();
        let mut rolled = drone("drone-2", "1.0.0", true);
        if let Some(s) = rolled.status.as_mut() {
            s.last_upgrade = Some(LastUpgrade {
                version: Some("2.0.0".into()),
                result: Some("RolledBack".into()),
                error_code: Some("health_check_failed".into()),
                error_message: Some("it said: gps: no 3D fix".into()),
                ..LastUpgrade::default()
            });
        }
        let mut locked = drone("drone-4", "2.0.0", true);
        if let Some(s) = locked.status.as_mut() {
            s.arm_lock = Some(ArmLock {
                reason: "trial".into(),
                message: "2.0.0 in slot b is on trial, not yet confirmed".into(),
            });
        }
        let nodes = [
            drone("drone-1", "2.0.0", true),
            rolled,
            drone("drone-3", "2.0.0", false),
            locked,
        ];
        let text = summary(&nodes, "default", now);
        assert!(
            text.starts_with("Fleet in namespace default: 4 drones, 3 online, 1 offline\n"),
            "{text}"
        );
        assert!(text.contains("Versions:  1.0.0 1, 2.0.0 3"), "{text}");
        assert!(text.contains("Needs attention (3):"), "{text}");
        assert!(
            text.contains("drone-3  offline: last heartbeat 5m0s ago"),
            "{text}"
        );
        assert!(
            text.contains(
                "drone-2  last upgrade 2.0.0 RolledBack (health_check_failed): it said: gps: no 3D fix"
            ),
            "{text}"
        );
        assert!(
            text.contains("drone-4  may not arm (trial): 2.0.0 in slot b"),
            "{text}"
        );
        assert!(
            !text.contains("drone-1  "),
            "a healthy drone is not listed: {text}"
        );
    }

    #[test]
    fn a_drone_is_described_with_its_slots_flights_and_cause() {
        let now = parse_time("2026-12-06T10:05:00Z").unwrap();
        let mut n = drone("drone-2", "1.0.0", true);
        if let Some(s) = n.status.as_mut() {
            s.firmware = Some(Firmware {
                committed_version: Some("1.0.0".into()),
                active_slot: Some("a".into()),
                booted_slot: Some("a".into()),
                flights: Some(3),
                flight_time: Some("12m".into()),
                ..Firmware::default()
            });
            s.last_upgrade = Some(LastUpgrade {
                version: Some("2.0.0".into()),
                result: Some("RolledBack".into()),
                error_code: Some("health_check_failed".into()),
                ..LastUpgrade::default()
            });
        }
        let text = describe(&n, &["2026-12-06T10:01:00Z  Testing".into()], now);
        assert!(
            text.contains("Flights:        3 since commit (12m airborne)"),
            "{text}"
        );
        assert!(text.contains("Last upgrade:   2.0.0 RolledBack\n"), "{text}");
        assert!(text.contains("cause: health_check_failed"), "{text}");
        assert!(text.contains("  2026-12-06T10:01:00Z  Testing"), "{text}");
    }
}
