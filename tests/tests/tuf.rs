//! End-to-end: TUF mode as a release engineer and an attacker see it. The repository is made and
//! changed with the real `flightnode-release` CLI, served by the test HTTP server, and drones are
//! real `flightnode-agent run` processes taking upgrade commands over mosquitto. Every refusal is
//! asserted as a user sees it: the upgrade's result and code on the status (and at the hub), and
//! the slot that runs and its version unchanged.

use flightnode_tests::agent::{binary, run_ok};
use flightnode_tests::fleet::{Broker, Drone, Fleet, FleetOptions, wait_until};
use flightnode_tests::http_server::BundleServer;
use flightnode_tests::mosquitto::Mosquitto;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_mins(1);
const ID: &str = "drone-1";
const MIB: usize = 1024 * 1024;

fn mosquitto(fleet: &Fleet) -> &Mosquitto {
    match &fleet.broker {
        Broker::Mosquitto(m) => m,
        Broker::Embedded { .. } => unreachable!("these tests run mosquitto"),
    }
}

/// The release engineer's side: keys, the repository, the CLI.
struct Release {
    bin: PathBuf,
    dir: PathBuf,
}

impl Release {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        Self {
            bin: binary("flightnode-release").unwrap(),
            dir: dir.to_owned(),
        }
    }

    fn repo(&self) -> PathBuf {
        self.dir.join("repo")
    }

    fn key(&self, name: &str) -> String {
        self.dir
            .join("keys")
            .join(format!("{name}.pem"))
            .display()
            .to_string()
    }

    /// `flightnode-release ARGS --repo REPO`; fails the test with its output when it fails.
    fn run(&self, args: &[&str]) -> String {
        self.run_in(&self.repo(), args)
    }

    fn run_in(&self, repo: &Path, args: &[&str]) -> String {
        let repo = repo.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--repo", &repo]);
        let out = run_ok(&self.bin, &all).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new repository with one key per role (`root`, `targets`, `snapshot`, `timestamp`).
    fn init_one_key_per_role(&self) {
        let roles = ["root", "targets", "snapshot", "timestamp"];
        self.keygen(&roles);
        let mut args = vec!["init".to_owned()];
        for role in roles {
            args.extend([format!("--{role}-key"), self.key(role)]);
        }
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    fn keygen(&self, names: &[&str]) {
        for name in names {
            run_ok(&self.bin, &["keygen", &self.key(name)]).unwrap();
        }
    }

    /// `--targets-key T --snapshot-key snapshot --timestamp-key timestamp`.
    fn online(&self, targets: &str) -> Vec<String> {
        vec![
            "--targets-key".into(),
            self.key(targets),
            "--snapshot-key".into(),
            self.key("snapshot"),
            "--timestamp-key".into(),
            self.key("timestamp"),
        ]
    }

    /// Adds `bundle` as a target signed with targets key `targets`.
    fn add(&self, bundle: &Path, targets: &str) {
        let bundle = bundle.display().to_string();
        let keys = self.online(targets);
        let mut args = vec!["add", bundle.as_str()];
        args.extend(keys.iter().map(String::as_str));
        self.run(&args);
    }
}

/// Serves `repo`'s metadata at `/metadata/` and its bundles at `/targets/`.
fn serve(server: &BundleServer, repo: &Path) {
    for sub in ["metadata", "targets"] {
        let Ok(entries) = std::fs::read_dir(repo.join(sub)) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            server.put_file(&format!("/{sub}/{name}"), entry.path()).unwrap();
        }
    }
}

/// A fleet with one drone in TUF mode, its shipped root the repository's root.json version 1.
fn tuf_fleet(release: &Release) -> (Fleet, Drone) {
    tuf_fleet_with(release, None)
}

/// [`tuf_fleet`] with another agent program (a wrapper).
fn tuf_fleet_with(release: &Release, agent_bin: Option<PathBuf>) -> (Fleet, Drone) {
    let fleet = Fleet::start(FleetOptions {
        drones: 0,
        agent_bin,
        ..FleetOptions::default()
    })
    .unwrap();
    let root = fleet.dir.path().join("shipped-root.json");
    std::fs::copy(release.repo().join("root.json"), &root).unwrap();
    let extra = format!(
        "[tuf]\nroot = {:?}\nmetadata_url = {:?}\n",
        root.display().to_string(),
        fleet.bundles.url("/metadata/")
    );
    let mut drone = fleet.make_drone(ID, "true", &extra).unwrap();
    drone.start().unwrap();
    mosquitto(&fleet)
        .wait_subscribed(ID, WAIT, || None::<String>)
        .unwrap();
    (fleet, drone)
}

/// Publishes an upgrade to `url` with id `id` and waits until it ended; returns the status.
fn upgrade(fleet: &Fleet, drone: &Drone, id: &str, url: &str) -> Value {
    // Through the hub, which signs the command for the drone.
    fleet
        .hub_upgrade(ID, &["--url", url, "--upgrade-id", id])
        .unwrap();
    let mut last = Value::Null;
    let ended = wait_until(WAIT, Duration::from_millis(200), || {
        if let Ok(s) = drone.status() {
            last = s;
        }
        last["last_upgrade"]["upgrade_id"] == id && last["phase"] == "idle"
    });
    assert!(ended, "upgrade {id} did not end: {last:#}\n{}", drone.log());
    last
}

fn committed(status: &Value, version: &str) {
    assert_eq!(status["last_upgrade"]["result"], "committed", "{status:#}");
    assert_eq!(status["committed_version"], version, "{status:#}");
}

/// The upgrade was refused with `code`, and the drone still runs `slot` with `version`.
fn refused(status: &Value, code: &str, slot: &str, version: &str) {
    assert_eq!(status["last_upgrade"]["error"]["code"], code, "{status:#}");
    assert_ne!(status["last_upgrade"]["result"], "committed", "{status:#}");
    assert_eq!(status["committed_version"], version, "{status:#}");
    assert_eq!(status["active_slot"], slot, "{status:#}");
    assert_eq!(status["slots"][slot]["version"], version, "{status:#}");
    assert_eq!(status["slots"][slot]["state"], "good", "{status:#}");
}

/// Makes a bundle (image bytes follow `version`) and returns its path and its target name.
fn bundle(fleet: &Fleet, name: &str, version: &str) -> (PathBuf, String) {
    let (path, _) = fleet.bundle(name, version, MIB).unwrap();
    (path, format!("{name}.fnb"))
}

#[test]
fn release_engineer_rotates_and_revokes_keys_and_drones_follow() {
    let work = tempfile::tempdir().unwrap();
    let release = Release::new(work.path());
    release.keygen(&[
        "root",
        "targets-a",
        "targets-b",
        "targets-c",
        "snapshot",
        "timestamp",
    ]);
    let (root, ta, snap, ts) = (
        release.key("root"),
        release.key("targets-a"),
        release.key("snapshot"),
        release.key("timestamp"),
    );
    release.run(&[
        "init",
        "--root-key",
        &root,
        "--targets-key",
        &ta,
        "--snapshot-key",
        &snap,
        "--timestamp-key",
        &ts,
    ]);
    let (fleet, drone) = tuf_fleet(&release);
    let config_before = std::fs::read(&drone.config).unwrap();
    let url = |name: &str| fleet.bundles.url(&format!("/targets/{name}"));

    // 1. A bundle signed into the repository: the drone upgrades.
    let (b2, n2) = bundle(&fleet, "fw-2", "2.0.0");
    release.add(&b2, "targets-a");
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-2", &url(&n2));
    committed(&s, "2.0.0");

    // 2. The targets key is rotated (a new root version signed by the root key); the next bundle
    // is signed by the new key only, and the drone follows with the same config.
    release.run(&[
        "rotate",
        "--role",
        "targets",
        "--old",
        &ta,
        "--new",
        &release.key("targets-b"),
        "--root-key",
        &root,
        "--targets-key",
        &release.key("targets-b"),
        "--snapshot-key",
        &snap,
        "--timestamp-key",
        &ts,
    ]);
    let (b3, n3) = bundle(&fleet, "fw-3", "3.0.0");
    release.add(&b3, "targets-b");
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-3", &url(&n3));
    committed(&s, "3.0.0");
    let running = s["active_slot"].as_str().unwrap().to_owned();

    // The old key can no longer sign for targets, even with the release tool.
    let out = std::process::Command::new(&release.bin)
        .args(["add", &b3.display().to_string(), "--name", "again.fnb"])
        .args(release.online("targets-a"))
        .args(["--repo", &release.repo().display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a rotated-out key signed targets.json");

    // 3. targets-b leaks: it is revoked (targets-c takes its place). The attacker, holding
    // targets-b and the server with its online keys, signs an evil bundle into targets with the
    // revoked key only.
    let attack = work.path().join("attack");
    let snapshot_before = work.path().join("before-revoke");
    copy_dir(&release.repo(), &snapshot_before);
    release.run(&[
        "revoke",
        "--role",
        "targets",
        "--key",
        &release.key("targets-b"),
        "--replace-with",
        &release.key("targets-c"),
        "--root-key",
        &root,
        "--targets-key",
        &release.key("targets-c"),
        "--snapshot-key",
        &snap,
        "--timestamp-key",
        &ts,
    ]);
    serve(&fleet.bundles, &release.repo());
    copy_dir(&release.repo(), &attack);
    // The attacker's tool is given the root that still lists targets-b.
    std::fs::copy(snapshot_before.join("root.json"), attack.join("root.json")).unwrap();
    let (evil, evil_name) = bundle(&fleet, "evil", "9.0.0");
    let evil_path = evil.display().to_string();
    let mut args = vec!["add", evil_path.as_str()];
    let keys = release.online("targets-b");
    args.extend(keys.iter().map(String::as_str));
    release.run_in(&attack, &args);
    serve(&fleet.bundles, &attack);
    let s = upgrade(&fleet, &drone, "u-evil", &url(&evil_name));
    refused(&s, "tuf_signature", &running, "3.0.0");
    assert!(
        s["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("targets"),
        "the message names the role: {s:#}"
    );
    // The attacker also hides the root that revoked targets-b (root version 2 still lists it):
    // the drone kept the newest root it verified and refuses all the same.
    fleet.bundles.remove("/metadata/3.root.json");
    fleet
        .bundles
        .put_file("/metadata/root.json", snapshot_before.join("root.json"))
        .unwrap();
    let s = upgrade(&fleet, &drone, "u-evil-old-root", &url(&evil_name));
    refused(&s, "tuf_signature", &running, "3.0.0");
    // The hub sees the code too.
    fleet
        .wait_flightnode(ID, WAIT, |f| {
            f["status"]["lastUpgrade"]["errorCode"] == "tuf_signature"
        })
        .unwrap();

    // 4. The legitimate repository goes on with targets-c: the drone upgrades again.
    let (b4, n4) = bundle(&fleet, "fw-4", "4.0.0");
    release.add(&b4, "targets-c");
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-4", &url(&n4));
    committed(&s, "4.0.0");
    assert_eq!(
        std::fs::read(&drone.config).unwrap(),
        config_before,
        "no config change was needed"
    );
}

/// A freeze attack on a drone whose wall clock is a year behind: by its own clock the expired
/// timestamp would still be valid for a year; by its trusted clock (the hub's signed time) it
/// expired, and it is refused.
#[test]
fn a_drone_a_year_behind_refuses_an_expired_timestamp_by_the_hubs_time() {
    let work = tempfile::tempdir().unwrap();
    let Some(agent) = flightnode_tests::agent::agent_a_year_behind(work.path()).unwrap() else {
        return;
    };
    let release = Release::new(work.path());
    release.init_one_key_per_role();
    let (fleet, drone) = tuf_fleet_with(&release, Some(agent));
    let mut last = Value::Null;
    assert!(
        wait_until(WAIT, Duration::from_millis(200), || {
            if let Ok(s) = drone.status() {
                last = s;
            }
            last["clock"]["source"] == "hub"
        }),
        "the drone never trusted the hub's time: {last:#}\n{}",
        drone.log()
    );
    let (b2, n2) = bundle(&fleet, "fw-2", "2.0.0");
    release.add(&b2, "targets");
    release.run(&[
        "timestamp",
        "--timestamp-key",
        &release.key("timestamp"),
        "--timestamp-expires",
        "1s",
    ]);
    serve(&fleet.bundles, &release.repo());
    std::thread::sleep(Duration::from_secs(2));
    let s = upgrade(
        &fleet,
        &drone,
        "u-frozen",
        &fleet.bundles.url(&format!("/targets/{n2}")),
    );
    refused(&s, "tuf_expired", "a", "1.0.0");
}

#[test]
fn attacks_on_the_repository_are_refused_with_their_codes() {
    let work = tempfile::tempdir().unwrap();
    let release = Release::new(work.path());
    release.init_one_key_per_role();
    let (fleet, mut drone) = tuf_fleet(&release);
    let url = |name: &str| fleet.bundles.url(&format!("/targets/{name}"));
    let meta = |name: &str| release.repo().join("metadata").join(name);

    let (b2, n2) = bundle(&fleet, "fw-2", "2.0.0");
    release.add(&b2, "targets");
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-2", &url(&n2));
    committed(&s, "2.0.0");
    let old_timestamp = std::fs::read(meta("timestamp.json")).unwrap();
    let old_snapshot = std::fs::read(meta("snapshot.json")).unwrap();

    let (b3, n3) = bundle(&fleet, "fw-3", "3.0.0");
    release.add(&b3, "targets");
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-3", &url(&n3));
    committed(&s, "3.0.0");
    let running = s["active_slot"].as_str().unwrap().to_owned();

    // Freeze: the timestamp was not re-signed in time (expired), the rest is valid.
    let (b4, n4) = bundle(&fleet, "fw-4", "4.0.0");
    release.add(&b4, "targets");
    release.run(&[
        "timestamp",
        "--timestamp-key",
        &release.key("timestamp"),
        "--timestamp-expires",
        "1s",
    ]);
    serve(&fleet.bundles, &release.repo());
    std::thread::sleep(Duration::from_secs(2));
    let s = upgrade(&fleet, &drone, "u-frozen", &url(&n4));
    refused(&s, "tuf_expired", &running, "3.0.0");
    assert!(
        s["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("timestamp"),
        "the message names the role: {s:#}"
    );
    release.run(&["timestamp", "--timestamp-key", &release.key("timestamp")]);
    serve(&fleet.bundles, &release.repo());

    // Rollback: the timestamp and snapshot of before 3.0.0 served again, also after a restart
    // (the trusted versions live in the state directory).
    fleet
        .bundles
        .put("/metadata/timestamp.json", old_timestamp.clone());
    fleet.bundles.put("/metadata/snapshot.json", old_snapshot.clone());
    let s = upgrade(&fleet, &drone, "u-rollback", &url(&n4));
    refused(&s, "tuf_rollback", &running, "3.0.0");
    let subacks = || {
        mosquitto(&fleet)
            .log()
            .lines()
            .filter(|l| l.ends_with(&format!("Sending SUBACK to {ID}")))
            .count()
    };
    let before = subacks();
    drone.stop();
    drone.start().unwrap();
    assert!(
        wait_until(WAIT, Duration::from_millis(50), || subacks() > before),
        "the restarted agent did not subscribe again"
    );
    let s = upgrade(&fleet, &drone, "u-rollback-after-restart", &url(&n4));
    refused(&s, "tuf_rollback", &running, "3.0.0");

    // An older snapshot under a newer timestamp that lists it, signed with the timestamp key
    // (an attacker holding the online key): the snapshot rollback itself is refused.
    let forged = work.path().join("forged");
    copy_dir(&release.repo(), &forged);
    std::fs::write(forged.join("metadata/snapshot.json"), &old_snapshot).unwrap();
    release.run_in(
        &forged,
        &["timestamp", "--timestamp-key", &release.key("timestamp")],
    );
    serve(&fleet.bundles, &forged);
    let s = upgrade(&fleet, &drone, "u-old-snapshot", &url(&n4));
    refused(&s, "tuf_rollback", &running, "3.0.0");
    assert!(
        s["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("snapshot"),
        "the message names the role: {s:#}"
    );
    // The drone now trusts the forged timestamp's version: the release engineer's next
    // timestamp is numbered past it.
    release.run(&["timestamp", "--timestamp-key", &release.key("timestamp")]);
    release.run(&["timestamp", "--timestamp-key", &release.key("timestamp")]);
    serve(&fleet.bundles, &release.repo());
    let current_timestamp = std::fs::read(meta("timestamp.json")).unwrap();

    // Rollback of the snapshot alone, under a current timestamp: the files do not belong
    // together (mix-and-match).
    fleet.bundles.put("/metadata/timestamp.json", current_timestamp);
    fleet.bundles.put("/metadata/snapshot.json", old_snapshot);
    let s = upgrade(&fleet, &drone, "u-mix", &url(&n4));
    refused(&s, "tuf_mix_and_match", &running, "3.0.0");
    serve(&fleet.bundles, &release.repo());

    // A bundle that is not a target: refused before a byte of it is fetched.
    let (stray, stray_name) = bundle(&fleet, "stray", "5.0.0");
    fleet
        .bundles
        .put_file(&format!("/targets/{stray_name}"), &stray)
        .unwrap();
    let s = upgrade(&fleet, &drone, "u-unknown", &url(&stray_name));
    refused(&s, "tuf_target_unknown", &running, "3.0.0");
    assert!(
        fleet
            .bundles
            .requests_for(&format!("/targets/{stray_name}"))
            .is_empty(),
        "the agent fetched a bundle that is not a target"
    );

    // A validly signed bundle of another length served under a target's name: refused from the
    // length the server announces, before a byte of it reaches the inactive slot.
    let inactive = if running == "a" { "b" } else { "a" };
    let inactive_before = drone.slot(inactive);
    let (short, _) = fleet.bundle("short-4", "4.0.0", MIB / 2).unwrap();
    fleet.bundles.put_file(&format!("/targets/{n4}"), &short).unwrap();
    let s = upgrade(&fleet, &drone, "u-short", &url(&n4));
    refused(&s, "tuf_target_mismatch", &running, "3.0.0");
    assert!(
        s["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("length"),
        "{s:#}"
    );
    assert!(
        drone.slot(inactive) == inactive_before,
        "the inactive slot was written before the length was checked"
    );

    // The bytes served under a target's name differ from targets.json: another validly signed
    // bundle of the same length (the inner signature alone would accept it).
    let (other, _) = bundle(&fleet, "other-4", "4.0.9");
    let other_bytes = std::fs::read(&other).unwrap();
    assert_eq!(
        other_bytes.len() as u64,
        std::fs::metadata(&b4).unwrap().len(),
        "the swapped bundle must have the target's length, so only its sha256 tells them apart"
    );
    fleet.bundles.put(&format!("/targets/{n4}"), other_bytes);
    let s = upgrade(&fleet, &drone, "u-swapped", &url(&n4));
    refused(&s, "tuf_target_mismatch", &running, "3.0.0");
    assert!(
        s["last_upgrade"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("sha256"),
        "{s:#}"
    );

    // The metadata cannot be fetched: the upgrade fails with tuf_fetch, nothing downloaded.
    serve(&fleet.bundles, &release.repo());
    fleet.bundles.remove("/metadata/timestamp.json");
    let s = upgrade(&fleet, &drone, "u-unreachable", &url(&n4));
    refused(&s, "tuf_fetch", &running, "3.0.0");
    assert_eq!(s["last_upgrade"]["result"], "failed", "{s:#}");

    // The repository as published still works: every refusal above was the attack's.
    serve(&fleet.bundles, &release.repo());
    let s = upgrade(&fleet, &drone, "u-4", &url(&n4));
    committed(&s, "4.0.0");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}
