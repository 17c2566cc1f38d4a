//! Writes the seed corpora of the cargo-fuzz targets in `fuzz/` (`fuzz/run.sh` runs it first):
//!
//! ```text
//! cargo run -p flightnode-agent --example fuzz_seeds -- fuzz/corpus
//! ```
//!
//! fills `DIR/mqtt_command`, `DIR/bundle_reader` and `DIR/heartbeat`. The bundle seeds are signed
//! with [`flightnode_agent::fuzzing::fuzz_key`], the key the `bundle_reader` target trusts: a
//! fuzzer cannot forge an ed25519 signature, so without them it never gets past the signature
//! check to the manifest, the image copy, the size cap and the tail checks.

use flightnode_agent::bundle::{CreateOptions, create};
use flightnode_agent::fuzzing::write_fuzz_key;
use flightnode_proto::v1;
use prost::Message;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dir) = std::env::args_os().nth(1) else {
        return Err("usage: fuzz_seeds DIR".into());
    };
    let dir = Path::new(&dir);

    let mqtt = dir.join("mqtt_command");
    std::fs::create_dir_all(&mqtt)?;
    let commands: [&[u8]; 5] = [
        b"https://fw.example/fw-1.4.0.fnb",
        br#"{"type":"upgrade","upgrade_id":"u1","url":"http://h/b.fnb","version":"1.2.3","allow_downgrade":true}"#,
        br#"{"type":"upgrade","upgrade_id":"u1","url":"https://h/b.fnb","device_id":"drone-fuzz"}"#,
        br#"{"type":"cancel","upgrade_id":"u1","device_id":"drone-fuzz"}"#,
        br#"{"type":"cancel","upgrade_id":"u1"}"#,
    ];
    for (i, c) in commands.iter().enumerate() {
        std::fs::write(mqtt.join(format!("seed-{i}")), c)?;
    }

    let bundles = dir.join("bundle_reader");
    std::fs::create_dir_all(&bundles)?;
    let work = tempfile::tempdir()?;
    let key = work.path().join("fuzz.key");
    write_fuzz_key(&key)?;
    // Sizes around the tar block boundary, so the padding and tail checks are all reached.
    for (i, size) in [0usize, 1, 511, 512, 1500].into_iter().enumerate() {
        let image = work.path().join("image");
        std::fs::write(&image, (0..size).map(|b| b.to_le_bytes()[0]).collect::<Vec<_>>())?;
        let opts = CreateOptions {
            version: semver::Version::new(1, i as u64, 0),
            security_version: i as u64,
            compatible: vec!["hw-x1".into()],
            expires: None,
            chunked: None,
            autopilot: None,
        };
        create(&key, &image, &opts, &bundles.join(format!("seed-{size}")))?;
    }

    let hb = dir.join("heartbeat");
    std::fs::create_dir_all(&hb)?;
    let idle = heartbeat("drone-1");
    let mut upgrading = heartbeat("drone-2");
    upgrading.upgrade = Some(v1::CurrentUpgrade {
        upgrade_id: "up-1".into(),
        phase: "downloading".into(),
        bytes: 1 << 20,
        total: 4 << 20,
        version: "2.0.0".into(),
        wait_reason: String::new(),
    });
    upgrading.events.push(v1::Event {
        seq: 2,
        time_unix_ms: 1_700_000_000_000,
        upgrade_id: "up-1".into(),
        phase: "downloading".into(),
        ..Default::default()
    });
    upgrading.last_upgrade = Some(v1::LastUpgrade {
        upgrade_id: "up-0".into(),
        version: "0.9.0".into(),
        result: "rolled_back".into(),
        error_code: "health_check_failed".into(),
        error_message: "health".into(),
        finished_unix: 1_700_000_000,
    });
    let odd = heartbeat("Drone_1.A");
    for (i, m) in [idle, upgrading, odd].iter().enumerate() {
        std::fs::write(hb.join(format!("seed-{i}")), m.encode_to_vec())?;
    }
    Ok(())
}

fn heartbeat(device: &str) -> v1::HeartbeatRequest {
    let mut hb = flightnode_proto::sample::idle_heartbeat(device, "1.0.0");
    if let Some(f) = hb.firmware.as_mut() {
        f.security_floor = 1;
    }
    if let Some(r) = hb.resources.as_mut() {
        r.temperature_celsius = Some(41.5);
    }
    hb
}
