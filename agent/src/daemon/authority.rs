//! Which MQTT commands this drone obeys: only what the hub signed for it, inside the command's
//! validity by the trusted clock, and never an upgrade id it already saw for another bundle.
//!
//! A broker credential is enough to publish on `firmware/<id>/upgrade`; the hub's command key
//! is not. So a signed command must verify with one of `[commands] hub_keys`, name this device,
//! and have `not_after` at or after the trusted time ([`crate::clock`]). An accepted command's
//! `issued_at` raises the clock's floor: the hub vouched for that time. Unsigned commands (a
//! bare URL, plain JSON) are obeyed only with `insecure_accept_unsigned`, the documented way
//! to keep an unsigned fleet working while it migrates.
//!
//! Upgrade ids are bound to their bundle URL when first accepted (kept in sled, bounded): a
//! command replayed with the same id and another target is refused, even when validly signed.

use crate::bundle::TrustedKeys;
use crate::clock::Clock;
use crate::store::Durable;
use flightnode_proto::codes::CommandRefusal;
use flightnode_proto::error::Chain;
use flightnode_proto::mqtt::Envelope;
use flightnode_proto::mqtt::{Command, StatusError};

/// Upgrade id bindings kept; the oldest (by `issued_at`) goes first.
const BINDINGS_CAP: usize = 4096;

/// The rules for MQTT commands.
pub struct Authority {
    device_id: String,
    keys: Option<TrustedKeys>,
    insecure: bool,
    clock: Clock,
    bindings: sled::Tree,
    store: Durable,
}

fn refuse(code: CommandRefusal, message: String) -> StatusError {
    StatusError::refused(code, message)
}

impl Authority {
    /// The rules for `device_id`: hub keys (none = no signed command verifies), whether unsigned
    /// commands pass, and the trusted clock.
    pub fn open(
        store: &Durable,
        device_id: &str,
        keys: Option<TrustedKeys>,
        insecure: bool,
        clock: Clock,
    ) -> Result<Self, sled::Error> {
        if keys.is_none() && !insecure {
            tracing::warn!(
                device_id,
                "no [commands] hub_keys configured: every MQTT command will be refused; \
                 list the hub's command public key there (or, insecurely, set insecure_accept_unsigned)"
            );
        } else if insecure {
            tracing::warn!(
                device_id,
                "[commands] insecure_accept_unsigned is set: anyone who can publish on the upgrade topic can install bundles"
            );
        }
        Ok(Self {
            device_id: device_id.to_owned(),
            keys,
            insecure,
            clock,
            bindings: store.db().open_tree("command_bindings")?,
            store: store.clone(),
        })
    }

    /// The command to obey, or why not (the upgrade id it named travels with the refusal).
    pub fn check(&self, envelope: Envelope) -> Result<Command, StatusError> {
        let Some(sig) = envelope.signature else {
            if self.insecure {
                return Ok(envelope.command);
            }
            return Err(refuse(
                CommandRefusal::CommandUnsigned,
                "unsigned command refused: only commands signed by the hub are obeyed \
                 (publish through the hub, or set [commands] insecure_accept_unsigned on a bench)"
                    .into(),
            ));
        };
        let verified = self
            .keys
            .as_ref()
            .is_some_and(|keys| keys.with_id(&sig.key_id).any(|k| sig.verifies_with(k)));
        if !verified {
            let trusted = self
                .keys
                .as_ref()
                .map_or_else(|| "none".into(), |k| k.ids().join(", "));
            return Err(refuse(
                CommandRefusal::CommandUntrusted,
                format!(
                    "command signature by key {} does not verify with a hub key trusted here (hub_keys: {trusted})",
                    sig.key_id
                ),
            ));
        }
        if sig.device_id != self.device_id {
            return Err(refuse(
                CommandRefusal::CommandWrongDevice,
                format!(
                    "command was signed for device {:?}, this is {:?}",
                    sig.device_id, self.device_id
                ),
            ));
        }
        let now = self.clock.now();
        let not_after = i64::try_from(sig.not_after).unwrap_or(i64::MAX);
        if now.unix_secs() > not_after {
            return Err(refuse(
                CommandRefusal::CommandExpired,
                format!(
                    "command expired at {} (unix s); trusted time is {} by the {} clock",
                    sig.not_after,
                    now.unix_secs(),
                    now.source.as_str()
                ),
            ));
        }
        if let Some(target) = envelope.command.target() {
            self.bind(envelope.command.upgrade_id(), target, sig.issued_at)?;
        }
        let issued_ms = i64::try_from(sig.issued_at.saturating_mul(1000)).unwrap_or(i64::MAX);
        self.clock.raise_floor(issued_ms, true);
        Ok(envelope.command)
    }

    /// Binds `upgrade_id` to `target`, or refuses when it is bound to another one.
    fn bind(&self, upgrade_id: &str, target: &str, issued_at: u64) -> Result<(), StatusError> {
        let stored = |e: String| {
            tracing::warn!(upgrade_id, "cannot read or keep the upgrade id binding: {e}");
        };
        match self.bindings.get(upgrade_id.as_bytes()) {
            Ok(Some(known)) => {
                let known_target = known.get(8..).map(String::from_utf8_lossy).unwrap_or_default();
                if known_target == target {
                    return Ok(());
                }
                return Err(refuse(
                    CommandRefusal::CommandReplayed,
                    format!(
                        "upgrade id {upgrade_id} was already used for {known_target}; refusing it for {target}"
                    ),
                ));
            }
            Ok(None) => {}
            Err(e) => stored(e.to_string()),
        }
        let value = [&issued_at.to_be_bytes()[..], target.as_bytes()].concat();
        if let Err(e) = self.bindings.insert(upgrade_id.as_bytes(), value) {
            stored(e.to_string());
        }
        while self.bindings.len() > BINDINGS_CAP {
            let oldest = self
                .bindings
                .iter()
                .filter_map(Result::ok)
                .filter_map(|(k, v)| Some((<[u8; 8]>::try_from(v.get(..8)?).ok()?, k)))
                .min_by_key(|(at, _)| u64::from_be_bytes(*at));
            let Some((_, key)) = oldest else { break };
            let _ = self.bindings.remove(key);
        }
        if let Err(e) = self.store.sync() {
            stored(Chain(&e).to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use ed25519_dalek::SigningKey;
    use flightnode_proto::mqtt::sign_command;
    use flightnode_proto::mqtt::{UpgradeCommand, parse_envelope};

    fn now_secs() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn upgrade(id: &str, url: &str) -> Command {
        Command::Upgrade(UpgradeCommand {
            upgrade_id: id.into(),
            url: url.into(),
            version: None,
            allow_downgrade: false,
        })
    }

    fn code(r: Result<Command, StatusError>) -> String {
        r.map_or_else(|e| e.code, |_| "accepted".into())
    }

    #[test]
    fn each_attack_gets_its_own_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let hub = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let clock = Clock::open(&store.durable()).unwrap();
        let keys = TrustedKeys::new(vec![hub.verifying_key()]);
        let auth = Authority::open(&store.durable(), "d1", Some(keys), false, clock).unwrap();
        let t = now_secs();
        let check = |payload: String| code(auth.check(parse_envelope(payload.as_bytes(), "d1").unwrap()));
        let a = upgrade("r-1", "http://fw/a.fnb");

        assert_eq!(check(sign_command(&a, "d1", t, t + 60, &hub)), "accepted");
        assert_eq!(
            check(sign_command(&a, "d1", t, t + 60, &hub)),
            "accepted",
            "a redelivery passes"
        );
        assert_eq!(
            check(sign_command(&a, "d1", t, t + 60, &other)),
            "command_untrusted"
        );
        assert_eq!(
            check(sign_command(&a, "d2", t, t + 60, &hub)),
            "command_wrong_device"
        );
        assert_eq!(
            check(sign_command(&a, "d1", t - 120, t - 60, &hub)),
            "command_expired"
        );
        let b = upgrade("r-1", "http://fw/old.fnb");
        assert_eq!(check(sign_command(&b, "d1", t, t + 60, &hub)), "command_replayed");
        assert_eq!(check("http://fw/a.fnb".into()), "command_unsigned");
    }
}
