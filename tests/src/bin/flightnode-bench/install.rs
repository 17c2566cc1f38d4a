//! `install`: bundle download + verify + write over loopback, against curl and a minimal copy.

use crate::{MIB, median, mib_s};
use anyhow::{Context, Result, bail};
use flightnode_tests::agent::{binary, run_ok};
use flightnode_tests::http_server::BundleServer;
use sha2::Digest;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub(crate) fn install(size_mib: u64, runs: u64) -> Result<()> {
    let agent = binary("flightnode-agent")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let size = size_mib * MIB;
    eprintln!("preparing a {size_mib} MiB image and bundle in {}", dir.display());
    run_ok(
        &agent,
        &["keygen", "--out-dir", &dir.join("keys").display().to_string()],
    )?;
    let image = dir.join("image");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
    }
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
    let url = server.url("/fw.fnb");
    let bundle_len = std::fs::metadata(&bundle)?.len();

    // Raw sha256 on one core: the ceiling for any verifying installer.
    let data = std::fs::read(&image)?;
    let t = Instant::now();
    let digest = sha2::Sha256::digest(&data);
    let sha_rate = mib_s(size, t.elapsed().as_secs_f64());
    drop(data);
    std::hint::black_box(digest);

    let (mut ours, mut curl, mut minimal) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // flightnode: full verify (signature, manifest, sha256), checkpoints, fsync, switch.
        let dev = dir.join(format!("dev{run}"));
        std::fs::create_dir_all(dev.join("slots"))?;
        let config = dev.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"bench\"\nhardware = \"bench-hw\"\nstate_dir = {:?}\ntrusted_keys = [{:?}]\n[slots]\nbackend = \"file\"\na = {:?}\nb = {:?}\n",
                dev.join("state").display().to_string(),
                dir.join("keys/release.pub").display().to_string(),
                dev.join("slots/a.img").display().to_string(),
                dev.join("slots/b.img").display().to_string()
            ),
        )?;
        let t = Instant::now();
        run_ok(
            &agent,
            &["--config", &config.display().to_string(), "install", &url],
        )?;
        ours.push(mib_s(size, t.elapsed().as_secs_f64()));
        std::fs::remove_dir_all(&dev)?;

        // Baseline 1: the shell pipeline.
        let slot = dir.join("curl-slot");
        let t = Instant::now();
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "curl -s {url} | tee >(sha256sum > /dev/null) > {}",
                slot.display()
            ))
            .status();
        if let Ok(st) = st
            && st.success()
        {
            curl.push(mib_s(size, t.elapsed().as_secs_f64()));
        }
        let _ = std::fs::remove_file(&slot);

        // Baseline 2: minimal Rust: GET, sha256, write, one fsync at the end.
        let t = Instant::now();
        minimal_copy(server.addr(), "/fw.fnb", &dir.join("min-slot"), bundle_len)?;
        minimal.push(mib_s(size, t.elapsed().as_secs_f64()));
        std::fs::remove_file(dir.join("min-slot"))?;
    }
    let ours = median(ours);
    let minimal = median(minimal);
    println!("install of a {size_mib} MiB image over loopback HTTP, median of {runs} runs");
    println!("{:<48} {:>10} {:>12}", "pipeline", "MiB/s", "vs minimal");
    println!(
        "{:<48} {:>10.1} {:>12.2}",
        "flightnode-agent install (verify, fsync, switch)",
        ours,
        ours / minimal
    );
    if !curl.is_empty() {
        let c = median(curl);
        println!(
            "{:<48} {:>10.1} {:>12.2}",
            "curl | tee >(sha256sum) > slot (no fsync)",
            c,
            c / minimal
        );
        println!("ratio flightnode / curl pipeline: {:.2}", ours / c);
    }
    println!(
        "{:<48} {:>10.1} {:>12.2}",
        "minimal Rust GET + sha256 + write + fsync", minimal, 1.0
    );
    println!(
        "{:<48} {:>10.1} {:>12}",
        "raw sha256, one core (the ceiling)", sha_rate, "-"
    );
    Ok(())
}

/// The least an installer can do: one GET, hash every byte, write it, fsync once.
fn minimal_copy(addr: std::net::SocketAddr, path: &str, out: &Path, len: u64) -> Result<()> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, stream);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).context("reading headers")?;
        head.push(byte[0]);
    }
    let mut file = std::fs::File::create(out)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        got += n as u64;
    }
    file.sync_all()?;
    std::hint::black_box(hasher.finalize());
    if got != len {
        bail!("minimal copy got {got} of {len} bytes");
    }
    Ok(())
}
