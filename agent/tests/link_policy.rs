//! The download's link policy against real links: two network namespaces joined by two veth
//! pairs, the agent's daemon in the client one, the bundle server in the server one. The client
//! reaches the server's address over `wwan0` (matched by `download.metered_interfaces`) or `eth1`
//! (not), whichever `ip route replace` picks; the kernel, not a fake, says which link a download
//! takes. Also the download window, on loopback.
//!
//! Needs root and iproute2 (`ip netns`); skipped with a message otherwise.

mod common;
use common::*;
use flightnode_tests::fleet::wait_until;
use flightnode_tests::http_server::BundleServer;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(1);
const POLL: Duration = Duration::from_millis(100);
/// The server's address, on its loopback, routed over either link.
const SERVER: &str = "10.201.9.1";
const IMAGE: usize = 2 * 1024 * 1024;
/// Big enough that the route can change in the body's last request (see the pause test).
const BIG: usize = 16 * 1024 * 1024;

/// Two namespaces and their links; deleted on drop, whatever the test did.
struct Netns {
    client: String,
    server: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Netns {
    /// `None` (after saying why) when namespaces cannot be made here.
    fn new(tag: &str) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: the link tests need root to create network namespaces");
            return None;
        }
        let id = std::process::id();
        let ns = Netns {
            client: format!("fnl-{tag}-c{id}"),
            server: format!("fnl-{tag}-s{id}"),
        };
        if let Err(e) = ip(&["netns", "add", &ns.client]) {
            eprintln!("SKIP: cannot create a network namespace: {e}");
            return None;
        }
        if let Err(e) = ns.wire() {
            panic!("setting up the namespaces: {e}");
        }
        Some(ns)
    }

    fn wire(&self) -> Result<(), String> {
        let (c, s) = (self.client.as_str(), self.server.as_str());
        ip(&["netns", "add", s])?;
        for (link, peer, net) in [("wwan0", "sm0", "1"), ("eth1", "su0", "2")] {
            ip(&[
                "link", "add", link, "netns", c, "type", "veth", "peer", "name", peer, "netns", s,
            ])?;
            ip(&["-n", c, "addr", "add", &format!("10.201.{net}.2/24"), "dev", link])?;
            ip(&["-n", s, "addr", "add", &format!("10.201.{net}.1/24"), "dev", peer])?;
            ip(&["-n", c, "link", "set", link, "up"])?;
            ip(&["-n", s, "link", "set", peer, "up"])?;
        }
        ip(&["-n", c, "link", "set", "lo", "up"])?;
        ip(&["-n", s, "link", "set", "lo", "up"])?;
        ip(&["-n", s, "addr", "add", &format!("{SERVER}/32"), "dev", "lo"])?;
        // No reverse-path filtering: a connection keeps flowing after `ip route replace` (its
        // packets leave by the new link with the old source address), so only the agent's own
        // recheck can notice that the route turned metered, not a stalled connection.
        // Socket buffers of at most 256 KiB: what the server has written is then close to what
        // the agent has read, so its byte count tells what crossed the link (the kernel's
        // autotuning would otherwise let the server run megabytes ahead of a capped reader).
        for ns in [c, s] {
            ip(&[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done; \
                 echo '4096 65536 262144' > /proc/sys/net/ipv4/tcp_rmem; \
                 echo '4096 65536 262144' > /proc/sys/net/ipv4/tcp_wmem",
            ])?;
        }
        self.route("wwan0")
    }

    /// Routes the client's packets for the server over `link` (`wwan0` or `eth1`).
    fn route(&self, link: &str) -> Result<(), String> {
        let via = if link == "wwan0" {
            "10.201.1.1"
        } else {
            "10.201.2.1"
        };
        ip(&[
            "-n",
            &self.client,
            "route",
            "replace",
            &format!("{SERVER}/32"),
            "via",
            via,
            "dev",
            link,
        ])
    }

    /// A bundle server listening in the server namespace: its socket is made on a thread that
    /// entered the namespace first.
    fn serve(&self) -> BundleServer {
        let path = format!("/run/netns/{}", self.server);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on an open namespace file; it changes only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            BundleServer::start_blocking_on(SocketAddr::from(([0, 0, 0, 0], 0))).expect("bundle server")
        })
        .join()
        .expect("server thread")
    }

    /// The daemon of `dev`, running in the client namespace.
    fn daemon(&self, dev: &Device) -> Daemon {
        let _ = std::fs::remove_file(dev.path("state/agent.sock"));
        let log = std::fs::File::create(dev.path("daemon.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.client, BIN, "--config"])
            .arg(&dev.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        assert!(
            wait_until(WAIT, POLL, || dev.path("state/agent.sock").exists()),
            "the daemon never opened its control socket:\n{}",
            dev.log()
        );
        daemon
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in [&self.client, &self.server] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A device whose `[download]` has `policy` added.
fn device(policy: &str) -> Device {
    let dev = Device::new(Options::default());
    let config = std::fs::read_to_string(&dev.config).unwrap();
    let config = config.replace(
        "checkpoint_bytes = 65536\n",
        &format!("checkpoint_bytes = 65536\n{policy}\n"),
    );
    std::fs::write(&dev.config, config).unwrap();
    dev
}

/// Starts `install URL` through the running daemon; returns when the daemon took it.
fn install(dev: &Device, url: &str) -> std::process::Child {
    let out = std::fs::File::create(dev.path("install.log")).unwrap();
    dev.cmd(&["install", url])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

fn wait_status(dev: &Device, what: &str, mut ok: impl FnMut(&serde_json::Value) -> bool) {
    assert!(
        wait_until(WAIT, POLL, || ok(&dev.status())),
        "never {what}: {:#}\ndaemon log:\n{}",
        dev.status(),
        dev.log()
    );
}

fn waiting_for(reason: &'static str) -> impl FnMut(&serde_json::Value) -> bool {
    move |s| s["phase"] == "waiting" && s["wait_reason"] == reason
}

fn committed(dev: &Device, mut child: std::process::Child, version: &str, image: usize) {
    wait_status(dev, "committed", |s| {
        s["committed_version"] == version && s["phase"] == "idle"
    });
    let done = child.wait().unwrap();
    assert!(
        done.success(),
        "{}",
        std::fs::read_to_string(dev.path("install.log")).unwrap_or_default()
    );
    assert_eq!(dev.slot_bytes("b"), image_bytes(version, image));
    dev.assert_bootable();
}

#[test]
fn over_a_metered_link_the_download_waits_across_a_restart_and_starts_once_the_route_is_unmetered() {
    let Some(net) = Netns::new("defer") else { return };
    let dev = device("metered_interfaces = [\"wwan*\", \"ppp0\"]\n");
    let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
    let srv = net.serve();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let url = format!("http://{SERVER}:{}/fw.fnb", srv.addr().port());
    let daemon = net.daemon(&dev);

    let child = install(&dev, &url);
    wait_status(&dev, "waited for the metered link", waiting_for("metered_link"));
    // Held, not failed: it stays so, and not one request reached the server over wwan0.
    std::thread::sleep(Duration::from_secs(3));
    let s = dev.status();
    assert_eq!(
        (&s["phase"], &s["wait_reason"]),
        (&"waiting".into(), &"metered_link".into()),
        "{s:#}"
    );
    assert_eq!(
        srv.requests_for("/fw.fnb"),
        vec![],
        "nothing fetched over the metered link"
    );
    assert!(
        dev.log().contains("wwan0"),
        "the log names the interface:\n{}",
        dev.log()
    );

    // A power cut while waiting: the hold is in the store, and the next start holds again.
    drop(daemon);
    drop(child);
    let s = dev.status();
    assert_eq!(
        (&s["phase"], &s["wait_reason"]),
        (&"waiting".into(), &"metered_link".into()),
        "{s:#}"
    );
    let _daemon = net.daemon(&dev);
    dev.wait_log("still waiting before downloading");
    std::thread::sleep(Duration::from_secs(2));
    let s = dev.status();
    assert_eq!(
        s["wait_reason"], "metered_link",
        "held again after the restart: {s:#}"
    );
    assert_eq!(
        srv.requests_for("/fw.fnb"),
        vec![],
        "nothing fetched over the metered link"
    );

    net.route("eth1").unwrap();
    wait_status(&dev, "committed", |s| {
        s["committed_version"] == "2.0.0" && s["phase"] == "idle"
    });
    assert_eq!(dev.slot_bytes("b"), image_bytes("2.0.0", IMAGE));
    dev.assert_bootable();
    assert!(!srv.requests_for("/fw.fnb").is_empty());
}

#[test]
fn with_throttle_a_metered_link_downloads_without_waiting() {
    let Some(net) = Netns::new("thr") else { return };
    let dev =
        device("metered_interfaces = [\"wwan*\"]\non_metered = \"throttle\"\nmetered_max_rate = 1048576\n");
    let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
    let srv = net.serve();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let url = format!("http://{SERVER}:{}/fw.fnb", srv.addr().port());
    let _daemon = net.daemon(&dev);
    let child = install(&dev, &url);
    committed(&dev, child, "2.0.0", IMAGE);
    assert!(!dev.log().contains("metered_link"), "never held:\n{}", dev.log());
}

#[test]
fn a_route_that_turns_metered_mid_download_pauses_it_and_the_resume_keeps_what_it_has() {
    let Some(net) = Netns::new("pause") else { return };
    // 2 MiB/s on every link: the 16 MiB image takes about 8 s. The route changes in the last,
    // single request (past the header probe's doubling parts, which end at 8 MiB), so only the
    // recheck while the body streams can notice it.
    let dev = device("metered_interfaces = [\"wwan*\"]\nmax_rate = 2097152\n");
    let bundle = dev.bundle("v2", "2.0.0", BIG, &[]);
    let len = std::fs::metadata(&bundle).unwrap().len();
    let srv = net.serve();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let url = format!("http://{SERVER}:{}/fw.fnb", srv.addr().port());
    net.route("eth1").unwrap();
    let _daemon = net.daemon(&dev);

    let child = install(&dev, &url);
    wait_status(&dev, "written 9 MiB", |s| {
        s["phase"] == "downloading" && s["progress"]["bytes"].as_u64().is_some_and(|b| b > 9 << 20)
    });
    let requests = srv.requests_for("/fw.fnb").len();
    net.route("wwan0").unwrap();
    wait_status(&dev, "paused for the metered link", waiting_for("metered_link"));
    assert_eq!(
        srv.requests_for("/fw.fnb").len(),
        requests,
        "paused within the request that was streaming, not at the next one"
    );
    // The connection is closed by now; let the server notice before counting.
    std::thread::sleep(Duration::from_secs(1));
    let kept = dev.status()["progress"]["bytes"].as_u64().unwrap_or(0);
    assert!(kept > 9 << 20 && kept < len, "kept {kept} of {len}");
    let sent = srv.bytes_sent_for("/fw.fnb");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        srv.bytes_sent_for("/fw.fnb"),
        sent,
        "the server sends nothing more while the route is metered"
    );
    assert!(sent < len, "the pause came before the end: sent {sent} of {len}");

    net.route("eth1").unwrap();
    committed(&dev, child, "2.0.0", BIG);
    let resumed = srv
        .requests_for("/fw.fnb")
        .into_iter()
        .filter_map(|r| r.range)
        .filter_map(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        resumed > 0,
        "the resume asked for the rest only (Range from {resumed})"
    );
    assert!(
        srv.bytes_sent_for("/fw.fnb") < len * 3 / 2,
        "sent {} for a {len}-byte bundle",
        srv.bytes_sent_for("/fw.fnb")
    );
}

#[test]
fn outside_the_window_the_download_waits_with_reason_download_window() {
    // No namespaces needed: a window that closed an hour ago and opens in an hour.
    let minute = flightnode_agent::netpolicy::window::local_minute_of_day();
    let at = |m: u16| format!("{:02}:{:02}", m / 60 % 24, m % 60);
    let window = format!("{}-{}", at((minute + 60) % 1440), at((minute + 23 * 60) % 1440));
    let dev = device(&format!("window = \"{window}\"\n"));
    let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let _daemon = Daemon::start_with(&dev, &[("RUST_LOG", "info")]);
    let mut child = install(&dev, &srv.url("/fw.fnb"));
    wait_status(&dev, "waited for the window", waiting_for("download_window"));
    std::thread::sleep(Duration::from_secs(2));
    let s = dev.status();
    assert_eq!(s["wait_reason"], "download_window", "{s:#}");
    assert_eq!(
        srv.requests_for("/fw.fnb"),
        vec![],
        "nothing fetched outside the window"
    );
    assert!(
        dev.log().contains(&window),
        "the log names the window:\n{}",
        dev.log()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_chunked_download_paused_by_a_metered_route_resumes_and_commits() {
    let Some(net) = Netns::new("chunk") else { return };
    let dev = device("metered_interfaces = [\"wwan*\"]\nmax_rate = 2097152\n");
    let bundle = dev.bundle("v2", "2.0.0", BIG, &["--chunked", "--level", "3"]);
    let len = std::fs::metadata(&bundle).unwrap().len();
    let srv = net.serve();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let url = format!("http://{SERVER}:{}/fw.fnb", srv.addr().port());
    net.route("eth1").unwrap();
    let _daemon = net.daemon(&dev);

    let child = install(&dev, &url);
    assert!(
        wait_until(WAIT, POLL, || srv.bytes_sent_for("/fw.fnb") > 4 << 20),
        "the chunks never started:\n{}",
        dev.log()
    );
    net.route("wwan0").unwrap();
    wait_status(&dev, "paused for the metered link", waiting_for("metered_link"));
    std::thread::sleep(Duration::from_secs(1));
    let sent = srv.bytes_sent_for("/fw.fnb");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(srv.bytes_sent_for("/fw.fnb"), sent, "nothing more while metered");
    assert!(sent < len, "paused before the end: sent {sent} of {len}");

    net.route("eth1").unwrap();
    committed(&dev, child, "2.0.0", BIG);
    assert!(
        srv.bytes_sent_for("/fw.fnb") < len * 3 / 2,
        "the verified chunks were kept: sent {} for a {len}-byte bundle",
        srv.bytes_sent_for("/fw.fnb")
    );
}

#[test]
fn a_cancel_ends_a_window_hold_and_nothing_was_fetched() {
    let broker = flightnode_tests::mosquitto::Mosquitto::start().unwrap();
    let minute = flightnode_agent::netpolicy::window::local_minute_of_day();
    let at = |m: u16| format!("{:02}:{:02}", m / 60 % 24, m % 60);
    let window = format!("{}-{}", at((minute + 60) % 1440), at((minute + 120) % 1440));
    let dev = device(&format!("window = \"{window}\"\n"));
    let config = std::fs::read_to_string(&dev.config).unwrap();
    let config = format!(
        "{config}[commands]\ninsecure_accept_unsigned = true\n[mqtt]\nurl = \"{}\"\nmax_backoff = \"1s\"\n",
        broker.url()
    );
    std::fs::write(&dev.config, config).unwrap();
    let sub = broker.subscriber("firmware/drone-test/status").unwrap();
    let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
    let srv = BundleServer::start_blocking().unwrap();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    let _daemon = Daemon::start_subscribed(&dev);
    let upgrade = format!(
        r#"{{"type":"upgrade","upgrade_id":"up-win","url":"{}"}}"#,
        srv.url("/fw.fnb")
    );
    broker
        .publish("firmware/drone-test/upgrade", upgrade.as_bytes(), false)
        .unwrap();
    assert!(
        sub.wait_for(r#""phase":"waiting","wait_reason":"download_window""#, WAIT),
        "{}\n{}",
        sub.output(),
        dev.log()
    );
    broker
        .publish(
            "firmware/drone-test/upgrade",
            br#"{"type":"cancel","upgrade_id":"up-win"}"#,
            false,
        )
        .unwrap();
    assert!(
        sub.wait_for(r#""result":"canceled""#, WAIT),
        "{}\n{}",
        sub.output(),
        dev.log()
    );
    assert_eq!(srv.requests_for("/fw.fnb"), vec![]);
    assert_eq!(dev.status()["committed_version"], "1.0.0");
    dev.assert_bootable();
}

#[test]
fn a_stalled_connection_on_a_route_turned_metered_pauses_within_seconds_not_at_idle_timeout() {
    let Some(net) = Netns::new("stall") else { return };
    let dev = device("metered_interfaces = [\"wwan*\"]\n");
    // A long idle timeout: a pause that waited for it (and the retry) would miss the bound below.
    let config = std::fs::read_to_string(&dev.config).unwrap();
    std::fs::write(
        &dev.config,
        config.replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\""),
    )
    .unwrap();
    let bundle = dev.bundle("v2", "2.0.0", IMAGE, &[]);
    let srv = net.serve();
    srv.put_file("/fw.fnb", &bundle).unwrap();
    srv.set_fault(
        "/fw.fnb",
        flightnode_tests::http_server::Fault::Stall { after: 1 << 20 },
    );
    let url = format!("http://{SERVER}:{}/fw.fnb", srv.addr().port());
    net.route("eth1").unwrap();
    let _daemon = net.daemon(&dev);

    let child = install(&dev, &url);
    assert!(
        wait_until(WAIT, POLL, || srv.bytes_sent_for("/fw.fnb") >= 1 << 20),
        "the body never reached the stall:\n{}",
        dev.log()
    );
    net.route("wwan0").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), POLL, || waiting_for("metered_link")(
            &dev.status()
        )),
        "a stalled download was not paused within 10 s of the route change: {:#}\n{}",
        dev.status(),
        dev.log()
    );
    srv.clear_fault("/fw.fnb");
    net.route("eth1").unwrap();
    committed(&dev, child, "2.0.0", IMAGE);
}
