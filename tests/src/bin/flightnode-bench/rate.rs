//! `rate`: `[download] max_rate` against the rate measured at the bundle server, for a few caps.
//! Printed, never asserted: a shared machine's timing is for reading, not for failing a test.

use crate::MIB;
use anyhow::Result;
use flightnode_tests::agent::{binary, run_ok};
use flightnode_tests::http_server::BundleServer;
use std::time::Instant;

pub(crate) fn rate(size_mib: u64, rates: &[u64]) -> Result<()> {
    let agent = binary("flightnode-agent")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    run_ok(
        &agent,
        &["keygen", "--out-dir", &dir.join("keys").display().to_string()],
    )?;
    let image = dir.join("image");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..size_mib * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&image, bytes)?;
    let bundle = dir.join("fw.fnb");
    run_ok(
        &agent,
        &[
            "bundle",
            "create",
            "--key",
            &dir.join("keys/release.key").display().to_string(),
            "--image",
            &image.display().to_string(),
            "--version",
            "2.0.0",
            "--compatible",
            "bench-hw",
            "--output",
            &bundle.display().to_string(),
        ],
    )?;
    let server = BundleServer::start_blocking()?;
    server.put_file("/fw.fnb", &bundle)?;
    println!("download of a {size_mib} MiB image over loopback HTTP with [download] max_rate");
    println!(
        "{:>14} {:>14} {:>10} {:>8}",
        "max_rate B/s", "measured B/s", "ratio", "secs"
    );
    for (i, &cap) in rates.iter().enumerate() {
        let dev = dir.join(format!("dev{i}"));
        std::fs::create_dir_all(dev.join("slots"))?;
        let config = dev.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"bench\"\nhardware = \"bench-hw\"\nstate_dir = {:?}\ntrusted_keys = [{:?}]\n[slots]\nbackend = \"file\"\na = {:?}\nb = {:?}\n[download]\nmax_rate = {cap}\n",
                dev.join("state").display().to_string(),
                dir.join("keys/release.pub").display().to_string(),
                dev.join("slots/a.img").display().to_string(),
                dev.join("slots/b.img").display().to_string()
            ),
        )?;
        server.reset_counters();
        let t = Instant::now();
        run_ok(
            &agent,
            &[
                "--config",
                &config.display().to_string(),
                "install",
                &server.url("/fw.fnb"),
            ],
        )?;
        let secs = t.elapsed().as_secs_f64();
        let sent = server.bytes_sent();
        if sent < cap.saturating_mul(2) {
            println!(
                "{cap:>14} {:>14} {:>10} {secs:>8.1}  (the image fits the 1 s burst: raise --size-mib)",
                "-", "-"
            );
        } else {
            // The bucket starts full: the first second's worth is a burst, the rest is paced.
            let measured = sent.saturating_sub(cap) as f64 / secs.max(1e-9);
            println!(
                "{cap:>14} {measured:>14.0} {:>10.3} {secs:>8.1}",
                measured / cap as f64
            );
        }
        std::fs::remove_dir_all(&dev)?;
    }
    Ok(())
}
