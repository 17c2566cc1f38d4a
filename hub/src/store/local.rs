//! Local status sink: `FlightNode` objects and per-drone event logs in an embedded sled store,
//! so the hub runs on a laptop with no cluster. Every write is flushed before it counts.
//!
//! Trees: `objects` (`{namespace}/{name}` → `FlightNode` JSON), `events`
//! (`{namespace}/{name}\0{seq as u64 BE}` → [`EventRecord`] JSON). A write to a missing object
//! creates it (nobody pre-creates objects on a laptop).

use super::sink::{EventRecord, StatusSink, WriteError, WriteRequest};
use crate::api::flightnode::{FirmwareSync, FirmwareTarget, FlightNode, new_flightnode};
use crate::api::rollout::{FirmwareRollout, FirmwareRolloutStatus};
use futures_util::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::Path;

/// The sled-backed store.
#[derive(Clone)]
pub struct LocalStore {
    db: sled::Db,
    objects: sled::Tree,
    events: sled::Tree,
    rollouts: sled::Tree,
    rollout_events: sled::Tree,
    namespace: String,
    path: String,
}

fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn events_prefix(namespace: &str, name: &str) -> Vec<u8> {
    let mut key = object_key(namespace, name).into_bytes();
    key.push(0);
    key
}

fn internal(e: impl std::fmt::Display) -> WriteError {
    WriteError::Permanent {
        code: 500,
        message: e.to_string(),
    }
}

impl LocalStore {
    /// Opens (or creates) the store in `dir`; objects live in `namespace`.
    pub fn open(dir: &Path, namespace: &str) -> crate::Result<Self> {
        let path = dir.display().to_string();
        let sled_err = |source| crate::Error::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::open(dir).map_err(sled_err)?;
        let objects = db.open_tree("objects").map_err(sled_err)?;
        let events = db.open_tree("events").map_err(sled_err)?;
        let rollouts = db.open_tree("rollouts").map_err(sled_err)?;
        let rollout_events = db.open_tree("rollout-events").map_err(sled_err)?;
        Ok(LocalStore {
            db,
            objects,
            events,
            rollouts,
            rollout_events,
            namespace: namespace.to_owned(),
            path,
        })
    }

    /// The namespace objects are written to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// One object.
    pub fn get(&self, namespace: &str, name: &str) -> Option<FlightNode> {
        let key = object_key(namespace, name);
        let bytes = self.objects.get(&key).ok()??;
        decode("FlightNode", key.as_bytes(), &bytes)
    }

    /// All objects, in one namespace or all; sorted by namespace and name.
    pub fn list(&self, namespace: Option<&str>) -> Vec<FlightNode> {
        let iter = match namespace {
            Some(ns) => self.objects.scan_prefix(format!("{ns}/")),
            None => self.objects.iter(),
        };
        iter.filter_map(Result::ok)
            .filter_map(|(k, v)| decode("FlightNode", &k, &v))
            .collect()
    }

    /// The event log of one drone, oldest first.
    pub fn events(&self, namespace: &str, name: &str) -> Vec<EventRecord> {
        self.events
            .scan_prefix(events_prefix(namespace, name))
            .filter_map(Result::ok)
            .filter_map(|(k, v)| decode("event", &k, &v))
            .collect()
    }

    /// Highest resourceVersion handed out so far (for list metadata).
    pub fn resource_version(&self) -> String {
        self.db.generate_id().map(|id| id.to_string()).unwrap_or_default()
    }

    fn next_resource_version(&self) -> Result<String, WriteError> {
        self.db.generate_id().map(|id| id.to_string()).map_err(internal)
    }

    fn fresh(&self, name: &str, hardware_id: &str) -> Result<FlightNode, WriteError> {
        let mut node = new_flightnode(name, &self.namespace, hardware_id);
        let id = self.db.generate_id().map_err(internal)?;
        node.metadata.uid = Some(format!("local-{id:016x}"));
        node.metadata.generation = Some(1);
        node.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now()));
        Ok(node)
    }

    fn put(&self, mut node: FlightNode) -> Result<(), WriteError> {
        node.metadata.resource_version = Some(self.next_resource_version()?);
        let name = node.metadata.name.clone().unwrap_or_default();
        let bytes = serde_json::to_vec(&node).map_err(internal)?;
        self.objects
            .insert(object_key(&self.namespace, &name), bytes)
            .map_err(internal)?;
        Ok(())
    }

    /// Writes one status and its events, then flushes.
    pub async fn write(&self, req: &WriteRequest) -> Result<(), WriteError> {
        let mut node = match self.get(&self.namespace, &req.name) {
            Some(node) => node,
            None => self.fresh(&req.name, &req.hardware_id)?,
        };
        // NB: `firmwareSync` belongs to the node reconciler, not to heartbeat writes (on the
        // cluster they are two field managers); keep it.
        let sync = node.status.take().and_then(|s| s.firmware_sync);
        let mut status = req.status.clone();
        status.firmware_sync = sync;
        node.status = Some(status);
        self.put(node)?;
        for event in &req.events {
            let mut key = events_prefix(&self.namespace, &req.name);
            key.extend_from_slice(&event.seq.to_be_bytes());
            let bytes = serde_json::to_vec(event).map_err(internal)?;
            self.events.insert(key, bytes).map_err(internal)?;
        }
        self.flush().await?;
        Ok(())
    }

    /// Sets `spec.firmwareVersion` (bumps `metadata.generation`); `None` when the object is missing.
    pub async fn set_firmware_version(
        &self,
        name: &str,
        version: Option<String>,
    ) -> Result<Option<FlightNode>, WriteError> {
        let Some(mut node) = self.get(&self.namespace, name) else {
            return Ok(None);
        };
        if node.spec.firmware_version != version {
            node.spec.firmware_version = version;
            node.metadata.generation = Some(node.metadata.generation.unwrap_or(1) + 1);
        }
        self.put(node)?;
        self.flush().await?;
        Ok(self.get(&self.namespace, name))
    }
}

impl LocalStore {
    /// Makes every write so far durable. NB: sled 0.34's `flush_async` can leave concurrent
    /// callers waiting forever (sled#1308), and the controller writes several drones at once:
    /// the blocking flush runs on the blocking pool instead.
    async fn flush(&self) -> Result<(), WriteError> {
        let db = self.db.clone();
        let failed = |message: String| WriteError::Retryable {
            code: 0,
            retry_after: None,
            message: format!("flush {}: {message}", self.path),
        };
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Sets (or clears) `status.firmwareSync`; the object as stored, `None` when missing.
    pub async fn set_sync(
        &self,
        name: &str,
        sync: Option<FirmwareSync>,
    ) -> Result<Option<FlightNode>, WriteError> {
        let Some(mut node) = self.get(&self.namespace, name) else {
            return Ok(None);
        };
        node.status.get_or_insert_with(Default::default).firmware_sync = sync;
        self.put(node)?;
        self.flush().await?;
        Ok(self.get(&self.namespace, name))
    }

    /// Sets (or clears) `spec.firmware` and merges `annotations` (removing `drop`); bumps the
    /// generation when the spec changed. `None` when the object is missing.
    pub async fn set_target(
        &self,
        name: &str,
        target: Option<FirmwareTarget>,
        annotations: &BTreeMap<String, String>,
        drop: &[&str],
    ) -> Result<Option<FlightNode>, WriteError> {
        let Some(mut node) = self.get(&self.namespace, name) else {
            return Ok(None);
        };
        if node.spec.firmware != target {
            node.spec.firmware = target;
            node.metadata.generation = Some(node.metadata.generation.unwrap_or(1) + 1);
        }
        let notes = node.metadata.annotations.get_or_insert_with(BTreeMap::new);
        for key in drop {
            notes.remove(*key);
        }
        notes.extend(annotations.clone());
        self.put(node)?;
        self.flush().await?;
        Ok(self.get(&self.namespace, name))
    }

    /// Every rollout of a namespace (or all), by name.
    pub fn rollouts(&self, namespace: Option<&str>) -> Vec<FirmwareRollout> {
        let iter = match namespace {
            Some(ns) => self.rollouts.scan_prefix(format!("{ns}/")),
            None => self.rollouts.iter(),
        };
        iter.filter_map(Result::ok)
            .filter_map(|(k, v)| decode("FirmwareRollout", &k, &v))
            .collect()
    }

    /// One rollout.
    pub fn rollout(&self, namespace: &str, name: &str) -> Option<FirmwareRollout> {
        let key = object_key(namespace, name);
        let bytes = self.rollouts.get(&key).ok()??;
        decode("FirmwareRollout", key.as_bytes(), &bytes)
    }

    fn put_rollout(&self, mut r: FirmwareRollout) -> Result<FirmwareRollout, WriteError> {
        r.metadata.resource_version = Some(self.next_resource_version()?);
        let key = object_key(&self.namespace, &r.metadata.name.clone().unwrap_or_default());
        self.rollouts
            .insert(key, serde_json::to_vec(&r).map_err(internal)?)
            .map_err(internal)?;
        Ok(r)
    }

    /// Creates or replaces a rollout's spec and labels (like `kubectl apply`); the generation
    /// moves when the spec changed. The status is kept.
    pub async fn apply_rollout(&self, mut r: FirmwareRollout) -> Result<FirmwareRollout, WriteError> {
        let name = r.metadata.name.clone().unwrap_or_default();
        r.metadata.namespace = Some(self.namespace.clone());
        let stored = if let Some(mut old) = self.rollout(&self.namespace, &name) {
            if old.spec != r.spec {
                old.spec = r.spec;
                old.metadata.generation = Some(old.metadata.generation.unwrap_or(1) + 1);
            }
            old.metadata.labels = r.metadata.labels;
            // Operator requests and the editor's name ride in annotations.
            old.metadata.annotations = r.metadata.annotations;
            old
        } else {
            let id = self.db.generate_id().map_err(internal)?;
            r.metadata.uid = Some(format!("local-{id:016x}"));
            r.metadata.generation = Some(1);
            r.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now()));
            r.status = None;
            r
        };
        let out = self.put_rollout(stored)?;
        self.flush().await?;
        Ok(out)
    }

    /// Writes a rollout's status.
    pub async fn set_rollout_status(
        &self,
        name: &str,
        status: FirmwareRolloutStatus,
    ) -> Result<(), WriteError> {
        let Some(mut r) = self.rollout(&self.namespace, name) else {
            return Ok(());
        };
        r.status = Some(status);
        self.put_rollout(r)?;
        self.flush().await
    }

    /// Records a rollout event (the local store's Kubernetes Event).
    pub async fn add_rollout_event(&self, name: &str, event: RolloutEvent) -> Result<(), WriteError> {
        let id = self.db.generate_id().map_err(internal)?;
        let mut key = events_prefix(&self.namespace, name);
        key.extend_from_slice(&id.to_be_bytes());
        self.rollout_events
            .insert(key, serde_json::to_vec(&event).map_err(internal)?)
            .map_err(internal)?;
        self.flush().await
    }

    /// A rollout's events, oldest first.
    pub fn rollout_events(&self, namespace: &str, name: &str) -> Vec<RolloutEvent> {
        self.rollout_events
            .scan_prefix(events_prefix(namespace, name))
            .filter_map(Result::ok)
            .filter_map(|(k, v)| decode("rollout event", &k, &v))
            .collect()
    }
}

/// A rollout event as the local store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutEvent {
    /// RFC 3339.
    pub time: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `WaveAdvanced`, `Halted`, `Completed`.
    pub reason: String,
    /// What happened.
    pub note: String,
}

fn jiff_now() -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second()).unwrap_or(now)
}

impl StatusSink for LocalStore {
    fn write_status<'a>(&'a self, req: &'a WriteRequest) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(self.write(req))
    }

    fn create<'a>(&'a self, name: &'a str, hardware_id: &'a str) -> BoxFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            if self.get(&self.namespace, name).is_none() {
                let node = self.fresh(name, hardware_id)?;
                self.put(node)?;
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

/// Decodes a stored value. One that does not decode (written by another hub version, or
/// damaged) is logged and left out, not silently missing.
fn decode<T: serde::de::DeserializeOwned>(what: &str, key: &[u8], bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| {
            tracing::warn!(what, key = %String::from_utf8_lossy(key), error = %e,
                "local store: a stored value does not decode; left out");
        })
        .ok()
}
