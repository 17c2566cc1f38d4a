//! What the controllers read and write, on either store: [`FleetStore`], with [`KubeFleet`]
//! (watch caches, server-side apply with one field manager per writer, events.k8s.io/v1 Events)
//! and the embedded local store ([`crate::store::local::LocalStore`]).
//!
//! Field managers, so nobody fights over a field:
//! - `flightnode-hub`: heartbeat status (`status.*` but `firmwareSync`);
//! - `flightnode-hub-reconciler` ([`RECONCILER_MANAGER`]): `status.firmwareSync`;
//! - `flightnode-rollout/NAME` ([`crate::api::rollout::field_manager`]), one per rollout:
//!   `spec.firmware` and the rollout annotations of the drones that rollout dispatched. Applied
//!   **without** force, except when it takes a drone over from another rollout (or from its own
//!   earlier target), and then only on condition of the resourceVersion the decision was made on
//!   ([`Dispatch::take_over`]): a `spec.firmware` a person wrote is never overwritten. A
//!   call-back is an apply without the fields, so it gives up only what this rollout wrote.
//! - [`crate::api::rollout::FIELD_MANAGER`]: the rollouts' status; and, from hubs before the
//!   per-rollout managers, drones' `spec.firmware` (a call-back releases it as well).

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
    /// Annotations that go with it (rollout, target hash, dispatch time).
    pub annotations: BTreeMap<String, String>,
    /// The drone carries another rollout's (or this rollout's earlier) `spec.firmware`: take it
    /// over (a forced apply), but only if the object is still at this resourceVersion. `None`:
    /// a plain apply, where any field another manager owns is a conflict.
    pub take_over: Option<String>,
}

/// How a spec apply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Written.
    Ok,
    /// Another field manager owns `spec.firmware`, or the object changed since the decision to
    /// take it over; left alone (the next step reads it again).
    Conflict,
    /// The object is gone.
    Missing,
}

/// The controllers' view of the world.
pub trait FleetStore: Send + Sync + 'static {
    /// Every `FlightNode` of the namespace, shared with the store's cache: a step reads the
    /// whole fleet without copying it.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Arc<FlightNode>>>>;
    /// Every `FirmwareRollout` of the namespace.
    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>>;
    /// Sets (or with `None` clears) `status.firmwareSync` of a drone.
    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>>;
    /// Writes (or with `None` takes back) rollout `rollout`'s `spec.firmware` of a drone. A
    /// take-back removes only what that rollout wrote.
    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        rollout: &'a str,
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

/// The Kubernetes store: reflector caches of both kinds in one namespace, and what this store
/// wrote on top of them until the caches catch up ([`Written`]).
pub struct KubeFleet {
    client: Client,
    namespace: String,
    nodes: Store<FlightNode>,
    rollouts: Store<FirmwareRollout>,
    recorder: Recorder,
    changed: Arc<Notify>,
    written_nodes: Written<FlightNode>,
    written_rollouts: Written<FirmwareRollout>,
}

/// Read-your-writes over a watch cache (the expectations of a controller): every object this
/// store wrote, as the API server returned it, with the resourceVersion the cache held when the
/// write went out. A read takes the written object while the cache still holds that version,
/// and forgets it as soon as the cache moved on. Without it, the step after a dispatch can read
/// the drone as not dispatched yet (and dispatch past `maxConcurrent`), and the step after a
/// status write can read the old status (and emit `WaveAdvanced` or `Halted` twice).
pub struct Written<K>(std::sync::Mutex<WrittenMap<K>>);

/// Object name → (the cached resourceVersion the write went out over, the written object).
type WrittenMap<K> = BTreeMap<String, (Option<String>, Arc<K>)>;

impl<K> Default for Written<K> {
    fn default() -> Self {
        Written(std::sync::Mutex::new(BTreeMap::new()))
    }
}

impl<K: Resource + Clone> Written<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, WrittenMap<K>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `object` as written over the cached version `cached_rv`.
    pub fn record(&self, cached_rv: Option<String>, object: K) {
        let name = object.meta().name.clone().unwrap_or_default();
        let mut map = self.lock();
        // A second write before the cache caught up with the first keeps the first one's
        // cached version: the cache may show neither write yet.
        let rv = match map.get(&name) {
            Some((rv, last)) if last.meta().resource_version != cached_rv => rv.clone(),
            _ => cached_rv,
        };
        map.insert(name, (rv, Arc::new(object)));
    }

    /// `cached` with this store's own writes on top, where the cache has not caught up yet.
    pub fn overlay(&self, cached: Vec<Arc<K>>) -> Vec<Arc<K>> {
        let mut map = self.lock();
        cached
            .into_iter()
            .map(|c| {
                let name = c.meta().name.clone().unwrap_or_default();
                match map.get(&name) {
                    Some((rv, written)) if *rv == c.meta().resource_version => Arc::clone(written),
                    Some(_) => {
                        map.remove(&name);
                        c
                    }
                    None => c,
                }
            })
            .collect()
    }
}

/// Keeps of a drone's `managedFields` only what the controllers read: the entries that hold a
/// field of `spec.firmware` (who owns the target, [`crate::controller::rollout::drone`]) and
/// those of the shared rollout manager of older hubs (a call-back releases them). The rest (the
/// creator's fields, the heartbeat status, `firmwareSync`) is most of a cached drone, and nobody
/// reads it.
pub fn trim_managed_fields(node: &mut FlightNode) {
    if let Some(entries) = node.metadata.managed_fields.as_mut() {
        entries.retain(|m| {
            m.manager.as_deref() == Some(crate::api::rollout::FIELD_MANAGER)
                || m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:firmware").is_some())
        });
    }
}

fn spawn_reflector<K>(api: Api<K>, changed: Arc<Notify>, trim: fn(&mut K)) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    use futures_util::StreamExt;
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).modify(trim))
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
            trim_managed_fields,
        );
        let rollouts = spawn_reflector(
            Api::<FirmwareRollout>::namespaced(client.clone(), namespace),
            Arc::clone(&changed),
            |_| {},
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
            written_nodes: Written::default(),
            written_rollouts: Written::default(),
        })
    }

    fn cached_node_rv(&self, node: &str) -> Option<String> {
        let key = reflector::ObjectRef::new(node).within(&self.namespace);
        self.nodes
            .get(&key)
            .and_then(|n| n.metadata.resource_version.clone())
    }

    fn node_api(&self) -> Api<FlightNode> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl FleetStore for KubeFleet {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Arc<FlightNode>>>> {
        Box::pin(async move { Ok(self.written_nodes.overlay(self.nodes.state())) })
    }

    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>> {
        Box::pin(async move {
            let rollouts = self.written_rollouts.overlay(self.rollouts.state());
            Ok(rollouts.into_iter().map(Arc::unwrap_or_clone).collect())
        })
    }

    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // An apply without the field gives it up, which removes it: that is the clear.
            let status = match sync {
                Some(s) => serde_json::json!({ "firmwareSync": s }),
                None => serde_json::json!({}),
            };
            let body = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
            let cached_rv = self.cached_node_rv(node);
            let mut written = self
                .node_api()
                .patch_status(
                    node,
                    &PatchParams::apply(RECONCILER_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await
                .map_err(Error::Kube)?;
            trim_managed_fields(&mut written);
            self.written_nodes.record(cached_rv, written);
            Ok(())
        })
    }

    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        rollout: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>> {
        Box::pin(async move {
            let manager = crate::api::rollout::field_manager(rollout);
            let mut params = PatchParams::apply(&manager);
            let body = match dispatch {
                Some(d) => {
                    let mut metadata = serde_json::json!({ "name": node, "annotations": d.annotations });
                    if let Some(rv) = &d.take_over {
                        // NB: forced only over what was read: an edit since then makes the
                        // precondition fail (409) instead of being overwritten.
                        metadata["resourceVersion"] = serde_json::json!(rv);
                        params = params.force();
                    }
                    serde_json::json!({
                        "apiVersion": API_VERSION, "kind": KIND,
                        "metadata": metadata,
                        "spec": { "firmware": d.target },
                    })
                }
                None => serde_json::json!({
                    "apiVersion": API_VERSION, "kind": KIND, "metadata": { "name": node },
                }),
            };
            let cached_rv = self.cached_node_rv(node);
            let applied = match self.node_api().patch(node, &params, &Patch::Apply(&body)).await {
                Ok(mut written) => {
                    trim_managed_fields(&mut written);
                    self.written_nodes.record(cached_rv.clone(), written);
                    Applied::Ok
                }
                Err(e) if is_status(&e, 409) => return Ok(Applied::Conflict),
                Err(e) if is_status(&e, 404) => return Ok(Applied::Missing),
                Err(e) => return Err(Error::Kube(e)),
            };
            // A call-back of a drone dispatched by a hub from before the per-rollout managers:
            // the shared manager still holds its fields, and would keep spec.firmware alive.
            let key = reflector::ObjectRef::new(node).within(&self.namespace);
            let legacy = dispatch.is_none()
                && self.nodes.get(&key).is_some_and(|n| {
                    n.metadata
                        .managed_fields
                        .iter()
                        .flatten()
                        .any(|m| m.manager.as_deref() == Some(crate::api::rollout::FIELD_MANAGER))
                });
            if legacy {
                let params = PatchParams::apply(crate::api::rollout::FIELD_MANAGER);
                match self.node_api().patch(node, &params, &Patch::Apply(&body)).await {
                    Ok(mut written) => {
                        trim_managed_fields(&mut written);
                        self.written_nodes.record(cached_rv, written);
                    }
                    Err(e) if is_status(&e, 404) => return Ok(Applied::Missing),
                    Err(e) => return Err(Error::Kube(e)),
                }
            }
            Ok(applied)
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
            let key = reflector::ObjectRef::new(rollout).within(&self.namespace);
            let cached_rv = self
                .rollouts
                .get(&key)
                .and_then(|r| r.metadata.resource_version.clone());
            let written = api
                .patch_status(
                    rollout,
                    &PatchParams::apply(crate::api::rollout::FIELD_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await
                .map_err(Error::Kube)?;
            self.written_rollouts.record(cached_rv, written);
            Ok(())
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
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Arc<FlightNode>>>> {
        Box::pin(async move {
            let nodes = self.store.list(Some(self.store.namespace()));
            Ok(nodes.into_iter().map(Arc::new).collect())
        })
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
        rollout: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>> {
        Box::pin(async move {
            let Some(current) = self.store.get(self.store.namespace(), node) else {
                return Ok(Applied::Missing);
            };
            // The cluster's field ownership, kept here by the rollout annotation: spec.firmware
            // set without one is a person's; one naming another rollout is that rollout's, taken
            // over only when meant and only as it was read.
            let owner = current
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::api::rollout::ANNOTATION_ROLLOUT))
                .map(|v| v.split('/').next().unwrap_or("").to_owned());
            let ours = owner.as_deref() == Some(rollout);
            let keys = [
                crate::api::rollout::ANNOTATION_ROLLOUT,
                crate::api::rollout::ANNOTATION_TARGET,
                crate::api::rollout::ANNOTATION_DISPATCHED,
            ];
            let n = match dispatch {
                Some(d) => {
                    if let Some(rv) = &d.take_over
                        && current.metadata.resource_version.as_ref() != Some(rv)
                    {
                        return Ok(Applied::Conflict);
                    }
                    let foreign = owner.is_none() || (!ours && d.take_over.is_none());
                    if current.spec.firmware.is_some() && foreign {
                        return Ok(Applied::Conflict);
                    }
                    self.store
                        .set_target(node, Some(d.target.clone()), &d.annotations, &keys)
                        .await
                        .map_err(local_err)?
                }
                // Nothing of this rollout's to take back: like an apply that owns no field.
                None if !ours => return Ok(Applied::Ok),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::flightnode::FlightNodeSpec;

    fn node(name: &str, rv: &str, version: Option<&str>) -> FlightNode {
        let mut n = FlightNode::new(name, FlightNodeSpec::default());
        n.metadata.resource_version = Some(rv.into());
        n.spec.firmware = version.map(|v| FirmwareTarget {
            version: v.into(),
            url: format!("http://fw/{v}.fnb"),
            allow_downgrade: false,
            retry: 0,
        });
        n
    }

    fn version(nodes: &[Arc<FlightNode>]) -> Option<String> {
        nodes[0].spec.firmware.as_ref().map(|f| f.version.clone())
    }

    #[test]
    fn a_write_is_read_back_until_the_cache_catches_up() {
        let w = Written::default();
        w.record(Some("5".into()), node("d1", "6", Some("2.0.0")));
        // The cache still holds version 5: the dispatch is read back.
        assert_eq!(
            version(&w.overlay(vec![Arc::new(node("d1", "5", None))])).as_deref(),
            Some("2.0.0")
        );
        // A second write before the cache caught up keeps the first's baseline.
        w.record(Some("5".into()), node("d1", "7", Some("2.1.0")));
        assert_eq!(
            version(&w.overlay(vec![Arc::new(node("d1", "5", None))])).as_deref(),
            Some("2.1.0")
        );
        // The cache moved on: it wins, and the overlay is gone for good.
        assert_eq!(
            version(&w.overlay(vec![Arc::new(node("d1", "7", Some("2.1.0")))])).as_deref(),
            Some("2.1.0")
        );
        assert_eq!(version(&w.overlay(vec![Arc::new(node("d1", "5", None))])), None);
    }

    /// What the cache keeps of managedFields still tells who owns spec.firmware.
    #[test]
    fn trimmed_managed_fields_keep_the_owners_of_the_target() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let entry = |manager: &str, fields: serde_json::Value| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        };
        let mut n = node("d1", "5", Some("2.0.0"));
        n.metadata.managed_fields = Some(vec![
            entry("kubectl", serde_json::json!({ "f:spec": { "f:hardwareId": {} } })),
            entry(
                "flightnode-hub",
                serde_json::json!({ "f:status": { "f:conditions": {} } }),
            ),
            entry(
                RECONCILER_MANAGER,
                serde_json::json!({ "f:status": { "f:firmwareSync": {} } }),
            ),
            entry(
                "flightnode-rollout/fw",
                serde_json::json!({ "f:spec": { "f:firmware": { "f:version": {} } } }),
            ),
            entry(
                "kubectl-edit",
                serde_json::json!({ "f:spec": { "f:firmware": { "f:url": {} } } }),
            ),
            entry(
                crate::api::rollout::FIELD_MANAGER,
                serde_json::json!({ "f:metadata": {} }),
            ),
        ]);
        trim_managed_fields(&mut n);
        let kept: Vec<_> = n
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.as_deref())
            .collect();
        assert_eq!(
            kept,
            [
                "flightnode-rollout/fw",
                "kubectl-edit",
                crate::api::rollout::FIELD_MANAGER
            ]
        );
    }
}
