//! `flightnode-demo`: the whole upgrade flow on one machine, nothing installed beyond Rust.
//!
//! Makes a signing key, three firmware bundles and three simulated drones (file slots in a temp
//! dir), then installs: drone 1 commits, drone 2 fails its health check and rolls back, drone 3
//! gets a corrupt bundle and rejects it. Exits 0 when every drone ended where it should.

use anyhow::{Context, Result, bail};
use flightnode_tests::agent::{binary, run_ok};
use std::path::Path;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_config(dir: &Path, id: &str, health: &str) -> Result<std::path::PathBuf> {
    let d = dir.join(id);
    std::fs::create_dir_all(d.join("slots"))?;
    std::fs::write(d.join("slots/a.img"), b"factory firmware 1.0.0")?;
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"{id}\"\nhardware = \"cc-demo-v1\"\nstate_dir = {state:?}\ntrusted_keys = [{key:?}]\n\
             factory_version = \"1.0.0\"\n[slots]\nbackend = \"file\"\na = {a:?}\nb = {b:?}\n[health]\ncommand = {health:?}\n",
            state = d.join("state").display().to_string(),
            key = dir.join("keys/release.pub").display().to_string(),
            a = d.join("slots/a.img").display().to_string(),
            b = d.join("slots/b.img").display().to_string(),
        ),
    )?;
    Ok(config)
}

fn demo() -> Result<()> {
    let agent = binary("flightnode-agent")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    println!("flightnode demo in a temporary directory (removed at the end)\n");
    run_ok(
        &agent,
        &["keygen", "--out-dir", &dir.join("keys").display().to_string()],
    )?;
    let image = dir.join("firmware-2.0.0.img");
    std::fs::write(
        &image,
        (0..4 * 1024 * 1024)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    )?;
    let bundle = dir.join("firmware-2.0.0.fnb");
    let key = dir.join("keys/release.key").display().to_string();
    run_ok(
        &agent,
        &[
            "bundle",
            "create",
            "--key",
            &key,
            "--image",
            &image.display().to_string(),
            "--version",
            "2.0.0",
            "--compatible",
            "cc-demo-v1",
            "--output",
            &bundle.display().to_string(),
        ],
    )?;
    let mut corrupt = std::fs::read(&bundle)?;
    let n = corrupt.len();
    corrupt[n - 4096] ^= 0xff;
    let corrupt_path = dir.join("firmware-2.0.0-corrupt.fnb");
    std::fs::write(&corrupt_path, corrupt)?;

    let drones = [
        ("drone-1", "true", &bundle, "committed"),
        (
            "drone-2",
            "echo 'health: flight controller not responding' >&2; exit 1",
            &bundle,
            "rolled_back",
        ),
        ("drone-3", "true", &corrupt_path, "rejected"),
    ];
    let mut ok = true;
    for (id, health, bundle, want) in drones {
        let config = write_config(dir, id, health)?;
        println!(
            "== {id}: install {}",
            bundle
                .file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        );
        let out = Command::new(&agent)
            .args([
                "--config",
                &config.display().to_string(),
                "install",
                &bundle.display().to_string(),
            ])
            .output()
            .context("running flightnode-agent install")?;
        print!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let status = run_ok(
            &agent,
            &["--config", &config.display().to_string(), "status", "--json"],
        )?;
        let s: serde_json::Value = serde_json::from_slice(&status.stdout)?;
        let got = s["last_upgrade"]["result"].as_str().unwrap_or("none").to_owned();
        let line = format!(
            "{id}: {got}; active slot {} running {}",
            s["active_slot"].as_str().unwrap_or("?"),
            s["committed_version"].as_str().unwrap_or("?")
        );
        println!("{line}\n");
        ok &= got == want;
    }
    if !ok {
        bail!("a drone did not end as expected");
    }
    println!(
        "summary: drone-1 committed 2.0.0, drone-2 rolled back to 1.0.0, drone-3 rejected the corrupt bundle"
    );
    Ok(())
}
