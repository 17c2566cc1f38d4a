//! The documented example config parses.

#[test]
fn example_agent_toml_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml");
    let cfg = flightnode_agent::config::Config::load(&path).unwrap();
    assert_eq!(cfg.device_id, "drone-0001");
    assert_eq!(cfg.download.checkpoint_bytes, 8 << 20);
    // Left to the default, which follows the cores of the computer it runs on.
    assert_eq!(cfg.download.chunk_workers, None);
}
