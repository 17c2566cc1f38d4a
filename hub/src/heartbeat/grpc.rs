//! The gRPC `HubService`: input checks, the mTLS identity check, then [`Hub::heartbeat`].
//!
//! With a client CA configured, the TLS handshake already requires a client certificate; the
//! service then requires the heartbeat's `device_id` to be one of the identities in it (subject
//! CN or a DNS/URI SAN): a drone can only speak for itself.

use crate::heartbeat::hub::Hub;
use flightnode_proto::device::validate_device_id;
use flightnode_proto::v1::hub_service_server::{HubService, HubServiceServer};
use flightnode_proto::v1::{HeartbeatRequest, HeartbeatResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Largest accepted request.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Most events accepted in one heartbeat.
pub const MAX_EVENTS: usize = 256;
/// Longest accepted short field (ids, versions, slots, phases, results, error codes).
pub const MAX_FIELD_BYTES: usize = 1024;
/// Longest kept free-text message (`events[].message`, `last_upgrade.error_message`). Longer ones
/// are cut, not refused: the agent would send a refused event again with every heartbeat.
pub const MAX_MESSAGE_TEXT_BYTES: usize = 1024;

/// The service implementation.
pub struct HubGrpc {
    hub: Arc<Hub>,
    require_identity: bool,
}

/// The tonic service with the message size cap; `require_identity` when a client CA is set.
pub fn service(hub: Arc<Hub>, require_identity: bool) -> HubServiceServer<HubGrpc> {
    HubServiceServer::new(HubGrpc {
        hub,
        require_identity,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Identities a client certificate (DER) speaks for: subject CNs, DNS and URI SANs.
pub fn certificate_identities(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("client certificate: {e}"))?;
    let mut ids: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => ids.push((*n).to_owned()),
                _ => {}
            }
        }
    }
    Ok(ids)
}

/// Cuts `text` to at most `max` bytes at a char boundary, ending in `…` when it was cut.
fn truncate_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

/// Checks a heartbeat's fields (the error is the gRPC `INVALID_ARGUMENT` text) and cuts its
/// free-text messages to [`MAX_MESSAGE_TEXT_BYTES`].
pub fn validate(hb: &mut HeartbeatRequest) -> Result<(), String> {
    if let Some(l) = hb.last_upgrade.as_mut() {
        truncate_text(&mut l.error_message, MAX_MESSAGE_TEXT_BYTES);
    }
    for e in &mut hb.events {
        truncate_text(&mut e.message, MAX_MESSAGE_TEXT_BYTES);
    }
    let hb = &*hb;
    validate_device_id(&hb.device_id)?;
    if hb.events.len() > MAX_EVENTS {
        return Err(format!(
            "{} events in one heartbeat, at most {MAX_EVENTS}",
            hb.events.len()
        ));
    }
    let mut fields = vec![
        ("boot_id", hb.boot_id.as_str()),
        ("agent_version", hb.agent_version.as_str()),
        ("hardware_id", hb.hardware_id.as_str()),
    ];
    if let Some(f) = &hb.firmware {
        fields.extend([
            ("firmware.committed_version", f.committed_version.as_str()),
            ("firmware.active_slot", f.active_slot.as_str()),
            ("firmware.booted_slot", f.booted_slot.as_str()),
        ]);
        for (name, slot) in [("firmware.slot_a", &f.slot_a), ("firmware.slot_b", &f.slot_b)] {
            if let Some(slot) = slot {
                fields.extend([(name, slot.version.as_str()), (name, slot.state.as_str())]);
            }
        }
    }
    if let Some(u) = &hb.upgrade {
        fields.extend([
            ("upgrade.upgrade_id", u.upgrade_id.as_str()),
            ("upgrade.phase", u.phase.as_str()),
            ("upgrade.version", u.version.as_str()),
        ]);
    }
    if let Some(l) = &hb.last_upgrade {
        fields.extend([
            ("last_upgrade.upgrade_id", l.upgrade_id.as_str()),
            ("last_upgrade.result", l.result.as_str()),
            ("last_upgrade.version", l.version.as_str()),
            ("last_upgrade.error_code", l.error_code.as_str()),
        ]);
    }
    for e in &hb.events {
        fields.extend([
            ("events.phase", e.phase.as_str()),
            ("events.upgrade_id", e.upgrade_id.as_str()),
            ("events.result", e.result.as_str()),
            ("events.error_code", e.error_code.as_str()),
        ]);
    }
    if let Some((field, _)) = fields.iter().find(|(_, v)| v.len() > MAX_FIELD_BYTES) {
        return Err(format!("{field} is longer than {MAX_FIELD_BYTES} bytes"));
    }
    if let Some((field, _)) = fields.iter().find(|(_, v)| v.chars().any(char::is_control)) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

#[tonic::async_trait]
impl HubService for HubGrpc {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let identities = if self.require_identity {
            let Some(certs) = request.peer_certs() else {
                self.hub.metrics.heartbeat("denied").inc();
                return Err(Status::permission_denied("a client certificate is required"));
            };
            let Some(leaf) = certs.first() else {
                self.hub.metrics.heartbeat("denied").inc();
                return Err(Status::permission_denied("a client certificate is required"));
            };
            Some(certificate_identities(leaf.as_ref()).map_err(Status::permission_denied)?)
        } else {
            None
        };
        let mut hb = request.into_inner();
        if let Err(message) = validate(&mut hb) {
            self.hub.metrics.heartbeat("invalid").inc();
            tracing::debug!(device_id = %hb.device_id.escape_debug(), %message, "heartbeat refused");
            return Err(Status::invalid_argument(message));
        }
        if let Some(ids) = identities
            && !ids.contains(&hb.device_id)
        {
            self.hub.metrics.heartbeat("denied").inc();
            tracing::warn!(device_id = %hb.device_id, certificate = ?ids, "heartbeat for another device refused");
            return Err(Status::permission_denied(format!(
                "the client certificate does not speak for device {:?}",
                hb.device_id
            )));
        }
        Ok(Response::new(self.hub.heartbeat(&hb).await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flightnode_proto::v1;

    fn good() -> HeartbeatRequest {
        HeartbeatRequest {
            device_id: "drone-1".into(),
            firmware: Some(v1::FirmwareState {
                active_slot: "a".into(),
                slot_a: Some(v1::SlotInfo {
                    version: "1.0.0".into(),
                    state: "good".into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn oversized_or_control_characters_in_any_short_field_are_refused() {
        assert_eq!(validate(&mut good()), Ok(()));
        let mut hb = good();
        if let Some(f) = hb.firmware.as_mut() {
            f.slot_a = Some(v1::SlotInfo {
                version: "x".repeat(MAX_FIELD_BYTES + 1),
                state: "good".into(),
            });
        }
        assert!(validate(&mut hb).unwrap_err().contains("firmware.slot_a"));
        let mut hb = good();
        hb.events.push(v1::Event {
            result: "committed\u{1b}[2J".into(),
            ..Default::default()
        });
        assert!(validate(&mut hb).unwrap_err().contains("events.result"));
        let mut hb = good();
        hb.last_upgrade = Some(v1::LastUpgrade {
            error_code: "\0".into(),
            ..Default::default()
        });
        assert!(validate(&mut hb).unwrap_err().contains("last_upgrade.error_code"));
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary_not_refused() {
        let mut hb = good();
        // 'é' is two bytes: a cut at an odd offset would split one.
        let long = "é".repeat(MAX_MESSAGE_TEXT_BYTES);
        hb.events.push(v1::Event {
            seq: 1,
            phase: "downloading".into(),
            message: long.clone(),
            ..Default::default()
        });
        hb.events.push(v1::Event {
            seq: 2,
            message: "short".into(),
            ..Default::default()
        });
        hb.last_upgrade = Some(v1::LastUpgrade {
            error_message: format!("x{long}"),
            ..Default::default()
        });
        assert_eq!(validate(&mut hb), Ok(()));
        let cut = &hb.events[0].message;
        assert!(cut.len() <= MAX_MESSAGE_TEXT_BYTES, "{}", cut.len());
        assert!(cut.len() > MAX_MESSAGE_TEXT_BYTES - 8, "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
        assert_eq!(hb.events[1].message, "short");
        let l = hb.last_upgrade.as_ref().map_or("", |l| l.error_message.as_str());
        assert!(l.len() <= MAX_MESSAGE_TEXT_BYTES && l.starts_with("xé") && l.ends_with('…'));

        // At the limit nothing changes.
        let mut hb = good();
        let exact = "y".repeat(MAX_MESSAGE_TEXT_BYTES);
        hb.events.push(v1::Event {
            message: exact.clone(),
            ..Default::default()
        });
        assert_eq!(validate(&mut hb), Ok(()));
        assert_eq!(hb.events[0].message, exact);
    }
}
