//! The committed CRD must be exactly what `flightnode-hub crd` prints.

#[test]
fn committed_crd_matches_generated() {
    let generated = flightnode_hub::api::crd_yaml().expect("crd yaml");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crd.yaml");
    let committed = std::fs::read_to_string(&path).expect("read deploy/crd.yaml");
    assert!(
        committed == generated,
        "hub/deploy/crd.yaml is stale: run `cargo run -p flightnode-hub -- crd > hub/deploy/crd.yaml`"
    );
}

#[test]
fn binary_prints_the_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flightnode-hub"))
        .arg("crd")
        .output()
        .expect("run flightnode-hub crd");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        flightnode_hub::api::crd_yaml().unwrap()
    );
}
