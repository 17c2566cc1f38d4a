//! MQTT upgrade commands the daemon accepted (the broker has its PUBACK) whose install has not
//! ended: kept durably in the state store so a restart before they start does not lose them.
//! Written by the command handling, removed by the engine thread when the install ends.

use crate::store::Durable;
use flightnode_proto::error::chain;
use flightnode_proto::mqtt::{Command, UpgradeCommand, parse_command};

/// MQTT upgrade commands accepted but whose install has not ended yet, by upgrade id (the
/// command's own JSON). Written before the install is queued, removed by the engine thread when
/// the install job ends.
#[derive(Clone)]
pub struct Queued {
    tree: sled::Tree,
    store: Durable,
}

impl Queued {
    /// Opens the queue in `store`.
    pub fn open(store: &Durable) -> Result<Self, sled::Error> {
        Ok(Self {
            tree: store.db().open_tree("queued_commands")?,
            store: store.clone(),
        })
    }

    /// Keeps `cmd` durably (synced: the broker has its PUBACK, nothing would send it again)
    /// until [`Queued::remove`].
    pub fn put(&self, device_id: &str, cmd: &UpgradeCommand) {
        let json = Command::Upgrade(cmd.clone()).to_json(Some(device_id));
        let saved = self
            .tree
            .insert(cmd.upgrade_id.as_bytes(), json.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|_| self.store.sync().map_err(|e| chain(&e)));
        if let Err(e) = saved {
            tracing::warn!(upgrade_id = %cmd.upgrade_id,
                "cannot keep the accepted command in the state store (a restart before it starts would lose it): {e}");
        }
    }

    /// Forgets the command of `upgrade_id`.
    pub fn remove(&self, upgrade_id: &str) {
        let removed = self
            .tree
            .remove(upgrade_id.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|_| self.store.sync().map_err(|e| chain(&e)));
        if let Err(e) = removed {
            tracing::warn!(
                upgrade_id,
                "cannot drop an ended command from the state store: {e}"
            );
        }
    }

    /// The kept commands (one that no longer parses is dropped with a warning).
    pub fn all(&self, device_id: &str) -> Vec<UpgradeCommand> {
        let mut out = Vec::new();
        for (key, json) in self.tree.iter().filter_map(Result::ok) {
            match parse_command(&json, device_id) {
                Ok(Command::Upgrade(cmd)) => out.push(cmd),
                other => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), ?other, "dropping an unreadable queued command");
                    let _ = self.tree.remove(key);
                }
            }
        }
        out
    }
}
