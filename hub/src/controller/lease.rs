//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection does
//! it, in a small loop on kube-rs: every replica serves heartbeats; only the holder of the Lease
//! runs the reconcilers ([`crate::controller::reconcile`]).
//!
//! - Acquire: the Lease is absent, or its record (holder, renew time) has not changed for a whole
//!   `leaseDurationSeconds` **as observed by this replica's clock** (no trust in the other
//!   replica's clock). Every write is a `replace` carrying the resourceVersion it read, so two
//!   replicas cannot both win: the loser gets 409.
//! - Renew every `renew_every`; every round is time-boxed (kube's client has no read timeout).
//! - Leadership is a deadline, not a flag ([`Leadership`]): a successful round makes this replica
//!   the leader until the round's **start** plus `renew_deadline`, by its own monotonic clock.
//!   Nobody else may take over before the round's start plus `duration` (`renew_deadline <
//!   duration`), so there is never a moment with two leaders writing, whatever happens to this
//!   process: a hung API call, a paused process (SIGSTOP, a VM migration), a starved runtime. The
//!   controllers' writes and publishes check it each time ([`crate::controller::fence`]), and a
//!   step in flight is abandoned when it passes.
//! - On shutdown the controllers stop first; then the holder clears `holderIdentity`, so the next
//!   replica takes over at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// This replica (pod name).
    pub identity: String,
    /// `leaseDurationSeconds`.
    pub duration: Duration,
    /// Renew period.
    pub renew_every: Duration,
    /// Step down when no renew succeeded for this long (less than `duration`).
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    /// Defaults of client-go (15 s lease, 10 s deadline, 2 s retry).
    pub fn new(namespace: &str, identity: &str) -> Self {
        LeaseConfig {
            name: "flightnode-hub-controller".to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// Whether this replica leads: until an instant of its monotonic clock (`None`: it does not).
/// Cheap to clone; clones share the deadline.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<watch::Sender<Option<Instant>>>);

impl Leadership {
    /// Not leading (yet).
    pub fn follower() -> Self {
        Leadership(Arc::new(watch::Sender::new(None)))
    }

    /// Leading for good: one replica without election (the local store, or election turned off).
    pub fn always() -> Self {
        let forever = Instant::now() + Duration::from_hours(100 * 365 * 24);
        Leadership(Arc::new(watch::Sender::new(Some(forever))))
    }

    /// True while the deadline has not passed.
    pub fn is_leader(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Leads until `until`.
    pub fn renewed_until(&self, until: Instant) {
        self.0.send_replace(Some(until));
    }

    /// Stops leading now.
    pub fn step_down(&self) {
        self.0.send_replace(None);
    }

    /// Resolves once this replica does not lead: at once, when the deadline passes, or when it
    /// steps down.
    pub async fn lost(&self) {
        let mut rx = self.0.subscribe();
        loop {
            let until = *rx.borrow_and_update();
            match until {
                Some(t) if Instant::now() < t => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }

    /// Resolves once this replica leads.
    pub async fn gained(&self) {
        let mut rx = self.0.subscribe();
        loop {
            if self.is_leader() {
                return;
            }
            if rx.changed().await.is_err() {
                // NB: cannot happen while `self` holds the sender.
                return std::future::pending().await;
            }
        }
    }

    /// Changes of the deadline (for the leader gauge).
    pub fn subscribe(&self) -> watch::Receiver<Option<Instant>> {
        self.0.subscribe()
    }
}

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What the loop last saw of somebody else's record, and when.
struct Observed {
    record: (Option<String>, Option<String>),
    at: Instant,
}

/// Runs the election until `shutdown` fires; `leader` says whether (and until when) this
/// replica leads. Stop the controllers before firing `shutdown`: the Lease is released then.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leader: Leadership,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    // A round may take at most half the renew deadline, so one slow round never costs the lease.
    let round_timeout = (config.renew_deadline / 2).max(Duration::from_millis(100));
    let mut was_leader = false;
    loop {
        let started = Instant::now();
        let round = tokio::time::timeout(
            round_timeout,
            try_acquire_or_renew(&api, &config, &mut observed, started),
        );
        match round.await {
            Ok(Ok(true)) => {
                leader.renewed_until(started + config.renew_deadline);
                if !was_leader {
                    tracing::info!(identity = %config.identity, lease = %config.name, "acquired the controller lease");
                }
            }
            Ok(Ok(false)) => {
                leader.step_down();
                if was_leader {
                    tracing::warn!(identity = %config.identity, "lost the controller lease");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(identity = %config.identity, error = %flightnode_proto::error::Chain(&e), "lease request failed");
            }
            Err(_) => {
                tracing::warn!(identity = %config.identity, timeout = ?round_timeout, "lease request got no answer in time");
            }
        }
        if was_leader && !leader.is_leader() {
            tracing::warn!(identity = %config.identity, "could not renew the lease in time; stepped down");
        }
        was_leader = leader.is_leader();
        tokio::select! {
            () = tokio::time::sleep(config.renew_every) => {}
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                let held = leader.is_leader();
                leader.step_down();
                if held {
                    let _ = tokio::time::timeout(round_timeout, release(&api, &config)).await;
                }
                return;
            }
        }
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    let Ok(mut lease) = api.get(&config.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!(identity = %config.identity, "released the controller lease"),
        Err(e) => {
            tracing::warn!(identity = %config.identity, error = %flightnode_proto::error::Chain(&e), "lease release failed");
        }
    }
}

/// One round; `Ok(true)` when this replica holds the lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
    now: Instant,
) -> Result<bool, kube::Error> {
    let duration_secs = i32::try_from(config.duration.as_secs()).unwrap_or(15);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(micro_now()),
                renew_time: Some(micro_now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(config.identity.as_str());
    if !mine {
        let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0.to_string()));
        let seen_since = match observed {
            Some(o) if o.record == record => o.at,
            _ => {
                *observed = Some(Observed { record, at: now });
                now
            }
        };
        let lease_secs = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(config.duration.as_secs());
        let expired = now.duration_since(seen_since) >= Duration::from_secs(lease_secs);
        if holder.is_some() && !expired {
            return Ok(false);
        }
        spec.acquire_time = Some(micro_now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        tracing::info!(identity = %config.identity, previous = ?holder, "taking over the controller lease");
    }
    spec.holder_identity = Some(config.identity.clone());
    spec.lease_duration_seconds = Some(duration_secs);
    spec.renew_time = Some(micro_now());
    // NB: `replace` sends the resourceVersion read above: a concurrent writer makes this a 409.
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
