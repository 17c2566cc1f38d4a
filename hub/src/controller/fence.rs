//! Writes and publishes only while this replica leads: [`FencedStore`] and [`FencedCommands`]
//! wrap what the controllers write to and publish on, and check [`Leadership`] right before
//! each write and each command. A step that was already running when leadership passed (the
//! process was paused, an API call hung) then changes nothing: its remaining writes fail with
//! [`Error::NotLeader`] instead of landing over the new leader's.
//!
//! Reads pass through.

use crate::api::flightnode::{FirmwareSync, FlightNode};
use crate::api::rollout::{FirmwareRollout, FirmwareRolloutStatus};
use crate::controller::lease::Leadership;
use crate::controller::mqtt::CommandSink;
use crate::store::fleet::{Applied, Dispatch, FleetStore};
use crate::{Error, Result};
use flightnode_proto::mqtt::Command;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::Notify;

fn check(leader: &Leadership, what: impl FnOnce() -> String) -> Result<()> {
    if leader.is_leader() {
        Ok(())
    } else {
        Err(Error::NotLeader { what: what() })
    }
}

/// A [`FleetStore`] whose writes need leadership.
pub struct FencedStore {
    inner: Arc<dyn FleetStore>,
    leader: Leadership,
}

impl FencedStore {
    /// Fences `inner` by `leader`.
    pub fn new(inner: Arc<dyn FleetStore>, leader: Leadership) -> Self {
        FencedStore { inner, leader }
    }
}

impl FleetStore for FencedStore {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<Arc<FlightNode>>>> {
        self.inner.nodes()
    }

    fn rollouts(&self) -> BoxFuture<'_, Result<Vec<FirmwareRollout>>> {
        self.inner.rollouts()
    }

    fn write_sync<'a>(&'a self, node: &'a str, sync: Option<&'a FirmwareSync>) -> BoxFuture<'a, Result<()>> {
        match check(&self.leader, || format!("status.firmwareSync of {node}")) {
            Ok(()) => self.inner.write_sync(node, sync),
            Err(e) => Box::pin(async { Err(e) }),
        }
    }

    fn apply_target<'a>(
        &'a self,
        node: &'a str,
        rollout: &'a str,
        dispatch: Option<&'a Dispatch>,
    ) -> BoxFuture<'a, Result<Applied>> {
        match check(&self.leader, || {
            format!("spec.firmware of {node} (rollout {rollout})")
        }) {
            Ok(()) => self.inner.apply_target(node, rollout, dispatch),
            Err(e) => Box::pin(async { Err(e) }),
        }
    }

    fn write_rollout_status<'a>(
        &'a self,
        rollout: &'a str,
        status: &'a FirmwareRolloutStatus,
    ) -> BoxFuture<'a, Result<()>> {
        match check(&self.leader, || format!("status of rollout {rollout}")) {
            Ok(()) => self.inner.write_rollout_status(rollout, status),
            Err(e) => Box::pin(async { Err(e) }),
        }
    }

    fn event<'a>(
        &'a self,
        rollout: &'a FirmwareRollout,
        warning: bool,
        reason: &'a str,
        note: &'a str,
    ) -> BoxFuture<'a, ()> {
        if self.leader.is_leader() {
            self.inner.event(rollout, warning, reason, note)
        } else {
            tracing::info!(reason, "not the leader: event not recorded");
            Box::pin(async {})
        }
    }

    fn changed(&self) -> Arc<Notify> {
        self.inner.changed()
    }
}

/// A [`CommandSink`] that publishes only while this replica leads.
pub struct FencedCommands {
    inner: Arc<dyn CommandSink>,
    leader: Leadership,
}

impl FencedCommands {
    /// Fences `inner` by `leader`.
    pub fn new(inner: Arc<dyn CommandSink>, leader: Leadership) -> Self {
        FencedCommands { inner, leader }
    }
}

impl CommandSink for FencedCommands {
    fn send<'a>(&'a self, device_id: &'a str, cmd: &'a Command) -> BoxFuture<'a, Result<()>> {
        match check(&self.leader, || {
            format!("command {} to {device_id}", cmd.upgrade_id())
        }) {
            Ok(()) => self.inner.send(device_id, cmd),
            Err(e) => Box::pin(async { Err(e) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::time::Instant;

    #[derive(Default)]
    struct Sent(Mutex<Vec<String>>);

    impl CommandSink for Sent {
        fn send<'a>(&'a self, device_id: &'a str, _: &'a Command) -> BoxFuture<'a, Result<()>> {
            self.0.lock().unwrap().push(device_id.to_owned());
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_goes_out_once_the_lease_deadline_passed() {
        let leader = Leadership::follower();
        let sent = Arc::new(Sent::default());
        let fenced = FencedCommands::new(sent.clone(), leader.clone());
        let cancel = Command::Cancel {
            upgrade_id: "u-1".into(),
        };
        assert!(matches!(
            fenced.send("d1", &cancel).await,
            Err(Error::NotLeader { .. })
        ));
        leader.renewed_until(Instant::now() + Duration::from_secs(10));
        fenced.send("d2", &cancel).await.unwrap();
        // No renewal: the process was paused, or the Lease calls hang.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!leader.is_leader());
        let e = fenced.send("d3", &cancel).await.unwrap_err();
        assert!(e.to_string().contains("not the leader"), "{e}");
        assert_eq!(*sent.0.lock().unwrap(), vec!["d2".to_owned()]);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_resolves_when_the_deadline_passes_without_a_renewal() {
        let leader = Leadership::follower();
        leader.renewed_until(Instant::now() + Duration::from_secs(10));
        let lost = tokio::spawn({
            let leader = leader.clone();
            async move { leader.lost().await }
        });
        tokio::time::advance(Duration::from_secs(5)).await;
        // A renewal moves the deadline on.
        leader.renewed_until(Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(6)).await;
        tokio::task::yield_now().await;
        assert!(!lost.is_finished());
        tokio::time::advance(Duration::from_secs(5)).await;
        tokio::time::timeout(Duration::from_secs(1), lost)
            .await
            .expect("lost() resolves at the deadline")
            .unwrap();
    }
}
