//! What ships: the static release builds (size budget, no libc floor), the agent's Debian
//! packages — lintian-clean, and installed, upgraded, removed and purged with dpkg in a clean
//! Debian 12 root as an operator's apt would — and the hub's: its image (the hub and the kubectl
//! plugin on an empty root) and its Debian package (both binaries and the deploy manifests),
//! whose `kubectl-flightnode` runs in the clean root and, where kubectl is installed, is found by
//! `kubectl plugin list` there.
//!
//! Needs root (chroot), cargo-deb, lintian, mmdebstrap and the musl targets; `./test.sh` installs
//! them. The first run downloads a minimal Debian root (about 60 MB) and caches it under
//! `target/debian-root/`. Set `FLIGHTNODE_SKIP_PACKAGING=1` to skip on a machine without them.
//!
//! The file's name puts it last among the harness's tests (cargo runs test binaries by name): it
//! needs the x86_64 release builds, the last the background prebuild makes, so the tests that
//! need none run while they are built.

use flightnode_tests::release::{self, AARCH64, MAX_AGENT_BYTES, X86_64, run};

/// The kubectl plugin's budget: it is std and an exec, so well under a megabyte; far over that,
/// something pulled the hub's libraries into it.
const MAX_PLUGIN_BYTES: u64 = 1024 * 1024;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn skip() -> bool {
    if std::env::var_os("FLIGHTNODE_SKIP_PACKAGING").is_some() {
        eprintln!("FLIGHTNODE_SKIP_PACKAGING set: skipped");
        return true;
    }
    false
}

#[test]
fn release_agents_are_static_and_fit_the_size_budget() {
    if skip() {
        return;
    }
    for (target, arch) in [(AARCH64, "aarch64"), (X86_64, "x86-64")] {
        let build = release::build(target).unwrap();
        let kind = release::file_type(&build.agent).unwrap();
        assert!(kind.contains(arch), "{target}: not an {arch} binary: {kind}");
        // "static-pie linked" or "statically linked": no interpreter, so no glibc floor.
        assert!(kind.contains("static"), "{target}: not a static binary: {kind}");
        assert!(!kind.contains("not stripped"), "{target}: not stripped: {kind}");
        let size = std::fs::metadata(&build.agent).unwrap().len();
        eprintln!(
            "{target}: flightnode-agent {size} bytes ({:.2} MiB)",
            size as f64 / 1_048_576.0
        );
        assert!(
            size <= MAX_AGENT_BYTES,
            "{target}: agent is {size} bytes, over the {MAX_AGENT_BYTES} budget"
        );
    }
}

fn deb_field(deb: &Path, field: &str) -> String {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field)).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// lintian at warning level, with the package's own overrides (each has its reason).
fn assert_lintian_clean(deb: &Path) {
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--tag-display-limit",
            "0",
        ])
        .arg(deb)
        .output()
        .expect("run lintian (apt-get install lintian)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lintian {}:\n{text}", deb.display());
    assert!(
        out.status.success(),
        "lintian failed on {}:\n{text}",
        deb.display()
    );
    // Info tags are printed, not failed on: the overrides are shared by both architectures, so
    // one of them always reports an unused override.
    let tags: Vec<&str> = text.lines().filter(|l| l.starts_with(['E', 'W'])).collect();
    assert!(
        tags.is_empty(),
        "lintian tags on {}:\n{}",
        deb.display(),
        tags.join("\n")
    );
}

#[test]
fn arm64_package_holds_the_static_aarch64_agent_and_is_lintian_clean() {
    if skip() {
        return;
    }
    let deb = release::deb(AARCH64).unwrap();
    assert_eq!(deb_field(&deb, "Architecture"), "arm64");
    assert_eq!(deb_field(&deb, "Package"), "flightnode-agent");
    // CA roots only for https:// bundles: recommended, so a board image without them still
    // installs the agent (it starts and fetches http:// bundles without them).
    assert_eq!(deb_field(&deb, "Recommends"), "ca-certificates");
    let depends = deb_field(&deb, "Depends");
    assert!(!depends.contains("ca-certificates"), "Depends: {depends}");
    assert_lintian_clean(&deb);

    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.path())).unwrap();
    let kind = release::file_type(&dir.path().join("usr/bin/flightnode-agent")).unwrap();
    assert!(kind.contains("aarch64") && kind.contains("static"), "{kind}");
    // The autopilot's half of the arming interlock ships with the agent, the same bytes.
    let lua = "usr/share/flightnode-agent/ardupilot/flightnode_arming.lua";
    assert_eq!(
        std::fs::read(dir.path().join(lua)).unwrap(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/ardupilot/flightnode_arming.lua"))
            .unwrap(),
        "{lua}"
    );
    let conffiles = run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout).trim(),
        "/etc/flightnode/agent.toml"
    );
}

/// A Debian root to install into, unpacked fresh for this test under `target/` (a root is too big
/// for a tmpfs /tmp on small CI machines).
struct Root {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Root {
    fn new() -> Self {
        let base = release::workspace_root().join("target/debian-root");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(&base).unwrap();
        let path = dir.path().join("root");
        std::fs::create_dir(&path).unwrap();
        release::debian_root(&path).unwrap();
        // systemd cannot run in a chroot, so a stand-in for its systemctl records what the
        // maintainer scripts ask of it; `/run/systemd/system` tells them systemd is running, as on
        // a board. It lives in /usr/local/bin: deb-systemd-helper looks for a real systemctl in
        // /bin and /usr/bin only (and would hand it the enabling), so the unit's symlinks are
        // still deb-systemd-helper's own, and is-enabled answers from them.
        std::fs::create_dir_all(path.join("run/systemd/system")).unwrap();
        let systemctl = path.join("usr/local/bin/systemctl");
        std::fs::write(
            &systemctl,
            r#"#!/bin/sh
echo "$*" >> /var/log/systemctl-calls
case " $* " in
*" is-enabled "*)
    for unit; do :; done
    if [ -e "/etc/systemd/system/multi-user.target.wants/$unit" ]; then echo enabled; else echo disabled; exit 1; fi ;;
esac
exit 0
"#,
        )
        .unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        Root { _dir: dir, path }
    }

    /// The start/stop/restart requests made to systemd since the last call, e.g.
    /// `["start flightnode-agent.service"]` (queries and daemon-reloads left out).
    fn unit_actions(&self) -> Vec<String> {
        let log = self.at("var/log/systemctl-calls");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::write(&log, "").unwrap();
        text.lines()
            .map(|l| {
                l.split_whitespace()
                    .filter(|w| !w.starts_with('-'))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|l| {
                ["start ", "stop ", "restart ", "try-restart ", "reload "]
                    .iter()
                    .any(|v| l.starts_with(v))
            })
            .collect()
    }

    fn at(&self, path: &str) -> PathBuf {
        self.path.join(path.trim_start_matches('/'))
    }

    /// Runs a command inside the root; returns stdout+stderr, failing on a non-zero exit.
    fn chroot(&self, args: &[&str]) -> String {
        let out = run(Command::new("chroot")
            .arg(&self.path)
            .args(args)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn install(&self, deb: &Path) -> String {
        let name = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, self.at("tmp").join(name)).unwrap();
        self.chroot(&["dpkg", "-i", &format!("/tmp/{name}")])
    }
}

/// The same package with another version: what an upgrade looks like to dpkg.
fn with_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree)).unwrap();
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&control, text).unwrap();
    let out = dir.join(format!("flightnode-agent_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&out))
    .unwrap();
    out
}

#[test]
fn amd64_package_installs_upgrades_keeps_config_and_state_and_purges_in_a_clean_debian_root() {
    if skip() {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "installing into a Debian root needs root (chroot); or FLIGHTNODE_SKIP_PACKAGING=1"
    );
    // The root comes from the network and the build from the CPU: made side by side.
    let root = std::thread::spawn(Root::new);
    let deb = release::deb(X86_64).unwrap();
    assert_eq!(deb_field(&deb, "Architecture"), "amd64");
    assert_lintian_clean(&deb);
    let root = root.join().expect("making the Debian root failed");
    let unit_wants = "etc/systemd/system/multi-user.target.wants/flightnode-agent.service";
    let example = std::fs::read_to_string(release::workspace_root().join("systemd/agent.toml")).unwrap();

    let unit_name = "flightnode-agent.service";

    // Install: binary, unit, example config as a conffile, state dir, unit enabled and started.
    root.install(&deb);
    assert_eq!(root.unit_actions(), [format!("start {unit_name}")], "install");
    let version = root.chroot(&["/usr/bin/flightnode-agent", "--version"]);
    assert!(version.starts_with("flightnode-agent "), "{version}");
    let unit = [
        "lib/systemd/system/flightnode-agent.service",
        "usr/lib/systemd/system/flightnode-agent.service",
    ]
    .into_iter()
    .find(|p| root.at(p).is_file())
    .expect("the unit is installed under the systemd unit dir");
    assert_eq!(
        std::fs::read_to_string(root.at(unit)).unwrap(),
        std::fs::read_to_string(release::workspace_root().join("systemd/flightnode-agent.service")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(root.at("etc/flightnode/agent.toml")).unwrap(),
        example
    );
    let conffiles = root.chroot(&["dpkg-query", "-W", "-f", "${Conffiles}", "flightnode-agent"]);
    assert!(conffiles.contains("/etc/flightnode/agent.toml"), "{conffiles}");
    let state = std::fs::metadata(root.at("var/lib/flightnode")).unwrap();
    assert!(state.is_dir());
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    assert_eq!(state.uid(), 0);
    assert!(
        root.at(unit_wants).symlink_metadata().is_ok(),
        "the unit is not enabled after install"
    );
    // Every shipped file matches its md5sum (what debsums and `dpkg --verify` check on a board).
    assert_eq!(root.chroot(&["dpkg", "--verify", "flightnode-agent"]), "");

    // The operator edits the config and the agent writes state; an upgrade keeps both.
    let edited = example.replace("device_id = \"drone-0001\"", "device_id = \"drone-0042\"");
    assert_ne!(edited, example);
    std::fs::write(root.at("etc/flightnode/agent.toml"), &edited).unwrap();
    std::fs::write(root.at("var/lib/flightnode/current"), "b\n").unwrap();
    let work = tempfile::tempdir().unwrap();
    let newer = with_version(&deb, "99.0.0-1", work.path());
    root.install(&newer);
    assert_eq!(
        root.chroot(&["dpkg-query", "-W", "-f", "${Version}", "flightnode-agent"]),
        "99.0.0-1"
    );
    // Restarted once the new files are in place, never stopped for the unpack: the drone is not
    // left without its agent while dpkg works.
    assert_eq!(root.unit_actions(), [format!("restart {unit_name}")], "upgrade");
    assert_eq!(
        std::fs::read_to_string(root.at("etc/flightnode/agent.toml")).unwrap(),
        edited
    );
    assert!(!root.at("etc/flightnode/agent.toml.dpkg-new").exists());
    assert_eq!(
        std::fs::read_to_string(root.at("var/lib/flightnode/current")).unwrap(),
        "b\n"
    );
    assert!(
        root.at(unit_wants).symlink_metadata().is_ok(),
        "the unit is not enabled after upgrade"
    );

    // Remove: the agent is stopped, the program goes, config and state stay for a reinstall.
    root.chroot(&["dpkg", "-r", "flightnode-agent"]);
    assert_eq!(root.unit_actions(), [format!("stop {unit_name}")], "remove");
    assert!(!root.at("usr/bin/flightnode-agent").exists());
    assert!(!root.at(unit).exists());
    assert_eq!(
        std::fs::read_to_string(root.at("etc/flightnode/agent.toml")).unwrap(),
        edited
    );
    assert_eq!(
        std::fs::read_to_string(root.at("var/lib/flightnode/current")).unwrap(),
        "b\n"
    );

    // Purge: config, state and the enablement go too.
    root.chroot(&["dpkg", "-P", "flightnode-agent"]);
    assert_eq!(root.unit_actions(), Vec::<String>::new(), "purge");
    assert!(!root.at("etc/flightnode/agent.toml").exists());
    assert!(!root.at("var/lib/flightnode").exists());
    assert!(
        root.at(unit_wants).symlink_metadata().is_err(),
        "the enablement survived purge"
    );
    let status = Command::new("chroot")
        .arg(&root.path)
        .args(["dpkg-query", "-W", "flightnode-agent"])
        .output()
        .unwrap();
    assert!(
        !status.status.success(),
        "dpkg still knows the package after purge"
    );
}

/// buildah with its own storage in a temp dir: the host's image store is never touched and no
/// registry is contacted (`FROM scratch`).
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn cmd(&self, args: &[&str]) -> String {
        let out = run(Command::new("buildah")
            .arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
        .unwrap_or_else(|e| panic!("{e:#}\n(apt-get install buildah; or FLIGHTNODE_SKIP_PACKAGING=1)"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

#[test]
fn hub_image_is_the_static_hub_and_its_plugin_alone_running_as_nonroot_on_a_read_only_root() {
    if skip() {
        return;
    }
    let build = release::build(X86_64).unwrap();
    let (hub, plugin) = (build.hub.unwrap(), build.plugin.unwrap());
    for binary in [&hub, &plugin] {
        let kind = release::file_type(binary).unwrap();
        assert!(
            kind.contains("x86-64") && kind.contains("static"),
            "{}: not a static x86_64 binary: {kind}",
            binary.display()
        );
    }
    // The plugin only execs the hub: std and nothing else, so a second copy of the hub it is not.
    let (hub_size, plugin_size) = (
        std::fs::metadata(&hub).unwrap().len(),
        std::fs::metadata(&plugin).unwrap().len(),
    );
    eprintln!("flightnode-hub {hub_size} bytes, kubectl-flightnode {plugin_size} bytes");
    assert!(
        plugin_size <= MAX_PLUGIN_BYTES,
        "kubectl-flightnode is {plugin_size} bytes, over {MAX_PLUGIN_BYTES}"
    );

    // The build context holds the two binaries alone, as the Containerfile's header says.
    let buildah = Buildah {
        dir: tempfile::tempdir().unwrap(),
    };
    let ctx = buildah.dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::copy(&hub, ctx.join("flightnode-hub")).unwrap();
    std::fs::copy(&plugin, ctx.join("kubectl-flightnode")).unwrap();
    let containerfile = release::workspace_root().join("hub/Containerfile");
    buildah.cmd(&[
        "bud",
        "--quiet",
        "-f",
        containerfile.to_str().unwrap(),
        "-t",
        "flightnode-hub:test",
        ctx.to_str().unwrap(),
    ]);

    let inspect: serde_json::Value =
        serde_json::from_str(&buildah.cmd(&["inspect", "--type", "image", "flightnode-hub:test"])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/flightnode-hub"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["serve"]));

    // The image's root file system: the hub, its plugin and the directories leading to them,
    // nothing else.
    let container = buildah.cmd(&["from", "flightnode-hub:test"]);
    let rootfs = PathBuf::from(buildah.cmd(&["mount", &container]));
    let mut files: Vec<String> = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            files.push(path.strip_prefix(&rootfs).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    files.sort();
    assert_eq!(
        files,
        [
            "usr",
            "usr/bin",
            "usr/bin/flightnode-hub",
            "usr/bin/kubectl-flightnode"
        ]
    );
    let plugin_in_image = std::fs::symlink_metadata(rootfs.join("usr/bin/kubectl-flightnode")).unwrap();
    assert!(
        plugin_in_image.is_file(),
        "the plugin is no regular file in the image"
    );
    assert_eq!(
        plugin_in_image.len(),
        plugin_size,
        "the image's plugin is not the small one"
    );

    // It runs as uid 65532 from that root mounted read-only, and prints the committed CRD.
    let script = format!(
        "mount --bind {r} {r} && mount -o remount,bind,ro {r} && chroot --userspec=65532:65532 {r} /usr/bin/flightnode-hub crd",
        r = rootfs.display()
    );
    let out = run(Command::new("unshare").args(["--mount", "sh", "-c", &script])).unwrap();
    let crd = std::fs::read_to_string(release::workspace_root().join("hub/deploy/crd.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), crd);
    // The plugin runs there too: it finds the hub beside it and runs it as `kubectl flightnode`.
    let script = format!(
        "mount --bind {r} {r} && mount -o remount,bind,ro {r} && chroot --userspec=65532:65532 {r} /usr/bin/kubectl-flightnode fleet --help",
        r = rootfs.display()
    );
    let out = run(Command::new("unshare").args(["--mount", "sh", "-c", &script])).unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: kubectl flightnode fleet"), "{help}");
    buildah.cmd(&["umount", &container]);
    buildah.cmd(&["rm", &container]);
}

#[test]
fn hub_package_ships_the_hub_its_kubectl_plugin_and_the_manifests_and_installs_in_a_clean_debian_root() {
    if skip() {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "installing into a Debian root needs root (chroot); or FLIGHTNODE_SKIP_PACKAGING=1"
    );
    let root = std::thread::spawn(Root::new);
    let deb = release::hub_deb().unwrap();
    assert_eq!(deb_field(&deb, "Package"), "flightnode-hub");
    assert_eq!(deb_field(&deb, "Architecture"), "amd64");
    // Static binaries: nothing to depend on; kubectl only for `kubectl flightnode`.
    assert_eq!(deb_field(&deb, "Depends"), "");
    assert_eq!(deb_field(&deb, "Suggests"), "kubectl");
    assert_lintian_clean(&deb);

    // What it holds: both binaries, every manifest of the kustomization, the README.
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.path())).unwrap();
    for binary in ["usr/bin/flightnode-hub", "usr/bin/kubectl-flightnode"] {
        let meta = std::fs::symlink_metadata(dir.path().join(binary)).unwrap();
        assert!(meta.is_file(), "{binary} is no regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{binary}");
        let kind = release::file_type(&dir.path().join(binary)).unwrap();
        assert!(
            kind.contains("x86-64") && kind.contains("static"),
            "{binary}: {kind}"
        );
    }
    let deploy = release::workspace_root().join("hub/deploy");
    for manifest in [
        "kustomization.yaml",
        "crd.yaml",
        "namespace.yaml",
        "rbac.yaml",
        "rbac-auto-register.yaml",
        "deployment.yaml",
        "service.yaml",
        "examples/firmwarerollout.yaml",
        "examples/flightnode.yaml",
        "monitoring/podmonitor.yaml",
        "monitoring/prometheusrule.yaml",
        "monitoring/flightnode.rules.yml",
        "monitoring/grafana-dashboard.json",
    ] {
        let shipped = dir.path().join("usr/share/flightnode-hub/deploy").join(manifest);
        assert_eq!(
            std::fs::read(&shipped).unwrap_or_else(|e| panic!("{}: {e}", shipped.display())),
            std::fs::read(deploy.join(manifest)).unwrap(),
            "{manifest}"
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("usr/share/doc/flightnode-hub/README.md")).unwrap(),
        std::fs::read(release::workspace_root().join("hub/README.md")).unwrap()
    );

    // Installed with dpkg in a clean root: both run there, the plugin as `kubectl flightnode`.
    let root = root.join().expect("making the Debian root failed");
    root.install(&deb);
    assert_eq!(root.chroot(&["dpkg", "--verify", "flightnode-hub"]), "");
    let version = root.chroot(&["flightnode-hub", "--version"]);
    assert!(version.starts_with("flightnode-hub "), "{version}");
    let help = root.chroot(&["kubectl-flightnode", "--help"]);
    assert!(help.contains("Usage: kubectl flightnode"), "{help}");
    let help = root.chroot(&["kubectl-flightnode", "rollout", "pause", "--help"]);
    assert!(help.contains("Usage: kubectl flightnode rollout pause"), "{help}");

    // Where kubectl is installed (a static Go binary; not in CI's package list), it finds the
    // plugin the package put on the root's PATH, and runs it.
    if let Some(kubectl) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
    }) {
        std::fs::copy(&kubectl, root.at("usr/local/bin/kubectl")).unwrap();
        // Debian 12's /bin is a link to /usr/bin: with both on PATH kubectl lists the plugin a
        // second time as "overshadowed" by itself and exits 1 (any plugin in /usr/bin does), so
        // the listing runs with a PATH that names each directory once.
        let listed = root.chroot(&["env", "PATH=/usr/local/bin:/usr/bin", "kubectl", "plugin", "list"]);
        assert!(
            listed.contains("/usr/bin/kubectl-flightnode"),
            "kubectl plugin list:\n{listed}"
        );
        let help = root.chroot(&["kubectl", "flightnode", "fleet", "--help"]);
        assert!(help.contains("Usage: kubectl flightnode fleet"), "{help}");
    } else {
        eprintln!("no kubectl on PATH: `kubectl plugin list` not checked");
    }

    // Removed: both binaries go, and a plugin without its hub says what to install.
    std::fs::copy(
        root.at("usr/bin/kubectl-flightnode"),
        root.at("usr/local/bin/kubectl-flightnode"),
    )
    .unwrap();
    root.chroot(&["dpkg", "-r", "flightnode-hub"]);
    assert!(!root.at("usr/bin/flightnode-hub").exists());
    assert!(!root.at("usr/bin/kubectl-flightnode").exists());
    let out = Command::new("chroot")
        .arg(&root.path)
        .args(["/usr/local/bin/kubectl-flightnode", "fleet"])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(
        err.contains("cannot find the flightnode-hub binary") && err.contains("flightnode-hub package"),
        "{err}"
    );
}
