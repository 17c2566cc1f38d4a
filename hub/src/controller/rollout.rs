//! One reconcile step of every `FirmwareRollout`: read drones into [`Drone`]s (who owns each
//! drone's `spec.firmware`, and which rollout may have it: [`Claims`]), run [`plan::plan`], then
//! carry the plan out (spec writes, call-backs, status, events).

use crate::api::flightnode::{FirmwareTarget, FlightNode};
use crate::api::rollout::{
    ANNOTATION_DISPATCHED, ANNOTATION_GATES, ANNOTATION_ROLLOUT, ANNOTATION_TARGET, FirmwareRollout,
    condition, firmware_hash,
};
use crate::decide::node_sync::{FlightGate, NodeView};
use crate::decide::rollout_plan::{self as plan, Plan};
use crate::decide::rollout_spec::validate;
use crate::decide::rollout_waves::{Drone, Outcome};
use crate::metrics::RolloutGauges;
use crate::store::fleet::{Applied, Dispatch, FleetStore};
use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// True when `labels` match `selector` (matchLabels and matchExpressions, like the API server).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else {
        return true;
    };
    let labels_ok = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = sel.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let have = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => have.is_some_and(|v| values.contains(v)),
                "NotIn" => have.is_none_or(|v| !values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

/// The rollout's target as a `spec.firmware`.
pub fn target(r: &FirmwareRollout) -> FirmwareTarget {
    FirmwareTarget {
        version: r.spec.version.clone(),
        url: r.spec.url.clone(),
        allow_downgrade: r.spec.allow_downgrade,
        retry: 0,
    }
}

fn parse_time(t: &str) -> i64 {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_or(0, time::OffsetDateTime::unix_timestamp)
}

/// Who may have each drone, from every rollout at once: a drone belongs to the newest rollout
/// that selects it (creation time, then name), so overlapping rollouts never take turns on it:
/// the older one yields, and only a newer rollout ever takes a drone from another one.
#[derive(Debug, Default)]
pub struct Claims {
    /// Drone name → the newest rollout selecting it (valid specs only, not being deleted).
    claimant: BTreeMap<String, String>,
    /// Rollout name → its place, oldest first.
    order: BTreeMap<String, usize>,
}

impl Claims {
    /// Claims of `rollouts` (sorted oldest first) over `nodes`.
    pub fn of<N: std::borrow::Borrow<FlightNode>>(rollouts: &[FirmwareRollout], nodes: &[N]) -> Claims {
        let mut claims = Claims::default();
        for (i, r) in rollouts.iter().enumerate() {
            claims.order.insert(r.name_any(), i);
            // NB: an invalid or deleted rollout dispatches nothing, so it claims nothing either;
            // an older one keeps its drones.
            if validate(&r.spec).is_err() || r.metadata.deletion_timestamp.is_some() {
                continue;
            }
            for n in nodes
                .iter()
                .map(|n| std::borrow::Borrow::<FlightNode>::borrow(n))
                .filter(|n| selects(r.spec.selector.as_ref(), n.labels()))
            {
                claims.claimant.insert(n.name_any(), r.name_any());
            }
        }
        claims
    }

    /// `a` was created after `b` (a rollout that no longer exists is older than any).
    fn newer(&self, a: &str, b: &str) -> bool {
        match (self.order.get(a), self.order.get(b)) {
            (Some(a), Some(b)) => a > b,
            _ => false,
        }
    }
}

/// Managers of the node's `spec.firmware` fields, from `metadata.managedFields` (empty on the
/// local store, which keeps none).
fn firmware_managers(node: &FlightNode) -> Vec<String> {
    node.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:firmware").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// Reads one drone for rollout `r`.
///
/// Ownership of `spec.firmware`: a rollout owns it when the rollout annotation names it, the
/// target annotation still matches the firmware (and on a cluster no other field manager holds
/// any of its fields); anybody else's `spec.firmware` is a person's, and pinned. Of the rollouts,
/// the drone is the newest selecting one's ([`Claims`]); a rollout also yields a drone whose
/// firmware a newer rollout wrote.
pub fn drone(r: &FirmwareRollout, node: &FlightNode, claims: &Claims) -> Drone {
    let me = r.name_any();
    let name = node.name_any();
    let notes = node.annotations();
    let owner = notes
        .get(ANNOTATION_ROLLOUT)
        .map(|v| v.split('/').next().unwrap_or("").to_owned());
    let firmware = node.spec.firmware.as_ref();
    // Annotations from before target hashes have none: the firmware is taken as written.
    let unedited = match (firmware, notes.get(ANNOTATION_TARGET)) {
        (Some(f), Some(hash)) => firmware_hash(f) == *hash,
        _ => true,
    };
    let other_manager = firmware_managers(node)
        .iter()
        .any(|m| !m.starts_with(crate::api::rollout::FIELD_MANAGER));
    let rollout_owned = firmware.is_some() && owner.is_some() && unedited && !other_manager;
    let superseded_by = match claims.claimant.get(&name) {
        Some(c) if *c != me => Some(c.clone()),
        _ => owner
            .clone()
            .filter(|o| rollout_owned && *o != me && claims.newer(o, &me)),
    };
    let want = target(r);
    let ours = rollout_owned && owner.as_deref() == Some(me.as_str());
    // A retried drone carries a higher `retry`: still this target.
    let dispatched = ours && firmware.is_some_and(|f| f.same_target(&want));
    let gates = &r.spec.gates;
    let gate = FlightGate::of(gates);
    let view = NodeView::of(node, &gate);
    let sync = view
        .sync
        .clone()
        .filter(|s| s.observed_generation == view.generation);
    let recorded = sync.as_ref().and_then(|s| s.upgrade_id.clone());
    let last_result = recorded
        .as_ref()
        .and_then(|id| view.last_upgrade.as_ref().filter(|l| &l.0 == id))
        .map(|l| l.1.clone());
    let running = recorded
        .as_ref()
        .is_some_and(|id| view.current_upgrade.as_ref() == Some(id));
    let blocked = if gates.online && !view.online {
        Some("drone is offline".to_owned())
    } else {
        view.flight_blocked.clone()
    };
    Drone {
        name,
        retry: firmware.map_or(0, |f| f.retry),
        dispatched,
        dispatched_at: notes.get(ANNOTATION_DISPATCHED).map_or(0, |t| parse_time(t)),
        stale: ours && !dispatched,
        pinned: firmware.is_some() && !rollout_owned,
        superseded_by,
        on_target: view.committed.as_deref() == Some(want.version.as_str()),
        sync_reason: sync.map(|s| s.reason),
        started: last_result.is_some() || running,
        last_result,
        running,
        blocked,
        flights: node
            .status
            .as_ref()
            .and_then(|s| s.firmware.as_ref())
            .and_then(|f| f.flights)
            .and_then(|n| u32::try_from(n).ok()),
        flight_secs: node
            .status
            .as_ref()
            .and_then(|s| s.firmware.as_ref())
            .and_then(|f| crate::api::rollout::duration_secs(f.flight_time.as_deref())),
    }
}

/// What one step did (for metrics and logs).
#[derive(Debug, Default)]
pub struct StepReport {
    /// Plans per rollout name.
    pub plans: BTreeMap<String, Plan>,
}

impl StepReport {
    /// The earliest time a rollout's maintenance window opens or closes (unix seconds): the next
    /// step should come by then, so dispatch starts at the opening and the status turns on time.
    pub fn wake_at(&self) -> Option<i64> {
        self.plans.values().filter_map(|p| p.wake_at).min()
    }

    /// The rollout gauges of this step, for [`crate::metrics::Metrics::set_rollouts`].
    pub fn gauges(&self) -> Vec<RolloutGauges> {
        self.plans
            .iter()
            .map(|(name, plan)| {
                let mut drones = BTreeMap::new();
                for o in plan.outcomes.values() {
                    *drones.entry(outcome_label(*o)).or_insert(0) += 1;
                }
                let halted = plan
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == condition::HALTED && c.status == "True");
                let deadline_exceeded = plan.status.conditions.iter().any(|c| {
                    c.type_ == condition::PROGRESSING
                        && c.status == "False"
                        && c.reason == "ProgressDeadlineExceeded"
                });
                let paused = plan
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == condition::HALTED && c.status == "True" && c.reason == "Paused");
                RolloutGauges {
                    rollout: name.clone(),
                    drones,
                    wave: plan.status.current_wave,
                    halted,
                    deadline_exceeded,
                    paused,
                }
            })
            .collect()
    }
}

/// The drones each rollout read in earlier steps, reused while the drone's object and every
/// rollout's spec stay as they were: a step reads afresh only the drones that changed.
#[derive(Debug, Default)]
pub struct DroneCache {
    /// [`rollouts_fingerprint`] the entries were read under.
    rollouts: u64,
    /// Rollout name → drone name → (the drone's resourceVersion, what was read).
    by_rollout: HashMap<String, HashMap<String, (String, Drone)>>,
    /// Drones read afresh, over the cache's life.
    pub reads: u64,
}

/// What a [`Drone`] read depends on besides its own object: every rollout's identity, spec
/// generation and deletion (the claims), not their status, which each step rewrites.
fn rollouts_fingerprint(rollouts: &[FirmwareRollout]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in rollouts {
        (
            r.name_any(),
            r.metadata.uid.as_deref(),
            r.metadata.generation,
            r.metadata.deletion_timestamp.is_some(),
        )
            .hash(&mut h);
    }
    h.finish()
}

impl DroneCache {
    /// The drones of `r` among `selected`, read afresh where the object changed.
    fn read(&mut self, r: &FirmwareRollout, selected: &[&FlightNode], claims: &Claims) -> Vec<Drone> {
        let before = self.by_rollout.remove(&r.name_any()).unwrap_or_default();
        let mut after = HashMap::with_capacity(selected.len());
        let drones = selected
            .iter()
            .map(|n| {
                let name = n.name_any();
                let rv = n.metadata.resource_version.clone().unwrap_or_default();
                let d = match before.get(&name) {
                    Some((was, d)) if !rv.is_empty() && *was == rv => d.clone(),
                    _ => {
                        self.reads += 1;
                        drone(r, n, claims)
                    }
                };
                after.insert(name, (rv, d.clone()));
                d
            })
            .collect();
        self.by_rollout.insert(r.name_any(), after);
        drones
    }
}

/// The operators' side of a step: the request annotation, and who wrote the current spec (the
/// user the flightnode CLI named, else the field manager of the newest spec write, e.g.
/// `kubectl-edit`).
fn operator_of(r: &FirmwareRollout) -> plan::Operator {
    let notes = r.annotations();
    let request = notes
        .get(crate::api::rollout::ANNOTATION_REQUEST)
        .and_then(|text| {
            serde_json::from_str::<crate::api::rollout::Request>(text)
                .map_err(|e| {
                    tracing::warn!(rollout = %r.name_any(), error = %e,
                    "the request annotation is no JSON request ({{\"action\":…,\"id\":…}}); ignored");
                })
                .ok()
        });
    let manager = r
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or("").is_empty())
        .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").is_some()))
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .and_then(|m| m.manager.clone());
    let editor = notes
        .get(crate::api::rollout::ANNOTATION_EDITED_BY)
        .cloned()
        .or(manager);
    plan::Operator { request, editor }
}

/// Reconciles every rollout once, with up to `concurrency` drone writes in flight at a time,
/// reading drones through `cache`.
pub async fn reconcile_all(
    store: &dyn FleetStore,
    now: i64,
    now_rfc3339: &str,
    concurrency: usize,
    cache: &Mutex<DroneCache>,
) -> crate::Result<StepReport> {
    let concurrency = concurrency.max(1);
    let mut rollouts = store.rollouts().await?;
    rollouts.sort_by_key(|r| (r.metadata.creation_timestamp.clone().map(|t| t.0), r.name_any()));
    let nodes = store.nodes().await?;
    let claims = Claims::of(&rollouts, &nodes);
    {
        let mut c = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let fingerprint = rollouts_fingerprint(&rollouts);
        if c.rollouts != fingerprint {
            c.rollouts = fingerprint;
            c.by_rollout.clear();
        }
        let names: std::collections::HashSet<String> = rollouts.iter().map(ResourceExt::name_any).collect();
        c.by_rollout.retain(|name, _| names.contains(name));
    }
    let mut report = StepReport::default();
    for r in &rollouts {
        let selected: Vec<&FlightNode> = nodes
            .iter()
            .map(|n| &**n)
            .filter(|n| selects(r.spec.selector.as_ref(), n.labels()))
            .collect();
        let drones = cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read(r, &selected, &claims);
        let generation = r.metadata.generation.unwrap_or(1);
        let previous = r.status.clone().unwrap_or_default();
        if let Err(why) = validate(&r.spec) {
            let mut status = previous.clone();
            status.observed_generation = Some(generation);
            status.conditions = vec![crate::api::meta::Condition {
                type_: condition::PROGRESSING.to_owned(),
                status: "False".to_owned(),
                reason: "InvalidSpec".to_owned(),
                message: why,
                last_transition_time: now_rfc3339.to_owned(),
                observed_generation: Some(generation),
            }];
            if r.status.as_ref() != Some(&status)
                && let Err(e) = store.write_rollout_status(&r.name_any(), &status).await
            {
                tracing::warn!(rollout = %r.name_any(), error = %flightnode_proto::error::Chain(&e), "rollout status write failed");
            }
            continue;
        }
        let p = plan::plan_with(
            &r.spec,
            generation,
            &previous,
            &drones,
            now,
            now_rfc3339,
            &operator_of(r),
        );
        // A drone that carries a spec.firmware the plan may replace holds another rollout's (or
        // this one's earlier) target: it is taken over, on condition nothing changed since read.
        let take_over: BTreeMap<String, String> = selected
            .iter()
            .filter(|n| n.spec.firmware.is_some() && p.dispatch.contains(&n.name_any()))
            .filter_map(|n| Some((n.name_any(), n.metadata.resource_version.clone()?)))
            .collect();
        carry_out(store, r, &p, &take_over, now_rfc3339, concurrency).await;
        report.plans.insert(r.name_any(), p);
    }
    call_back_orphans(store, &rollouts, &nodes, concurrency).await;
    Ok(report)
}

/// The rollout that dispatched `node` but no longer has a say over it: deleted, or its selector
/// no longer selects the drone. `None` while the rollout exists and selects it.
fn orphaned_by<'a>(node: &'a FlightNode, rollouts: &[FirmwareRollout]) -> Option<&'a str> {
    let owner = node.annotations().get(ANNOTATION_ROLLOUT)?.split('/').next()?;
    let selects_it = rollouts
        .iter()
        .find(|r| r.name_any() == owner)
        .is_some_and(|r| selects(r.spec.selector.as_ref(), node.labels()));
    (!selects_it && node.spec.firmware.is_some()).then_some(owner)
}

/// Whether the drone started (or ended) the command its `spec.firmware` led to, or already runs
/// that version: then it keeps its target to the real end, as after a halt.
fn command_started(node: &FlightNode) -> bool {
    let view = NodeView::of(node, &FlightGate::default());
    let on_target = node
        .spec
        .firmware
        .as_ref()
        .is_some_and(|f| view.committed.as_deref() == Some(f.version.as_str()));
    let id = view
        .sync
        .as_ref()
        .filter(|s| s.observed_generation == view.generation)
        .and_then(|s| s.upgrade_id.clone());
    on_target
        || id.is_some_and(|id| {
            view.current_upgrade.as_deref() == Some(id.as_str())
                || view.last_upgrade.as_ref().is_some_and(|l| l.0 == id)
        })
}

/// A rollout deleted (`kubectl delete fwr`), or a drone that left a rollout's selection: what
/// the rollout dispatched and the drone has not started is called back, like after a halt. The
/// rollout annotation on each drone is the durable record of who dispatched it, so this holds
/// without a finalizer, even when the rollout was deleted while no controller ran.
async fn call_back_orphans(
    store: &dyn FleetStore,
    rollouts: &[FirmwareRollout],
    nodes: &[Arc<FlightNode>],
    concurrency: usize,
) {
    let orphans = nodes.iter().filter_map(|node| {
        let owner = orphaned_by(node, rollouts)?;
        (!command_started(node)).then(|| (node.name_any(), owner))
    });
    futures_util::stream::iter(orphans)
        .for_each_concurrent(concurrency, |(name, owner)| async move {
            match store.apply_target(&name, owner, None).await {
                Ok(_) => {
                    tracing::info!(rollout = %owner, device_id = %name,
                        "called back: the rollout was deleted or no longer selects the drone, and it had not started");
                }
                Err(e) => {
                    tracing::warn!(rollout = %owner, device_id = %name, error = %flightnode_proto::error::Chain(&e),
                        "call-back of a deleted or deselecting rollout failed; retried next step");
                }
            }
        })
        .await;
}

async fn carry_out(
    store: &dyn FleetStore,
    r: &FirmwareRollout,
    p: &Plan,
    take_over: &BTreeMap<String, String>,
    now: &str,
    concurrency: usize,
) {
    let name = r.name_any();
    let target_generation = p.status.target_generation.or(r.metadata.generation).unwrap_or(1);
    let want = target(r);
    let annotations = BTreeMap::from([
        (
            ANNOTATION_ROLLOUT.to_owned(),
            format!("{name}/{target_generation}"),
        ),
        (ANNOTATION_TARGET.to_owned(), firmware_hash(&want)),
        (ANNOTATION_DISPATCHED.to_owned(), now.to_owned()),
        (
            ANNOTATION_GATES.to_owned(),
            // NB: plain strings, numbers and booleans: serialising cannot fail.
            serde_json::to_string(&r.spec.gates).unwrap_or_default(),
        ),
    ]);
    let name = name.as_str();
    let (want, annotations) = (&want, &annotations);
    futures_util::stream::iter(&p.dispatch)
        .for_each_concurrent(concurrency, |node| async move {
            let dispatch = Dispatch {
                target: want.clone(),
                annotations: annotations.clone(),
                take_over: take_over.get(node).cloned(),
            };
            match store.apply_target(node, name, Some(&dispatch)).await {
                Ok(Applied::Ok) => {
                    tracing::info!(rollout = %name, device_id = %node, version = %r.spec.version, taken_over = dispatch.take_over.is_some(), "dispatched");
                }
                Ok(Applied::Conflict) => {
                    // NB: not retried blindly: the next step reads the drone again, and a
                    // spec.firmware someone else wrote meanwhile counts as pinned.
                    tracing::info!(rollout = %name, device_id = %node, "spec.firmware changed or owned by another manager; left alone");
                }
                Ok(Applied::Missing) => {}
                Err(e) => {
                    tracing::warn!(rollout = %name, device_id = %node, error = %flightnode_proto::error::Chain(&e), "dispatch failed; retried next step");
                }
            }
        })
        .await;
    futures_util::stream::iter(&p.retry)
        .for_each_concurrent(concurrency, |(node, attempt)| async move {
            let dispatch = Dispatch {
                target: FirmwareTarget {
                    retry: *attempt,
                    ..want.clone()
                },
                annotations: annotations.clone(),
                take_over: None,
            };
            match store.apply_target(node, name, Some(&dispatch)).await {
                Ok(_) => tracing::info!(rollout = %name, device_id = %node, retry = attempt, "retried: a new attempt"),
                Err(e) => {
                    tracing::warn!(rollout = %name, device_id = %node, error = %flightnode_proto::error::Chain(&e), "retry failed; ask again");
                }
            }
        })
        .await;
    futures_util::stream::iter(&p.cancel)
        .for_each_concurrent(concurrency, |node| async move {
            match store.apply_target(node, name, None).await {
                Ok(_) => tracing::info!(rollout = %name, device_id = %node, "called back (not started)"),
                Err(e) => {
                    tracing::warn!(rollout = %name, device_id = %node, error = %flightnode_proto::error::Chain(&e), "call-back failed; retried next step");
                }
            }
        })
        .await;
    if r.status.as_ref() != Some(&p.status)
        && let Err(e) = store.write_rollout_status(name, &p.status).await
    {
        tracing::warn!(rollout = %name, error = %flightnode_proto::error::Chain(&e), "rollout status write failed");
        // NB: no events for a step whose status did not stick: it runs again.
        return;
    }

    for (reason, note) in &p.events {
        let warning = reason == "Halted";
        tracing::info!(rollout = %name, reason, note, "rollout event");
        store.event(r, warning, reason, note).await;
    }
}

/// Outcome names as metric labels.
pub fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::NotStarted => "not_started",
        Outcome::Waiting => "waiting",
        Outcome::InProgress => "in_progress",
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::Rejected => "rejected",
        Outcome::RolledBack => "rolled_back",
        Outcome::TimedOut => "timed_out",
        Outcome::Pinned => "pinned",
        Outcome::Superseded => "superseded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn label_selectors_like_the_api_server() {
        let labels = BTreeMap::from([
            ("fleet".to_owned(), "a".to_owned()),
            ("hw".to_owned(), "x1".to_owned()),
        ]);
        assert!(selects(None, &labels));
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::from([("fleet".to_owned(), "a".to_owned())])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "hw".into(),
                operator: "In".into(),
                values: Some(vec!["x1".into(), "x2".into()]),
            }]),
        };
        assert!(selects(Some(&sel), &labels));
        let other = BTreeMap::from([("fleet".to_owned(), "b".to_owned())]);
        assert!(!selects(Some(&sel), &other));
    }

    /// The loop steps at the earliest window change of any rollout, and on its interval alone
    /// when none has windows.
    #[test]
    fn the_next_step_comes_by_the_earliest_window_change() {
        let plan = |wake_at| Plan {
            wake_at,
            ..Plan::default()
        };
        let mut report = StepReport::default();
        report.plans.insert("always-open".into(), plan(None));
        assert_eq!(report.wake_at(), None);
        report.plans.insert("nightly".into(), plan(Some(1_800_000_600)));
        report.plans.insert("weekly".into(), plan(Some(1_800_400_000)));
        assert_eq!(report.wake_at(), Some(1_800_000_600));
    }

    #[test]
    fn gauges_tell_a_breaker_halt_from_a_pause_and_show_a_missed_deadline() {
        let plan = |conditions: &[(&str, &str, &str)]| Plan {
            dispatch: Vec::new(),
            cancel: Vec::new(),
            status: crate::api::rollout::FirmwareRolloutStatus {
                conditions: conditions
                    .iter()
                    .map(|(t, s, r)| crate::api::meta::Condition {
                        type_: (*t).into(),
                        status: (*s).into(),
                        reason: (*r).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            ..Plan::default()
        };
        let report = StepReport {
            plans: BTreeMap::from([
                (
                    "tripped".to_owned(),
                    plan(&[
                        (condition::HALTED, "True", "CircuitBreakerTripped"),
                        (condition::PROGRESSING, "False", "Halted"),
                    ]),
                ),
                (
                    "paused".to_owned(),
                    plan(&[
                        (condition::HALTED, "True", "Paused"),
                        (condition::PROGRESSING, "False", "Paused"),
                    ]),
                ),
                (
                    "stuck".to_owned(),
                    plan(&[
                        (condition::HALTED, "False", "Running"),
                        (condition::PROGRESSING, "False", "ProgressDeadlineExceeded"),
                    ]),
                ),
            ]),
        };
        let g: BTreeMap<String, (bool, bool, bool)> = report
            .gauges()
            .into_iter()
            .map(|g| (g.rollout, (g.halted, g.paused, g.deadline_exceeded)))
            .collect();
        assert_eq!(g["tripped"], (true, false, false));
        assert_eq!(g["paused"], (true, true, false));
        assert_eq!(g["stuck"], (false, false, true));
    }

    fn rollout(name: &str, version: &str, created: i64) -> FirmwareRollout {
        let mut r = FirmwareRollout::new(
            name,
            crate::api::rollout::FirmwareRolloutSpec {
                version: version.into(),
                url: format!("http://fw/{version}.fnb"),
                ..Default::default()
            },
        );
        let at = jiff::Timestamp::from_second(1_800_000_000 + created).unwrap_or_default();
        r.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        r
    }

    /// A drone whose spec.firmware rollout `by` wrote (`None`: a person), then `edit` applied.
    fn node(by: Option<&FirmwareRollout>, edit: impl FnOnce(&mut FlightNode)) -> FlightNode {
        let mut n = crate::api::flightnode::new_flightnode("drone-1", "ns", "hw");
        if let Some(r) = by {
            let t = target(r);
            n.metadata.annotations = Some(BTreeMap::from([
                (ANNOTATION_ROLLOUT.to_owned(), format!("{}/1", r.name_any())),
                (ANNOTATION_TARGET.to_owned(), firmware_hash(&t)),
            ]));
            n.spec.firmware = Some(t);
        } else {
            n.spec.firmware = Some(FirmwareTarget {
                version: "1.5.0".into(),
                url: "http://fw/1.5.0.fnb".into(),
                allow_downgrade: false,
                retry: 0,
            });
        }
        edit(&mut n);
        n
    }

    /// Who owns a drone's spec.firmware, and which rollout may have the drone.
    #[test]
    fn ownership_of_a_drone_by_annotation_hash_and_field_manager() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let old = rollout("fw-old", "7.0.0", 0);
        let new = rollout("fw-new", "7.1.0", 1);
        let both = [old.clone(), new.clone()];
        let only_old = [old.clone()];
        let claims =
            |rollouts: &[FirmwareRollout], n: &FlightNode| Claims::of(rollouts, std::slice::from_ref(n));
        // The older rollout's drone: the newer one claims it (not pinned: it takes it over), the
        // older one yields it.
        let n = node(Some(&old), |_| {});
        let d = drone(&new, &n, &claims(&both, &n));
        assert!(
            !d.pinned && !d.dispatched && !d.stale && d.superseded_by.is_none(),
            "{d:?}"
        );
        let d = drone(&old, &n, &claims(&both, &n));
        assert_eq!(d.superseded_by.as_deref(), Some("fw-new"));
        // Alone, the older rollout's own drone is dispatched; after a target change it is stale.
        let d = drone(&old, &n, &claims(&only_old, &n));
        assert!(d.dispatched && !d.stale && d.superseded_by.is_none(), "{d:?}");
        let moved = rollout("fw-old", "7.0.1", 0);
        let d = drone(&moved, &n, &claims(std::slice::from_ref(&moved), &n));
        assert!(d.stale && !d.dispatched && !d.pinned, "{d:?}");
        // The newer rollout's drone, even when the newer no longer selects it: the older yields.
        let n = node(Some(&new), |_| {});
        let d = drone(&old, &n, &claims(&only_old, &n));
        assert_eq!(
            d.superseded_by.as_deref(),
            None,
            "fw-new is gone: no longer newer"
        );
        let mut unselecting = new.clone();
        unselecting.spec.selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("fleet".to_owned(), "elsewhere".to_owned())])),
            ..LabelSelector::default()
        });
        let d = drone(&old, &n, &claims(&[old.clone(), unselecting], &n));
        assert_eq!(d.superseded_by.as_deref(), Some("fw-new"));
        // A person's: set without a rollout, edited after the dispatch (the hash no longer
        // matches), or a field of it held by another manager.
        let by_hand = node(None, |_| {});
        assert!(drone(&new, &by_hand, &claims(&both, &by_hand)).pinned);
        let edited = node(Some(&new), |n| {
            if let Some(f) = n.spec.firmware.as_mut() {
                f.version = "1.5.0".into();
            }
        });
        assert!(drone(&new, &edited, &claims(&both, &edited)).pinned);
        let co_owned = node(Some(&new), |n| {
            n.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
                manager: Some("kubectl-edit".into()),
                operation: Some("Update".into()),
                fields_v1: Some(FieldsV1(
                    serde_json::json!({ "f:spec": { "f:firmware": { "f:url": {} } } }),
                )),
                ..ManagedFieldsEntry::default()
            }]);
        });
        let d = drone(&new, &co_owned, &claims(&both, &co_owned));
        assert!(d.pinned && !d.dispatched, "{d:?}");
    }
}
