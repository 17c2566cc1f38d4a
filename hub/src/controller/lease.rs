//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection does
//! it, in a small loop on kube-rs: every replica serves heartbeats; only the holder of the Lease
//! runs the reconcilers ([`crate::controller::reconcile`]).
//!
//! - Acquire: the Lease is absent, or its record (holder, renew time) has not changed for a whole
//!   `leaseDurationSeconds` **as observed by this replica's clock** (no trust in the other
//!   replica's clock). Every write is a `replace` carrying the resourceVersion it read, so two
//!   replicas cannot both win: the loser gets 409.
//! - Renew every `renew_every`. A leader that could not renew for `renew_deadline` steps down
//!   **before** anybody else may take over (`renew_deadline < duration`), so there is never a
//!   moment with two leaders dispatching.
//! - On shutdown the holder clears `holderIdentity`, so the next replica takes over at once.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
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

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What the loop last saw of somebody else's record, and when.
struct Observed {
    record: (Option<String>, Option<String>),
    at: Instant,
}

/// Runs the election until `shutdown` fires; `leader` says whether this replica leads.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        let now = Instant::now();
        match try_acquire_or_renew(&api, &config, &mut observed, now).await {
            Ok(true) => {
                last_renew = Some(now);
                if !*leader.borrow() {
                    tracing::info!(identity = %config.identity, lease = %config.name, "acquired the controller lease");
                    let _ = leader.send(true);
                }
            }
            Ok(false) => {
                if *leader.borrow() {
                    tracing::warn!(identity = %config.identity, "lost the controller lease");
                    let _ = leader.send(false);
                }
                last_renew = None;
            }
            Err(e) => {
                tracing::warn!(identity = %config.identity, error = %flightnode_proto::error::Chain(&e), "lease request failed");
                let expired = last_renew.is_none_or(|t| now.duration_since(t) >= config.renew_deadline);
                if *leader.borrow() && expired {
                    tracing::warn!(identity = %config.identity, "could not renew the lease in time; stepping down");
                    let _ = leader.send(false);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.renew_every) => {}
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                if *leader.borrow() {
                    let _ = leader.send(false);
                    release(&api, &config).await;
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
