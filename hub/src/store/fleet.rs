//! What the controllers read and write, on either store: [`FleetStore`], with [`KubeFleet`]
//! (watch caches, server-side apply with one field manager per writer, events.k8s.io/v1 Events)
//! and the embedded local store ([`crate::store::local::LocalStore`]).
//!
//! Field managers, so nobody fights over a field:
//! - `flightnode-hub`: heartbeat status (`status.*` but `firmwareSync`);
//! - `flightnode-hub-reconciler` ([`RECONCILER_MANAGER`]): `status.firmwareSync`;
//! - [`crate::api::rollout::FIELD_MANAGER`]: `spec.firmware` and the rollout annotations of the drones
//!   it dispatched (applied **without** force: a field another manager owns is a conflict, and
//!   the rollout leaves that drone alone), and the rollout's status.

use crate::api::flightnode::{API_VERSION, FirmwareSync, FirmwareTarget, FlightNode, KIND};
use crate::api::rollout::{FirmwareRollout, FirmwareRolloutStatus};
use crate::{Error, Result};
use futures_util::future::BoxFuture;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// Field manager of `status.firmwareSync`.
pub const RECONCILER_MANAGER: &str = "flightnode-hub-reconciler";

/// A rollout's write of `spec.firmware` into one drone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The firmware.
    pub target: FirmwareTarget,
    /// Annotations that go with it (rollout, dispatch time).
    pub annotations: BTreeMap<String, String>,
}

/// How a spec apply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Written.
    Ok,
    /// Another field manager owns `spec.firmware`; left alone.
    Conflict,
    /// The object is gone.
    Missing,
}

/// The controllers' view of the world.
pub trait FleetStore: Send + Sync + 'static {
    /// Every `FlightNode` of the namespace.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<FlightNode>>>;
    /// Every `FirmwareRollout` of the namespace.
    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>>;
    /// Sets (or with `None` clears) `status.firmwareSync` of a drone.
    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>>;
    /// Writes (or with `None` takes back) a rollout's `spec.firmware` of a drone.
    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>>;
    /// Writes a rollout's status.
    fn write_rollout_status<'a>(
        &'a self,
        rollout: &'a str,
        status: &'a FirmwareRolloutStatus,
    ) -> BoxFuture<'a, Result<()>>;
    /// Records an event about a rollout (best effort).
    fn event<'a>(
        &'a self,
        rollout: &'a FirmwareRollout,
        warning: bool,
        reason: &'a str,
        note: &'a str,
    ) -> BoxFuture<'a, ()>;
    /// Woken when something the controllers read changed.
    fn changed(&self) -> Arc<Notify>;
}

/// The Kubernetes store: reflector caches of both kinds in one namespace.
pub struct KubeFleet {
    client: Client,
    namespace: String,
    nodes: Store<FlightNode>,
    rollouts: Store<FirmwareRollout>,
    recorder: Recorder,
    changed: Arc<Notify>,
}

fn spawn_reflector<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    use futures_util::StreamExt;
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %flightnode_proto::error::Chain(&e), "controller watch failed; retrying");
                }
            }
        }
    });
    reader
}

impl KubeFleet {
    /// Starts the watch caches and waits until both listed once.
    pub async fn start(client: Client, namespace: &str, instance: &str) -> Result<Self> {
        let changed = Arc::new(Notify::new());
        let nodes = spawn_reflector(
            Api::<FlightNode>::namespaced(client.clone(), namespace),
            Arc::clone(&changed),
        );
        let rollouts = spawn_reflector(
            Api::<FirmwareRollout>::namespaced(client.clone(), namespace),
            Arc::clone(&changed),
        );
        nodes.wait_until_ready().await.map_err(|e| Error::KubeSetup {
            what: "FlightNode cache",
            source: e.into(),
        })?;
        rollouts.wait_until_ready().await.map_err(|e| Error::KubeSetup {
            what: "FirmwareRollout cache",
            source: e.into(),
        })?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "flightnode-hub".to_owned(),
                instance: Some(instance.to_owned()),
            },
        );
        Ok(KubeFleet {
            client,
            namespace: namespace.to_owned(),
            nodes,
            rollouts,
            recorder,
            changed,
        })
    }

    fn node_api(&self) -> Api<FlightNode> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl FleetStore for KubeFleet {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<FlightNode>>> {
        Box::pin(async move { Ok(self.nodes.state().iter().map(|n| (**n).clone()).collect()) })
    }

    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>> {
        Box::pin(async move { Ok(self.rollouts.state().iter().map(|r| (**r).clone()).collect()) })
    }

    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // An apply without the field gives it up, which removes it: that is the clear.
            let status = match sync {
                Some(s) => serde_json::json!({ "firmwareSync": s }),
                None => serde_json::json!({}),
            };
            let body = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
            self.node_api()
                .patch_status(
                    node,
                    &PatchParams::apply(RECONCILER_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await
                .map(|_| ())
                .map_err(Error::Kube)
        })
    }

    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>> {
        Box::pin(async move {
            let body = match dispatch {
                Some(d) => serde_json::json!({
                    "apiVersion": API_VERSION, "kind": KIND,
                    "metadata": { "name": node, "annotations": d.annotations },
                    "spec": { "firmware": d.target },
                }),
                None => serde_json::json!({
                    "apiVersion": API_VERSION, "kind": KIND, "metadata": { "name": node },
                }),
            };
            // NB: no force: a person's `kubectl` edit of spec.firmware wins over the rollout.
            let params = PatchParams::apply(crate::api::rollout::FIELD_MANAGER);
            match self.node_api().patch(node, &params, &Patch::Apply(body)).await {
                Ok(_) => Ok(Applied::Ok),
                Err(e) if is_status(&e, 409) => Ok(Applied::Conflict),
                Err(e) if is_status(&e, 404) => Ok(Applied::Missing),
                Err(e) => Err(Error::Kube(e)),
            }
        })
    }

    fn write_rollout_status<'a>(
        &'a self,
        rollout: &'a str,
        status: &'a FirmwareRolloutStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let api: Api<FirmwareRollout> = Api::namespaced(self.client.clone(), &self.namespace);
            let body = serde_json::json!({
                "apiVersion": API_VERSION, "kind": "FirmwareRollout", "status": status,
            });
            api.patch_status(
                rollout,
                &PatchParams::apply(crate::api::rollout::FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map(|_| ())
            .map_err(Error::Kube)
        })
    }

    fn event<'a>(
        &'a self,
        rollout: &'a FirmwareRollout,
        warning: bool,
        reason: &'a str,
        note: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ev = Event {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: reason.to_owned(),
                note: Some(note.chars().take(1000).collect()),
                action: "Rollout".to_owned(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &rollout.object_ref(&())).await {
                tracing::warn!(rollout = %rollout.name_any(), reason, error = %flightnode_proto::error::Chain(&e), "event not recorded");
            }
        })
    }

    fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }
}

/// Called after the local store changed a `FlightNode` (the hub refreshes its spec cache).
pub type OnNodeChange = Arc<dyn Fn(&FlightNode) + Send + Sync>;

/// The embedded local store as a [`FleetStore`] (one process, no field managers: the same
/// ownership is kept by writing only the fields each writer owns).
pub struct LocalFleet {
    store: crate::store::local::LocalStore,
    on_change: OnNodeChange,
    changed: Arc<Notify>,
}

impl LocalFleet {
    /// Wraps a local store.
    pub fn new(store: crate::store::local::LocalStore, on_change: OnNodeChange) -> Self {
        LocalFleet {
            store,
            on_change,
            changed: Arc::new(Notify::new()),
        }
    }

    fn report(&self, node: Option<FlightNode>) -> Applied {
        match node {
            Some(n) => {
                (self.on_change)(&n);
                Applied::Ok
            }
            None => Applied::Missing,
        }
    }
}

#[allow(clippy::needless_pass_by_value, reason = "used as `map_err(local_err)`")]
fn local_err(e: crate::store::sink::WriteError) -> Error {
    Error::Invalid(format!("local store: {e}"))
}

impl FleetStore for LocalFleet {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<FlightNode>>> {
        Box::pin(async move { Ok(self.store.list(Some(self.store.namespace()))) })
    }

    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>> {
        Box::pin(async move { Ok(self.store.rollouts(Some(self.store.namespace()))) })
    }

    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let n = self
                .store
                .set_sync(node, sync.cloned())
                .await
                .map_err(local_err)?;
            self.report(n);
            Ok(())
        })
    }

    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>> {
        Box::pin(async move {
            let Some(current) = self.store.get(self.store.namespace(), node) else {
                return Ok(Applied::Missing);
            };
            let ours = current
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(crate::api::rollout::ANNOTATION_ROLLOUT));
            // The same rule as the cluster's field ownership: spec.firmware set by someone else
            // (no rollout annotation) is theirs.
            if current.spec.firmware.is_some() && !ours {
                return Ok(Applied::Conflict);
            }
            let keys = [
                crate::api::rollout::ANNOTATION_ROLLOUT,
                crate::api::rollout::ANNOTATION_DISPATCHED,
            ];
            let n = match dispatch {
                Some(d) => self
                    .store
                    .set_target(node, Some(d.target.clone()), &d.annotations, &keys)
                    .await
                    .map_err(local_err)?,
                None => self
                    .store
                    .set_target(node, None, &BTreeMap::new(), &keys)
                    .await
                    .map_err(local_err)?,
            };
            Ok(self.report(n))
        })
    }

    fn write_rollout_status<'a>(
        &'a self,
        rollout: &'a str,
        status: &'a FirmwareRolloutStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.store
                .set_rollout_status(rollout, status.clone())
                .await
                .map_err(local_err)
        })
    }

    fn event<'a>(
        &'a self,
        rollout: &'a FirmwareRollout,
        warning: bool,
        reason: &'a str,
        note: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let event = crate::store::local::RolloutEvent {
                time: crate::decide::status::rfc3339(time::OffsetDateTime::now_utc()),
                type_: if warning { "Warning" } else { "Normal" }.to_owned(),
                reason: reason.to_owned(),
                note: note.to_owned(),
            };
            if let Err(e) = self.store.add_rollout_event(&rollout.name_any(), event).await {
                tracing::warn!(rollout = %rollout.name_any(), error = %flightnode_proto::error::Chain(&e), "event not recorded");
            }
        })
    }

    fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }
}
