//! A sample heartbeat of an idle, healthy drone: the one base that tests, fuzz seeds and the
//! hub load generator vary (a phase, events, another version) instead of each spelling out every
//! field of the message.

use crate::v1;

/// A heartbeat of `device_id` idle on `version` in slot `a` (slot `b` empty), hardware `hw-x1`,
/// 1 GiB of memory, with `seq` 1 and no events.
pub fn idle_heartbeat(device_id: &str, version: &str) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        device_id: device_id.into(),
        boot_id: "boot-1".into(),
        agent_version: "0.1.0".into(),
        hardware_id: "hw-x1".into(),
        firmware: Some(v1::FirmwareState {
            active_slot: "a".into(),
            booted_slot: "a".into(),
            slot_a: Some(v1::SlotInfo {
                version: version.into(),
                state: "good".into(),
            }),
            slot_b: Some(v1::SlotInfo {
                version: String::new(),
                state: "empty".into(),
            }),
            committed_version: version.into(),
            security_floor: 0,
            flights: None,
            airborne_seconds: None,
        }),
        upgrade: None,
        last_upgrade: None,
        resources: Some(v1::Resources {
            cpu_percent: 12.0,
            memory_used_bytes: 200 << 20,
            memory_total_bytes: 1 << 30,
            disk_free_bytes: 4 << 30,
            load1: 0.1,
            uptime_seconds: 10,
            temperature_celsius: None,
        }),
        seq: 1,
        events: vec![],
        flight: None,
        arm_lock: None,
        clock_source: "hub".into(),
    }
}
