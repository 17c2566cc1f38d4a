//! The reconcilers' loop: on the leader only ([`crate::controller::lease`]), after every change the stores
//! report and at least every `interval`, run the rollout controller and the node reconciler.
//!
//! Order inside a step: the node reconciler first **persists** its record (`firmwareSync` with
//! the upgrade id) and only then publishes the command. A leader that dies between the two
//! leaves a record whose id the next leader re-publishes; one that dies after leaves a command
//! the agent has, under the same id. Either way one install.

use crate::controller::lease::Leadership;
use crate::controller::mqtt::CommandSink;
use crate::decide::node_sync::{self, Action, FlightGate, NodeView, Policy};
use crate::metrics::Metrics;
use crate::store::fleet::FleetStore;
use flightnode_proto::mqtt::{Command, UpgradeCommand};
use futures_util::StreamExt;
use kube::ResourceExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How soon a pass comes after a command the broker did not acknowledge.
const UNSENT_RETRY: Duration = Duration::from_secs(2);

/// Longest a drone with nothing to do goes without being decided again, even unchanged.
const FULL_RESYNC: Duration = Duration::from_mins(1);

/// Settings of the reconcilers.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Node reconciler retries.
    pub policy: Policy,
    /// Flight gate of the node reconciler (drones outside a rollout).
    pub gate: FlightGate,
    /// Longest time between two steps.
    pub interval: Duration,
    /// Most drones the node reconciler writes or publishes for in one pass; the rest go in the
    /// next pass, which comes at once. Bounds what a step does after leadership passed and how
    /// long a step holds the loop.
    pub max_writes_per_pass: usize,
    /// Drones whose writes and commands are in flight at once, in a node pass and in a
    /// rollout's dispatch: one request at a time held a 10,000-drone rollout for minutes.
    pub concurrent_writes: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            policy: Policy::default(),
            gate: FlightGate::default(),
            interval: Duration::from_secs(5),
            max_writes_per_pass: 200,
            concurrent_writes: 8,
        }
    }
}

/// The reconcilers.
pub struct Controllers {
    /// Where objects live.
    pub store: Arc<dyn FleetStore>,
    /// Where commands go.
    pub commands: Arc<dyn CommandSink>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub config: ControllerConfig,
    /// Drones the last passes found nothing to do for (see [`Seen`]).
    seen: Mutex<HashMap<String, Seen>>,
    /// Drones the rollout controller read in earlier steps.
    drones: Mutex<crate::controller::rollout::DroneCache>,
}

fn now() -> (i64, String) {
    let t = time::OffsetDateTime::now_utc();
    (t.unix_timestamp(), crate::decide::status::rfc3339(t))
}

impl Controllers {
    /// Reconcilers over `store`, sending commands to `commands`.
    pub fn new(
        store: Arc<dyn FleetStore>,
        commands: Arc<dyn CommandSink>,
        metrics: Arc<Metrics>,
        config: ControllerConfig,
    ) -> Self {
        Controllers {
            store,
            commands,
            metrics,
            config,
            seen: Mutex::new(HashMap::new()),
            drones: Mutex::default(),
        }
    }

    /// Runs while the process lives; works only while `leader` leads. A step is abandoned when
    /// leadership passes in the middle of it (its writes are fenced anyway: build `store` and
    /// `commands` with [`crate::controller::fence`]). Stop it by aborting its task.
    pub async fn run(self, leader: Leadership) {
        let changed = self.store.changed();
        loop {
            if !leader.is_leader() {
                tracing::info!("not the leader: reconcilers idle");
                leader.gained().await;
                // NB: a new term decides every drone afresh: what another leader did meanwhile
                // may have left nothing changed in this replica's view.
                self.seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                tracing::info!("leader: reconcilers running");
            }
            let wait = tokio::select! {
                biased;
                () = leader.lost() => {
                    tracing::warn!("leadership lost in the middle of a step; the rest of it is abandoned");
                    continue;
                }
                wait = self.step() => wait,
            };
            tokio::select! {
                () = tokio::time::sleep(wait.min(self.config.interval)) => {}
                () = changed.notified() => {
                    // Let a burst of watch events settle into one step.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                () = leader.lost() => {}
            }
        }
    }

    /// One step of both reconcilers; returns when the next one is due at the latest.
    pub async fn step(&self) -> Duration {
        let started = std::time::Instant::now();
        let (t, t_text) = now();
        let reads_before = self.drone_reads();
        let stepped = crate::controller::rollout::reconcile_all(
            self.store.as_ref(),
            t,
            &t_text,
            self.config.concurrent_writes,
            &self.drones,
        )
        .await;
        self.metrics
            .rollout_drone_reads
            .inc_by(self.drone_reads() - reads_before);
        let mut wake = None;
        match stepped {
            Ok(report) => {
                self.metrics.set_rollouts(&report.gauges());
                wake = report.wake_at();
            }
            Err(e) => tracing::warn!(error = %flightnode_proto::error::Chain(&e), "rollout reconcile failed"),
        }
        self.metrics.reconcile_done("rollout", started.elapsed());
        let started = std::time::Instant::now();
        let next = self.reconcile_nodes().await;
        self.metrics.reconcile_done("node", started.elapsed());
        // `t` is the step's second rounded down: waiting `at - t` never wakes before `at`.
        match wake.and_then(|at| u64::try_from(at - t).ok()) {
            Some(secs) => next.min(Duration::from_secs(secs)),
            None => next,
        }
    }

    fn drone_reads(&self) -> u64 {
        self.drones
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reads
    }

    /// Publishes one command to `device` (object `name`); false when it could not be sent.
    async fn send(&self, name: &str, device: &str, cmd: &Command) -> bool {
        match self.commands.send(device, cmd).await {
            Ok(()) => {
                tracing::info!(device_id = %device, name = %name, upgrade_id = cmd.upgrade_id(), "command sent");
                true
            }
            Err(e) => {
                tracing::warn!(device_id = %device, name = %name, upgrade_id = cmd.upgrade_id(), error = %flightnode_proto::error::Chain(&e), "command not acknowledged by the broker; sent again on the next pass");
                false
            }
        }
    }

    /// One pass of the node reconciler over the drones that changed since their last decision
    /// or whose retry is due: decided one by one, carried out up to
    /// [`ControllerConfig::concurrent_writes`] drones at a time.
    pub async fn reconcile_nodes(&self) -> Duration {
        let mut next = self.config.interval;
        let nodes = match self.store.nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %flightnode_proto::error::Chain(&e), "listing FlightNodes failed");
                return next;
            }
        };
        let now_instant = Instant::now();
        let mut work = Vec::new();
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut still = HashMap::with_capacity(nodes.len());
            for node in &nodes {
                let name = node.name_any();
                let rv = node.metadata.resource_version.clone();
                if let (Some(rv), Some(last)) = (&rv, seen.remove(&name))
                    && last.resource_version == *rv
                    && now_instant < last.due
                {
                    next = next.min(last.due - now_instant);
                    still.insert(name, last);
                    continue;
                }
                if work.len() >= self.config.max_writes_per_pass {
                    // Decided on the next pass, which comes at once.
                    next = Duration::ZERO;
                    continue;
                }
                self.metrics.node_decisions.inc();
                let view = NodeView::of(node, &FlightGate::for_node(node, &self.config.gate));
                let (t, t_text) = now();
                let d = node_sync::decide(&view, &self.config.policy, t, &t_text);
                let requeue = d.requeue.unwrap_or(FULL_RESYNC).min(FULL_RESYNC);
                next = next.min(requeue);
                let upgrade = match &d.action {
                    Action::None => None,
                    Action::Publish { upgrade_id } => view.target.as_ref().map(|target| {
                        Command::Upgrade(UpgradeCommand {
                            upgrade_id: upgrade_id.clone(),
                            url: target.url.clone(),
                            version: semver::Version::parse(&target.version).ok(),
                            allow_downgrade: target.allow_downgrade,
                        })
                    }),
                };
                let device = node_sync::device_id(node);
                for (id, how) in &d.acknowledged {
                    tracing::info!(device_id = %device, name = %name, upgrade_id = %id, how = %how, "cancel acknowledged by the drone");
                }
                if d.cancel.is_empty() && d.sync == view.sync && upgrade.is_none() {
                    // Nothing to do until the object changes or the retry is due.
                    if let Some(rv) = rv {
                        still.insert(
                            name,
                            Seen {
                                resource_version: rv,
                                due: now_instant + requeue,
                            },
                        );
                    }
                    continue;
                }
                work.push(NodeWork {
                    name,
                    device,
                    view,
                    decision: d,
                    upgrade,
                });
            }
            *seen = still;
        }
        if work.len() >= self.config.max_writes_per_pass {
            tracing::info!(
                writes = work.len(),
                "node reconciler: the rest of the fleet goes in the next pass"
            );
        }
        let retry_soon = futures_util::stream::iter(work)
            .map(|w| self.carry_out(w))
            .buffer_unordered(self.config.concurrent_writes.max(1))
            .fold(false, |any, unsent| async move { any || unsent })
            .await;
        if retry_soon {
            next = next.min(UNSENT_RETRY);
        }
        next
    }

    /// Carries out one drone's decision; true when a command did not reach the broker.
    ///
    /// Cancels go out *before* their record is written: for a spec that moved on, the old
    /// record is the only place that names the upgrade to cancel; for a cancel due again, the
    /// record says when it was sent. When a publish fails nothing is written and nothing else
    /// happens for this drone on this pass: the next pass sends the cancels again (a second
    /// cancel of the same id is a no-op on the drone). The new command follows on the same
    /// connection, so the drone sees the cancel first. NB: an agent still holding the old
    /// upgrade in its queue may answer the new one `busy`; the new one is then published again
    /// after `redeliver_after`, like any command not picked up. An upgrade is the other way
    /// round: its record first (see the module comment).
    async fn carry_out(&self, w: NodeWork) -> bool {
        let NodeWork {
            name,
            device,
            view,
            decision: d,
            upgrade,
        } = w;
        let replaced_by = upgrade.as_ref().map_or("", Command::upgrade_id);
        for old in &d.cancel {
            let cancel = Command::Cancel {
                upgrade_id: old.clone(),
            };
            let again = view
                .sync
                .iter()
                .flat_map(|s| &s.pending_cancels)
                .find(|p| p.upgrade_id == *old);
            if !self.send(&name, &device, &cancel).await {
                tracing::warn!(device_id = %device, name = %name, upgrade_id = %old, replaced_by, generation = view.generation,
                    "cancel not taken by the broker; it is retried before anything else");
                return true;
            }
            match again {
                Some(p) => {
                    tracing::info!(device_id = %device, name = %name, upgrade_id = %old, sends = p.sends + 1, since = %p.first_sent_time,
                    "cancel sent again: the drone has not acknowledged it");
                }
                None => {
                    tracing::info!(device_id = %device, name = %name, upgrade_id = %old, replaced_by, generation = view.generation,
                    "spec changed before the drone started its upgrade; that upgrade is canceled");
                }
            }
        }
        if d.sync != view.sync
            && let Err(e) = self.store.write_sync(&name, d.sync.as_ref()).await
        {
            // NB: nothing is published without its record: it could not be found again.
            tracing::warn!(device_id = %device, name = %name, error = %flightnode_proto::error::Chain(&e), "firmwareSync write failed; not publishing");
            return false;
        }
        if let Some(cmd) = &upgrade
            && !self.send(&name, &device, cmd).await
        {
            // The broker does not have it: make the record due for a re-publish on the next
            // pass (the same id) instead of after `redeliver_after`.
            if let Some(mut rec) = d.sync.clone() {
                rec.last_attempt_time = None;
                if let Err(e) = self.store.write_sync(&name, Some(&rec)).await {
                    tracing::warn!(device_id = %device, name = %name, error = %flightnode_proto::error::Chain(&e),
                        "firmwareSync write failed; the command goes out again after the redelivery delay");
                }
            }
            return true;
        }
        false
    }
}

/// One drone's decision, to carry out.
struct NodeWork {
    name: String,
    device: String,
    view: NodeView,
    decision: node_sync::Decision,
    upgrade: Option<Command>,
}

/// A drone the node reconciler decided and found nothing to do for: skipped while its object
/// stays at `resource_version` and `due` has not come.
#[derive(Debug, Clone)]
struct Seen {
    resource_version: String,
    due: Instant,
}
