//! A short run of the hub's fuzz target body (`fuzz/fuzz_targets/heartbeat.rs`) in every
//! `cargo test`: seeded mutations of valid encoded heartbeats, and random bytes. The long run is
//! `fuzz/run.sh`.

mod common;

use common::{heartbeat, with_phase};
use flightnode_tests::fuzz::mutate;
use prost::Message;
use rand::{Rng, SeedableRng};

#[test]
fn heartbeat_handling_survives_mutated_heartbeats() {
    let mut upgrading = with_phase(heartbeat("drone-1", "1.0.0"), "downloading", 1);
    upgrading = with_phase(upgrading, "staged", 2);
    upgrading.last_upgrade = Some(flightnode_proto::v1::LastUpgrade {
        upgrade_id: "up-0".into(),
        version: "0.9.0".into(),
        result: "rolled_back".into(),
        error_code: "health_check_failed".into(),
        error_message: "health".into(),
        finished_unix: 1_700_000_000,
    });
    let mut odd = heartbeat("Drone_Ünicode", "1.0.0");
    odd.device_id = "Drone_1.A".into();
    let seeds: Vec<Vec<u8>> = [heartbeat("drone-1", "1.0.0"), upgrading, odd]
        .iter()
        .map(Message::encode_to_vec)
        .collect();
    // The seeds themselves are accepted heartbeats.
    for s in &seeds {
        let mut hb = flightnode_proto::v1::HeartbeatRequest::decode(s.as_slice()).unwrap();
        assert_eq!(flightnode_hub::heartbeat::grpc::validate(&mut hb), Ok(()));
        flightnode_hub::heartbeat::fuzzing::heartbeat(s);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for _ in 0..4_000 {
        let seed = &seeds[rng.random_range(0..seeds.len())];
        flightnode_hub::heartbeat::fuzzing::heartbeat(&mutate(&mut rng, seed));
    }
    for _ in 0..1_000 {
        let n = rng.random_range(0..512);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        flightnode_hub::heartbeat::fuzzing::heartbeat(&junk);
    }
}
