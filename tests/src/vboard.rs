//! A virtual board: an arm64 board image assembled from Debian packages only, booted under
//! `qemu-system-aarch64` (software emulation) with Debian's `u-boot-qemu` as its firmware.
//!
//! The image, as an operator would flash it onto one disk (MBR):
//!
//! | where | what |
//! |---|---|
//! | 512 KiB, 256 KiB | the A/B U-Boot environment (`BOOT_ORDER`, `BOOT_x_LEFT`), raw, as on eMMC boards |
//! | partition 1, FAT | `/boot.scr`: RAUC's A/B selection, then the chosen slot's kernel ([`BOOT_CMD`]) |
//! | partition 2, ext4 | rootfs A: [`MKROOTFS`]'s Debian bookworm arm64 (systemd, Debian's kernel + initrd) plus the agent's `.deb` |
//! | partition 3, ext4 | rootfs B (written by the agent from a bundle) |
//! | partition 4, ext4 | the agent's state dir, `/var/lib/flightnode` |
//!
//! U-Boot's own environment stays in pflash (bank 1), where Debian's `u-boot-qemu` keeps it
//! (`CONFIG_ENV_IS_IN_FLASH`); the board gets a factory-initialised one from [`UbootQemu`]. The
//! A/B variables cannot live there for Linux: Debian's arm64 kernel has no CFI flash driver
//! (`CONFIG_MTD_PHYSMAP` and `CONFIG_MTD_CFI` are not set), so nothing on the board can write
//! pflash. The boot script imports them from the environment block on the disk
//! (`virtio read` + `env import -c`) and exports them back after counting an attempt
//! (`env export -c` + `virtio write`), in U-Boot's own format, which the agent writes with
//! `fw_setenv` through `/etc/fw_env.config` (`/dev/vda 0x80000 0x40000 0x40000`).
//!
//! The base root filesystem is built once by `mmdebstrap` (arm64 maintainer scripts run under
//! qemu-user binfmt) and cached under `target/vboard/`, keyed by the contents of
//! `tests/vboard/mkrootfs.sh`; the agent's `.deb` is the release one (`cargo deb` of the static
//! musl aarch64 release build, [`crate::release::deb`]), installed with `dpkg -i` in the rootfs.
//! Everything the board needs at run time comes from the host over qemu's user network (the
//! host is 10.0.2.2): the MQTT broker and the bundle server both listen on the host's loopback.

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::uboot_qemu::{self, UbootQemu};

/// Set to `1` to let the virtual-board test pass without running when the tools are missing.
/// CI never sets it.
pub const SKIP_ENV: &str = "FLIGHTNODE_SKIP_VBOARD";

/// The board's `hardware` (bundles list it in `compatible`).
pub const HARDWARE: &str = "qemu-virt-arm64";
/// The board's device id (MQTT client id and topic segment).
pub const DEVICE_ID: &str = "vboard-1";

/// Builds the base root filesystem (see the script).
pub const MKROOTFS: &str = include_str!("../vboard/mkrootfs.sh");
/// The board's U-Boot boot script.
pub const BOOT_CMD: &str = include_str!("../vboard/boot.cmd");

const MIB: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
const BOOT_START: u64 = MIB;
const BOOT_BYTES: u64 = 8 * MIB;
/// Each rootfs partition; a rootfs image is smaller (sized to its contents).
pub const SLOT_BYTES: u64 = 400 * MIB;
const DATA_BYTES: u64 = 64 * MIB;
/// Where the A/B environment block sits on the disk, and its size (U-Boot's format: CRC32 + data).
pub const ENV_OFFSET: u64 = 0x80000;
const ENV_BYTES: u64 = 0x40000;

/// The programs the board needs.
#[derive(Debug, Clone)]
pub struct Tools {
    uboot: uboot_qemu::Tools,
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The tools, or why they are missing.
pub fn find_tools() -> Result<Tools, String> {
    let mut missing = Vec::new();
    let uboot = uboot_qemu::find_tools();
    if let Err(e) = &uboot {
        missing.push(e.clone());
    }
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("arch-test", "arch-test"),
        ("mkfs.ext4", "e2fsprogs"),
        ("mosquitto", "mosquitto"),
        ("cargo-deb", "cargo install cargo-deb"),
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} ({package})"));
        }
    }
    let binfmt = std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").unwrap_or_default();
    if !binfmt.starts_with("enabled") {
        missing.push(
            "qemu-user binfmt for arm64 (/proc/sys/fs/binfmt_misc/qemu-aarch64; qemu-user-static, \
             registered by ./test.sh)"
                .into(),
        );
    }
    if !missing.is_empty() {
        return Err(missing.join("; "));
    }
    Ok(Tools {
        uboot: uboot.map_err(|e| e.clone())?,
    })
}

/// The tools, or `None` when they are missing and [`SKIP_ENV`]`=1`.
///
/// # Panics
/// When tools are missing and the skip variable is not set.
pub fn require() -> Option<Tools> {
    match find_tools() {
        Ok(t) => Some(t),
        Err(why) if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") => {
            eprintln!("skipping the virtual board ({SKIP_ENV}=1): {why}");
            None
        }
        Err(why) => panic!(
            "the virtual board needs tools that are missing: {why}. Run ./test.sh as root once, or \
             set {SKIP_ENV}=1 to skip it knowingly"
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/vboard`: the cached base rootfs and the agent's `.deb`.
pub fn cache_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("vboard")
}

/// Runs `cmd`; on failure the error carries what it printed.
fn run_cmd(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn short_hash(bytes: &[u8]) -> String {
    hex_lower(&Sha256::digest(bytes)[..8])
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Blocks until this process holds an exclusive `flock(2)` on `file` (released when it closes).
fn flock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock(2) on a descriptor this function borrows for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The base root filesystem tarball: built by [`MKROOTFS`] once, then taken from the cache.
pub fn base_rootfs() -> Result<PathBuf> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BASE.get_or_init(|| build_base_rootfs().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building the board's base rootfs: {e}"))
}

fn build_base_rootfs() -> Result<PathBuf> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = short_hash(MKROOTFS.as_bytes());
    let tar = dir.join(format!("rootfs-{key}.tar"));
    // test.sh builds the same tarball in the background while the suite compiles, under this
    // lock: wait for it instead of building a second one.
    let lock_path = dir.join(".rootfs.lock");
    let lock =
        std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    flock_exclusive(&lock).with_context(|| format!("locking {}", lock_path.display()))?;
    if tar.is_file() {
        return Ok(tar);
    }
    let started = Instant::now();
    let script = dir.join(format!("mkrootfs-{key}.sh"));
    std::fs::write(&script, MKROOTFS)?;
    let partial = dir.join(format!("rootfs-{key}.tar.partial"));
    let _ = std::fs::remove_file(&partial);
    run_cmd(
        Command::new("sh").arg(&script).arg(&partial),
        "mkrootfs.sh (mmdebstrap, arm64)",
    )?;
    std::fs::rename(&partial, &tar)?;
    // Older bases (other keys) only take disk space.
    for e in std::fs::read_dir(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.starts_with("rootfs-") || name.starts_with("mkrootfs-")) && !name.contains(&key) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    eprintln!(
        "vboard: built the base rootfs {} in {:.0?}",
        tar.display(),
        started.elapsed()
    );
    Ok(tar)
}

/// The agent's arm64 `.deb` as it ships: [`crate::release::deb`] of the static
/// `aarch64-unknown-linux-musl` release build, the same package the packaging test checks and
/// the same binary the qemu-user test runs (one release build per CI run).
pub fn agent_deb() -> Result<PathBuf> {
    crate::release::deb(crate::release::AARCH64).context("the agent's arm64 release .deb")
}

/// One root filesystem for a slot: the base, the agent's `.deb`, the board's configuration, and
/// a release marker; `healthy: false` makes its health check fail.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// Written to `/etc/flightnode-release` and printed by the health check.
    pub release: String,
    /// Whether `/usr/lib/flightnode/health-check` exits 0.
    pub healthy: bool,
}

/// What the board's agent talks to.
#[derive(Debug, Clone)]
pub struct BoardConfig {
    /// The host's MQTT broker port (reached as 10.0.2.2).
    pub mqtt_port: u16,
    /// The release public key the agent trusts.
    pub release_pub: PathBuf,
    /// The version of slot A on a fresh board.
    pub factory_version: String,
}

fn agent_toml(cfg: &BoardConfig) -> String {
    format!(
        r#"# The virtual board's agent configuration (see systemd/agent.toml for every key).
device_id = "{DEVICE_ID}"
hardware = "{HARDWARE}"
state_dir = "/var/lib/flightnode"
trusted_keys = ["/etc/flightnode/release.pub"]
factory_version = "{factory}"

[slots]
backend = "block"
a = "/dev/vda2"
b = "/dev/vda3"

[activation]
mode = "reboot"
reboot_command = "systemctl reboot"

[boot]
backend = "uboot"
fw_env_config = "/etc/fw_env.config"
# The boot script keeps one copy in the disk block (env import -c / env export -c).
allow_single_copy_env = true
initial_env = "/etc/u-boot-initial-env"

[health]
command = "/usr/lib/flightnode/health-check"
timeout = "120s"

[download]
idle_timeout = "20s"
checkpoint_bytes = 1048576

[commands]
# The board test publishes plain commands, as an operator with mosquitto_pub would.
insecure_accept_unsigned = true

[mqtt]
url = "mqtt://10.0.2.2:{port}"
max_backoff = "5s"
"#,
        factory = cfg.factory_version,
        port = cfg.mqtt_port
    )
}

/// The unit's board-specific part, as an operator adds it: the slot partitions and the disk
/// that holds the environment block, and the state partition mounted before the agent starts.
const UNIT_DROPIN: &str = "[Unit]
RequiresMountsFor=/var/lib/flightnode

[Service]
DeviceAllow=/dev/vda rw
DeviceAllow=/dev/vda2 rw
DeviceAllow=/dev/vda3 rw
";

fn health_check(rootfs: &Rootfs) -> String {
    let (word, code) = if rootfs.healthy { ("ok", 0) } else { ("FAILED", 1) };
    format!(
        "#!/bin/sh\n# The virtual board's health check: this rootfs is built to be {}.\n\
         echo \"FLIGHTNODE-HEALTH {word} release={} slot=$FLIGHTNODE_SLOT version=$FLIGHTNODE_VERSION\"\n\
         exit {code}\n",
        if rootfs.healthy { "healthy" } else { "broken" },
        rootfs.release
    )
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    // Allocated blocks, not apparent sizes: thousands of small files each take a whole block.
    let out = run_cmd(Command::new("du").args(["-s", "-B1"]).arg(dir), "du")?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("du printed {out:?}"))
}

/// ext4 images of `variants`, in `work` (named `rootfs-<release>.img`), each sized to its contents.
pub fn rootfs_images(work: &Path, cfg: &BoardConfig, variants: &[Rootfs]) -> Result<Vec<PathBuf>> {
    let base = base_rootfs()?;
    let deb = agent_deb()?;
    let root = work.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let result = (|| {
        run_cmd(
            Command::new("tar")
                .args(["--numeric-owner", "-xpf"])
                .arg(&base)
                .arg("-C")
                .arg(&root),
            "tar -x (base rootfs)",
        )?;
        std::fs::copy(&deb, root.join("tmp/flightnode-agent.deb"))?;
        run_cmd(
            Command::new("chroot")
                .arg(&root)
                .args(["dpkg", "-i", "/tmp/flightnode-agent.deb"]),
            "dpkg -i flightnode-agent.deb (arm64 chroot)",
        )?;
        std::fs::remove_file(root.join("tmp/flightnode-agent.deb"))?;
        // An absolute symlink into the rootfs: look at the link, not at the host's /lib.
        let wants = root.join("etc/systemd/system/multi-user.target.wants/flightnode-agent.service");
        if std::fs::symlink_metadata(&wants).is_err() {
            bail!("the .deb's maintainer scripts did not enable flightnode-agent.service");
        }
        write_file(&root.join("etc/flightnode/agent.toml"), &agent_toml(cfg), 0o644)?;
        std::fs::copy(&cfg.release_pub, root.join("etc/flightnode/release.pub"))?;
        write_file(
            &root.join("etc/systemd/system/flightnode-agent.service.d/vboard.conf"),
            UNIT_DROPIN,
            0o644,
        )?;
        let mut images = Vec::new();
        for v in variants {
            write_file(
                &root.join("etc/flightnode-release"),
                &format!("{}\n", v.release),
                0o644,
            )?;
            write_file(
                &root.join("usr/lib/flightnode/health-check"),
                &health_check(v),
                0o755,
            )?;
            let used = dir_bytes(&root)?;
            // ext4's journal (16 MiB at this size) and inode tables, and some room to run:
            // the bundle carries the whole image, so no more than that.
            let size = (used + used / 10 + 32 * MIB).div_ceil(MIB) * MIB;
            if size > SLOT_BYTES {
                bail!(
                    "rootfs {} needs {size} bytes, the slot has {SLOT_BYTES}",
                    v.release
                );
            }
            let img = work.join(format!("rootfs-{}.img", v.release));
            let _ = std::fs::remove_file(&img);
            run_cmd(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "rootfs", "-d"])
                    .arg(&root)
                    .arg(&img)
                    .arg(format!("{}k", size / 1024)),
                "mkfs.ext4 -d (rootfs image)",
            )?;
            images.push(img);
        }
        Ok(images)
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// The MBR partition entry for `lba`..`lba+sectors`.
fn mbr_entry(active: bool, kind: u8, lba: u64, sectors: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = if active { 0x80 } else { 0 };
    // CHS fields unused (LBA only), as sfdisk writes them for large disks.
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = kind;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(
        &u32::try_from(lba)
            .expect("MBR partitions start below 2 TiB")
            .to_le_bytes(),
    );
    e[12..16].copy_from_slice(
        &u32::try_from(sectors)
            .expect("MBR partitions are below 2 TiB")
            .to_le_bytes(),
    );
    e
}

fn copy_into(disk: &Path, offset: u64, src: &Path) -> Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    out.seek(SeekFrom::Start(offset))?;
    let mut input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    std::io::copy(&mut input, &mut out)
        .with_context(|| format!("copying {} into {}", src.display(), disk.display()))?;
    out.sync_all()?;
    Ok(())
}

/// A powered-off board: its pflash (U-Boot's environment) and its disk.
pub struct Board {
    tools: Tools,
    dir: PathBuf,
    flash: PathBuf,
    /// The board's disk image.
    pub disk: PathBuf,
    env_config: PathBuf,
    child: Option<Child>,
    power_ons: u32,
    console: PathBuf,
}

impl Board {
    /// Flashes a new board in `dir`: the factory environment, the boot partition, `rootfs_a` in
    /// slot A, slot B empty, an empty state partition, and the A/B variables (`A B`, 3 attempts).
    pub fn flash(tools: Tools, dir: &Path, rootfs_a: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // U-Boot's factory environment in pflash (bootcmd, bootdelay=0), from the harness.
        let factory = UbootQemu::new(tools.uboot.clone(), &dir.join("uboot"), true)?;
        let flash = factory.flash.clone();

        let disk = dir.join("disk.img");
        let slot_a = BOOT_START + BOOT_BYTES;
        let slot_b = slot_a + SLOT_BYTES;
        let data = slot_b + SLOT_BYTES;
        let total = data + DATA_BYTES;
        {
            let f = std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
            f.set_len(total)?;
        }
        let mut mbr = vec![0u8; 512];
        let parts = [
            mbr_entry(true, 0x0e, BOOT_START / SECTOR, BOOT_BYTES / SECTOR),
            mbr_entry(false, 0x83, slot_a / SECTOR, SLOT_BYTES / SECTOR),
            mbr_entry(false, 0x83, slot_b / SECTOR, SLOT_BYTES / SECTOR),
            mbr_entry(false, 0x83, data / SECTOR, DATA_BYTES / SECTOR),
        ];
        for (i, p) in parts.iter().enumerate() {
            mbr[446 + 16 * i..462 + 16 * i].copy_from_slice(p);
        }
        mbr[440..444].copy_from_slice(&0x464e_4231u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        {
            let mut f = std::fs::OpenOptions::new().write(true).open(&disk)?;
            f.write_all(&mbr)?;
        }
        let d = disk.to_string_lossy().into_owned();
        // Partition 1: FAT with /boot.scr.
        let scr = uboot_qemu::compile_boot_script(dir, BOOT_CMD, "vboard A/B")?;
        run_cmd(
            Command::new("mkfs.vfat")
                .args([
                    "-F",
                    "16",
                    "-s",
                    "1",
                    "--offset",
                    &(BOOT_START / SECTOR).to_string(),
                ])
                .args(["-n", "FNBOOT", &d])
                .arg((BOOT_BYTES / 1024).to_string()),
            "mkfs.vfat (boot partition)",
        )?;
        run_cmd(
            Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-o", "-i", &format!("{d}@@{BOOT_START}")])
                .arg(&scr)
                .arg("::/boot.scr"),
            "mcopy boot.scr",
        )?;
        // Partition 2: rootfs A.
        let a_len = std::fs::metadata(rootfs_a)?.len();
        if a_len > SLOT_BYTES {
            bail!("{} is {a_len} bytes, slot A has {SLOT_BYTES}", rootfs_a.display());
        }
        copy_into(&disk, slot_a, rootfs_a)?;
        // Partition 4: the state dir.
        run_cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "fnstate", "-E", &format!("offset={data}"), &d])
                .arg(format!("{}k", DATA_BYTES / 1024)),
            "mkfs.ext4 (state partition)",
        )?;
        // The A/B block, as the factory writes it.
        let env_config = dir.join("fw_env.config");
        std::fs::write(
            &env_config,
            format!("{d} {ENV_OFFSET:#x} {ENV_BYTES:#x} {ENV_BYTES:#x}\n"),
        )?;
        let initial = dir.join("ab-initial-env");
        std::fs::write(&initial, "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n")?;
        crate::tool::run(
            "fw_setenv",
            &[
                "-c",
                &env_config.to_string_lossy(),
                "-f",
                &initial.to_string_lossy(),
                "-s",
                "-",
            ],
            Some("BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n"),
        )?;
        Ok(Self {
            tools,
            dir: dir.to_owned(),
            flash,
            disk,
            env_config,
            child: None,
            power_ons: 0,
            console: dir.join("console-0.log"),
        })
    }

    /// The A/B variables as the host reads them from the disk (the board should be off).
    pub fn ab_env(&self) -> Result<BTreeMap<String, String>> {
        let out = crate::tool::run(
            "fw_printenv",
            &["-c", &self.env_config.to_string_lossy(), "-f", "/dev/null"],
            None,
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// Powers the board on: qemu-system-aarch64 (TCG), its serial console in a new log file.
    pub fn power_on(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the board is already on");
        }
        self.power_ons += 1;
        self.console = self.dir.join(format!("console-{}.log", self.power_ons));
        let q = |p: &Path| p.to_string_lossy().replace(',', ",,");
        let mut cmd = self.tools.uboot.qemu_with_uboot();
        cmd.args(["-M", "virt", "-cpu", "cortex-a57", "-smp", "2", "-m", "1024M"])
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()))
            .arg("-drive")
            .arg(format!("if=pflash,unit=1,format=raw,file={}", q(&self.flash)))
            .arg("-drive")
            .arg(format!("if=none,id=disk,format=raw,file={}", q(&self.disk)))
            .args(["-device", "virtio-blk-pci,drive=disk"])
            .args(["-netdev", "user,id=net0"])
            .args(["-device", "virtio-net-pci,netdev=net0,romfile="])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                self.dir.join(format!("qemu-{}.err", self.power_ons)),
            )?));
        self.child = Some(cmd.spawn().context("starting qemu-system-aarch64")?);
        Ok(())
    }

    /// Cuts the power: SIGKILL to qemu (nothing the guest had not written reaches the disk).
    pub fn power_cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only our own child.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The serial console of the current (or last) power-on, without `\r` and terminal escapes.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| strip_escapes(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    /// The serial consoles of every power-on so far, in order.
    pub fn all_consoles(&self) -> String {
        (1..=self.power_ons)
            .map(|n| {
                std::fs::read(self.dir.join(format!("console-{n}.log")))
                    .map(|b| strip_escapes(&String::from_utf8_lossy(&b)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The slots U-Boot booted during the current power-on, in order (its `FLIGHTNODE-BOOT` lines).
    pub fn boots(&self) -> Vec<char> {
        boots_in(&self.console())
    }

    /// The last `n` console lines, for error messages.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until `done(console)` holds; fails (with the console's tail) when qemu exits first
    /// or `timeout` passes.
    pub fn wait_console(&mut self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.console()) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!(
                    "qemu exited ({status}) while waiting for {what}; console (last lines):\n{}",
                    self.console_tail(80)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {what} within {timeout:?}; console (last lines):\n{}",
                    self.console_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Where the board keeps its console logs and images.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// The slots in the `FLIGHTNODE-BOOT slot=X` lines of `console`.
pub fn boots_in(console: &str) -> Vec<char> {
    console
        .lines()
        .filter_map(|l| l.split("FLIGHTNODE-BOOT slot=").nth(1))
        .filter_map(|s| s.trim().chars().next())
        .collect()
}

/// `text` without `\r` and without ANSI escape sequences (systemd colours its status lines).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final byte in '@'..='~'.
                    for f in chars.by_ref() {
                        if ('@'..='~').contains(&f) {
                            break;
                        }
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}
