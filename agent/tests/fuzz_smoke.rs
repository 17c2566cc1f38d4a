//! A short run of the fuzz target bodies (fuzz/) in every `cargo test`: seeded random inputs and
//! mutations of valid ones. The long runs are `fuzz/run.sh`.

use flightnode_tests::fuzz::mutate;
use rand::{Rng, SeedableRng};

#[test]
fn mqtt_command_parser_survives_mutated_payloads() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seeds: [&[u8]; 4] = [
        b"https://fw.example/a.fnb",
        br#"{"type":"upgrade","upgrade_id":"u1","url":"http://h/b.fnb","version":"1.2.3","allow_downgrade":true}"#,
        br#"{"type":"cancel","upgrade_id":"u1","device_id":"drone-fuzz"}"#,
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];
    for _ in 0..20_000 {
        let seed = seeds[rng.random_range(0..seeds.len())];
        flightnode_agent::fuzzing::mqtt_command(&mutate(&mut rng, seed));
    }
}

#[test]
fn bundle_reader_survives_mutated_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fuzz.key");
    flightnode_agent::fuzzing::write_fuzz_key(&key).unwrap();
    let image = dir.path().join("img");
    std::fs::write(&image, vec![7u8; 3000]).unwrap();
    let out = dir.path().join("b.fnb");
    let opts = flightnode_agent::bundle::CreateOptions {
        version: semver::Version::new(1, 0, 0),
        security_version: 0,
        compatible: vec!["hw".into()],
        expires: None,
        chunked: None,
        autopilot: None,
    };
    flightnode_agent::bundle::create(&key, &image, &opts, &out).unwrap();
    let valid_header = flightnode_agent::bundle::verify_file(
        &out,
        &flightnode_agent::bundle::TrustedKeys::new(vec![
            flightnode_agent::fuzzing::fuzz_key().verifying_key(),
        ]),
    );
    assert!(
        valid_header.is_ok(),
        "the seed bundle must verify with the fuzz key"
    );
    let valid = std::fs::read(&out).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..3_000 {
        flightnode_agent::fuzzing::bundle_reader(&mutate(&mut rng, &valid));
    }
    for _ in 0..2_000 {
        let n = rng.random_range(0..4096);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        flightnode_agent::fuzzing::bundle_reader(&junk);
    }
}

/// The fuzz crate is its own workspace and carries a copy of the workspace's lint set: the copy
/// must not drift from the original.
#[test]
fn fuzz_crate_lints_equal_the_workspace_lints() {
    let read = |rel: &str| -> toml::Table {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let root = read("../Cargo.toml");
    let fuzz = read("../fuzz/Cargo.toml");
    let workspace = &root["workspace"]["lints"];
    assert!(
        workspace
            .get("clippy")
            .is_some_and(|c| c.get("pedantic").is_some()),
        "the root Cargo.toml has no [workspace.lints.clippy] pedantic set"
    );
    assert_eq!(
        fuzz.get("lints"),
        Some(workspace),
        "fuzz/Cargo.toml [lints] differs from the root's [workspace.lints]"
    );
}
