//! `agent.toml`: the agent's configuration, with the defaults documented in `systemd/agent.toml`.
//!
//! `Serialize` is for the tests that hold `systemd/agent.toml` and the configuration reference
//! to the keys these types accept: a serialized config names every key, unset ones as null.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when neither `--config` nor `FLIGHTNODE_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flightnode/agent.toml";

/// Why the config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path} (pass --config FILE or set FLIGHTNODE_CONFIG)")]
    Read {
        /// Config path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, unknown keys, wrong types.
    #[error("config {path} is invalid: {message}")]
    Parse {
        /// Config path.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("config {path}: {message}")]
    Invalid {
        /// Config path.
        path: PathBuf,
        /// What to change.
        message: String,
    },
}

/// The whole `agent.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This drone's id: MQTT client id and topic segment, so no `+ # /` and at most 64 characters.
    pub device_id: String,
    /// Hardware id; must appear in a bundle's `compatible`.
    pub hardware: String,
    /// sled store, `current` pointer and control socket live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Public keys (PEM) whose signatures are accepted.
    pub trusted_keys: Vec<PathBuf>,
    /// Version of slot `a` on a fresh device.
    #[serde(default = "default_factory_version")]
    pub factory_version: semver::Version,
    /// Slot backend and paths.
    pub slots: SlotsConfig,
    /// How a written slot becomes the running one.
    #[serde(default)]
    pub activation: ActivationConfig,
    /// Bootloader backend (reboot mode only).
    #[serde(default)]
    pub boot: Option<BootConfig>,
    /// Health check run after every switch.
    #[serde(default)]
    pub health: HealthConfig,
    /// Bundle downloads.
    #[serde(default)]
    pub download: DownloadConfig,
    /// MQTT broker for commands and status reports; without it the daemon takes local commands only.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// Hub for heartbeats; without it the daemon sends none.
    #[serde(default)]
    pub hub: Option<HubConfig>,
    /// The daemon (`flightnode-agent run`).
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Flight gate: no switch, apply, reboot or rollback while the vehicle flies. Without this
    /// section nothing is gated.
    #[serde(default)]
    pub flight: Option<FlightConfig>,
    /// Conditions for the switch (charging).
    #[serde(default)]
    pub install: InstallConfig,
    /// Who may command this drone over MQTT.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// TUF mode: bundles are targets of a TUF repository whose metadata chain is verified before
    /// any bundle byte is downloaded. Without this section only `trusted_keys` is checked.
    #[serde(default)]
    pub tuf: Option<TufConfig>,
}

/// `[commands]`: which MQTT commands are obeyed.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// The hub's command public keys (SPKI PEM). A command is obeyed only when one of them
    /// signed it for this device and it is inside its validity window; the hub's signed time
    /// in heartbeat responses is trusted from these keys too. Two keys during a rotation.
    #[serde(default)]
    pub hub_keys: Vec<PathBuf>,
    /// INSECURE: also obey unsigned commands (a bare bundle URL, plain JSON), from anyone who
    /// can publish on the upgrade topic. Only for a bench or a migration from unsigned
    /// commands; signed commands are still checked.
    #[serde(default)]
    pub insecure_accept_unsigned: bool,
}

/// `[tuf]`: the TUF repository bundles are targets of (see [`crate::tuf`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TufConfig {
    /// The repository's root.json shipped with the device (any version: the agent walks up from
    /// it and keeps the newest in `state_dir/tuf/`).
    pub root: PathBuf,
    /// Base URL of the metadata (`timestamp.json`, `N.root.json` ...), http(s):// or file://.
    pub metadata_url: String,
}

/// A state of the vehicle the flight gate may let an upgrade step run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllowedState {
    /// Disarmed and not in the air.
    Disarmed,
    /// Armed on the ground (a rover, a bench setup).
    Armed,
    /// Flying. Only for vehicles whose companion computer may be upgraded in flight.
    InAir,
}

/// What the flight gate does when it cannot tell the flight state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Wait (reason `flight_state_unknown`) until the state is known again.
    #[default]
    Wait,
    /// Go ahead as if the vehicle were disarmed on the ground.
    Allow,
}

/// `[flight]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlightConfig {
    /// MAVLink link to the flight controller: `serial:/dev/ttyS1:921600`, `udpin:127.0.0.1:14540`,
    /// `udpout:HOST:PORT`, `tcpout:HOST:PORT` or `tcpin:ADDR:PORT`. MAVLink 1 and 2 are read; the
    /// agent sends only the stream requests (`MAV_CMD_SET_MESSAGE_INTERVAL`) it needs.
    #[serde(default)]
    pub mavlink: Option<String>,
    /// The vehicle's MAVLink system id. Everything from other systems (a ground station, a
    /// fleet-mate behind the same router, a spoofed datagram) is ignored. Unset: the first
    /// autopilot HEARTBEAT heard picks it (logged), which a sender that speaks first could win.
    #[serde(default)]
    pub system_id: Option<u8>,
    /// Consecutive agreeing samples of a message type before a change that would open the gate
    /// (disarmed, on the ground, more battery) is believed; a change that closes it counts at once.
    #[serde(default = "default_confirm_samples")]
    pub confirm_samples: u8,
    /// Boards without MAVLink: run before every gated step; exit 0 = safe.
    #[serde(default)]
    pub gate_command: Option<String>,
    /// Timeout of the gate command (killed and counted as `flight_state_unknown` after it).
    #[serde(default = "default_gate_command_timeout", with = "humantime_serde")]
    pub gate_command_timeout: Duration,
    /// States in which a gated step may run.
    #[serde(default = "default_allowed_states")]
    pub allowed_states: Vec<AllowedState>,
    /// Wait while the battery reports less than this (0 = no battery check).
    #[serde(default)]
    pub min_battery_percent: u8,
    /// What an unknown flight state means.
    #[serde(default)]
    pub unknown: UnknownPolicy,
    /// A wait longer than this ends the upgrade with `flight_gate_timeout` (never a rollback's).
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// No HEARTBEAT for this long: the flight state is unknown. Each other message type expires
    /// on its own after this too (no landed state while armed = in the air; no battery once one
    /// was reported = unknown).
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Also hold the download until the gate allows it.
    #[serde(default)]
    pub gate_download: bool,
}

fn default_gate_command_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_allowed_states() -> Vec<AllowedState> {
    vec![AllowedState::Disarmed]
}
fn default_confirm_samples() -> u8 {
    3
}
fn default_max_wait() -> Duration {
    Duration::from_hours(6)
}
fn default_stale_after() -> Duration {
    Duration::from_secs(3)
}

/// `[mqtt]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    /// CA certificate (PEM) for `mqtts://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; also the identity towards the hub.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Username (brokers with password auth).
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// MQTT keep-alive.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest wait between reconnect attempts (the backoff doubles up to it, with jitter).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// `[hub]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `https://hub:50051`, or `http://` for plain (testing only).
    pub endpoint: String,
    /// Heartbeat period (jittered ±10 %); phase changes are sent at once.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Per-call timeout.
    #[serde(default = "default_hub_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// CA (PEM); defaults to `mqtt.ca`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); defaults to `mqtt.cert`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM); defaults to `mqtt.key`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Events kept for the hub while it is unreachable; the oldest are dropped beyond this.
    #[serde(default = "default_outbox_cap")]
    pub outbox_cap: usize,
}

/// What must be reachable again before a trial slot is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FleetGate {
    /// Either the broker or the hub (whichever is configured).
    #[default]
    Any,
    /// The MQTT broker.
    Broker,
    /// The hub.
    Hub,
    /// Nothing: the health check alone decides.
    None,
}

/// `[daemon]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// In `run`, a trial slot is committed only after the health check passes **and** this is reachable.
    #[serde(default)]
    pub commit_requires: FleetGate,
    /// How long to wait for `commit_requires` before rolling back.
    #[serde(default = "default_fleet_timeout", with = "humantime_serde")]
    pub fleet_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            commit_requires: FleetGate::Any,
            fleet_timeout: default_fleet_timeout(),
        }
    }
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_backoff() -> Duration {
    Duration::from_mins(1)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_hub_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_outbox_cap() -> usize {
    1000
}
fn default_fleet_timeout() -> Duration {
    Duration::from_mins(5)
}

/// Slot backend kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotBackendKind {
    /// Image files; created when missing.
    File,
    /// Raw partitions; must exist.
    Block,
}

/// `[slots]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsConfig {
    /// `file` or `block`.
    pub backend: SlotBackendKind,
    /// Slot `a` (file or device path).
    pub a: PathBuf,
    /// Slot `b`.
    pub b: PathBuf,
}

/// Activation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActivationMode {
    /// Switch a `current` pointer and run the apply command; no reboot.
    #[default]
    Command,
    /// Trial-boot the new slot through the bootloader.
    Reboot,
}

/// `[activation]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    /// `command` or `reboot`.
    #[serde(default)]
    pub mode: ActivationMode,
    /// Command mode: run with the slot path as its argument after the pointer switched.
    #[serde(default)]
    pub apply_command: Option<String>,
    /// Timeout of the apply command.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub apply_timeout: Duration,
    /// Reboot mode: how to reboot.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: String,
    /// Reboot mode: how long to wait for the reboot command to take the system down.
    #[serde(default = "default_reboot_wait", with = "humantime_serde")]
    pub reboot_wait: Duration,
}

/// Bootloader backend kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootBackendKind {
    /// U-Boot environment through `fw_printenv`/`fw_setenv`, RAUC's `BOOT_ORDER`/`BOOT_x_LEFT`.
    Uboot,
    /// GRUB environment through `grub-editenv`, RAUC's `ORDER`/`x_OK`/`x_TRY`.
    Grub,
    /// A user script with RAUC-like verbs.
    Script,
}

/// `[boot]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// `uboot`, `grub` or `script`.
    pub backend: BootBackendKind,
    /// Where the booted slot is read from (`rauc.slot=A` or `flightnode.slot=a`).
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Changes on every boot; tells a reboot from an agent restart.
    #[serde(default = "default_boot_id")]
    pub boot_id: PathBuf,
    /// uboot: `fw_env.config` passed to `fw_printenv -c`/`fw_setenv -c`. Its device lines are
    /// the environment's copies: two (a redundant environment) unless `allow_single_copy_env`.
    #[serde(default = "default_fw_env_config")]
    pub fw_env_config: PathBuf,
    /// uboot: start even though `fw_env.config` describes a single copy of the environment.
    ///
    /// RISK: with one copy, a power cut while the agent's `fw_setenv` writes it (at a switch, a
    /// commit, a rollback, or the confirm at every boot) leaves it with a bad CRC. U-Boot then
    /// boots on its built-in default environment, which starts slot A; after a commit of B the
    /// agent takes that boot for a fallback, marks the committed B bad and lowers the rollback
    /// floor to A's version. Use a redundant environment (U-Boot's
    /// `CONFIG_SYS_REDUNDAND_ENVIRONMENT`, two lines in `fw_env.config`) instead wherever the
    /// board allows it. Default `false`: the agent refuses to start on a single copy.
    #[serde(default)]
    pub allow_single_copy_env: bool,
    /// grub: the grubenv file.
    #[serde(default = "default_grubenv")]
    pub grubenv: PathBuf,
    /// script: the boot script (verbs get-primary, set-primary, get-state, set-state, get-current).
    #[serde(default)]
    pub script: Option<PathBuf>,
    /// Boot attempts a committed slot gets (U-Boot `BOOT_x_LEFT`), 1 to 9: U-Boot scripts read
    /// the counter as hex, so a single digit means the same in both bases.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// uboot: the environment written when the flash holds no valid one (blank or corrupt), in
    /// libubootenv's `name=value` format (`/etc/u-boot-initial-env`, generated by U-Boot's
    /// `make u-boot-initial-env`). Without it the agent refuses to write such an environment:
    /// one holding only our variables has no `bootcmd`, and U-Boot would stop at its prompt.
    #[serde(default = "default_initial_env")]
    pub initial_env: PathBuf,
    /// How long `fw_printenv`/`fw_setenv`, `grub-editenv` or the boot script may run before its
    /// process group is killed.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub tool_timeout: Duration,
}

/// `[health]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Exit 0 = healthy. Without a command every switch counts as healthy.
    #[serde(default)]
    pub command: Option<String>,
    /// Killed and counted as unhealthy after this long.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            command: None,
            timeout: default_health_timeout(),
        }
    }
}

/// `[download]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadConfig {
    /// No byte for this long ends the attempt.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TCP/TLS connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Attempts after the first one, for transient failures (not 4xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff; doubles each retry, with jitter.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Record resumable progress (fsync + store) at least every this many image bytes.
    #[serde(default = "default_checkpoint_bytes")]
    pub checkpoint_bytes: u64,
    /// Threads that decompress and check the chunks of a chunked (format 2) bundle. 1 does it on
    /// the thread that fetches (two threads in all, with the writer); without it, one less than
    /// the cores, at most [`MAX_DEFAULT_CHUNK_WORKERS`] and at least 1.
    #[serde(default)]
    pub chunk_workers: Option<usize>,
    /// Interfaces (shell globs: `wwan*`, `ppp0`) whose traffic counts as metered. The link of a
    /// download is the interface the kernel routes the bundle server's address through, asked
    /// again every second while the body streams.
    #[serde(default)]
    pub metered_interfaces: Vec<String>,
    /// Also count an interface as metered when NetworkManager says so (`nmcli` `GENERAL.METERED`
    /// `yes` or `yes (guessed)`). Without nmcli on the board this adds nothing.
    #[serde(default)]
    pub networkmanager: bool,
    /// What a download over a metered link does: `defer` (wait, reason `metered_link`, until the
    /// route goes over an unmetered link) or `throttle` (go on at `metered_max_rate`).
    #[serde(default)]
    pub on_metered: OnMetered,
    /// Bytes per second on a metered link with `on_metered = "throttle"`.
    #[serde(default)]
    pub metered_max_rate: Option<u64>,
    /// Bytes per second on every link (a metered one gets the lower of the two caps).
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// Download only between these local times, `HH:MM-HH:MM` (may cross midnight); outside it
    /// the upgrade waits with reason `download_window`, and a download in progress pauses.
    #[serde(default)]
    pub window: Option<crate::netpolicy::window::Window>,
}

/// `download.on_metered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnMetered {
    /// Wait until the route goes over an unmetered link.
    #[default]
    Defer,
    /// Download at `metered_max_rate`.
    Throttle,
}

/// `[install]`: conditions for the switch to the new image, beside the flight gate.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct InstallConfig {
    /// Switch only while the vehicle charges: BATTERY_STATUS `charge_state` CHARGING over
    /// `flight.mavlink`, or `charging_command` exiting 0. Otherwise the upgrade waits before the
    /// switch with reason `not_charging`; no charge state heard counts as not charging.
    #[serde(default)]
    pub require_charging: bool,
    /// Asked when MAVLink does not report charging (a dock, a charger's GPIO): exit 0 = charging.
    #[serde(default)]
    pub charging_command: Option<String>,
    /// Timeout of the charging command (killed and counted as not charging after it).
    #[serde(default = "default_gate_command_timeout", with = "humantime_serde")]
    pub charging_command_timeout: Duration,
}

/// `download.chunk_workers` when not set is capped at this: the companion computers flightnode
/// runs on have four cores (a Pi 4, a Jetson), and the writer and the fetching thread keep one
/// busy between them.
pub const MAX_DEFAULT_CHUNK_WORKERS: usize = 4;
/// More chunk workers than this is a typo: a segment's chunks (about four at the defaults) are
/// all that can decompress at once.
pub const MAX_CHUNK_WORKERS: usize = 64;

impl DownloadConfig {
    /// The chunk workers to run: `chunk_workers`, else one less than the cores (capped), so a
    /// 2-core computer keeps the two-thread pass, where workers only contend for the cores.
    pub fn chunk_workers(&self) -> usize {
        self.chunk_workers.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            cores.saturating_sub(1).clamp(1, MAX_DEFAULT_CHUNK_WORKERS)
        })
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            idle_timeout: default_idle_timeout(),
            connect_timeout: default_connect_timeout(),
            retries: default_retries(),
            backoff: default_backoff(),
            checkpoint_bytes: default_checkpoint_bytes(),
            chunk_workers: None,
            metered_interfaces: Vec::new(),
            networkmanager: false,
            on_metered: OnMetered::Defer,
            metered_max_rate: None,
            max_rate: None,
            window: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/flightnode")
}
fn default_factory_version() -> semver::Version {
    semver::Version::new(0, 0, 0)
}
fn default_hook_timeout() -> Duration {
    Duration::from_mins(5)
}
fn default_reboot_command() -> String {
    "systemctl reboot".into()
}
fn default_reboot_wait() -> Duration {
    Duration::from_mins(5)
}
fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}
fn default_boot_id() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}
fn default_fw_env_config() -> PathBuf {
    PathBuf::from("/etc/fw_env.config")
}
fn default_grubenv() -> PathBuf {
    PathBuf::from("/boot/grub/grubenv")
}
fn default_attempts() -> u32 {
    3
}
fn default_initial_env() -> PathBuf {
    PathBuf::from("/etc/u-boot-initial-env")
}
fn default_health_timeout() -> Duration {
    Duration::from_mins(1)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_retries() -> u32 {
    5
}
fn default_checkpoint_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

pub use flightnode_proto::device::validate_device_id;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        validate_device_id(&config.device_id).map_err(invalid)?;
        if config.trusted_keys.is_empty() {
            return Err(invalid(
                "trusted_keys is empty: no bundle could ever be accepted".into(),
            ));
        }
        if let Some(tuf) = &config.tuf {
            let scheme = tuf
                .metadata_url
                .split_once("://")
                .map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("http" | "https" | "file")) {
                return Err(invalid(format!(
                    "tuf.metadata_url = {:?} must be an http://, https:// or file:// URL",
                    tuf.metadata_url
                )));
            }
        }
        if config.slots.a == config.slots.b {
            return Err(invalid(format!(
                "slots.a and slots.b are both {}",
                config.slots.a.display()
            )));
        }
        if config.activation.mode == ActivationMode::Reboot {
            match &config.boot {
                None => {
                    return Err(invalid(
                        "activation.mode = \"reboot\" needs a [boot] section".into(),
                    ));
                }
                Some(b) if b.backend == BootBackendKind::Script && b.script.is_none() => {
                    return Err(invalid("boot.backend = \"script\" needs boot.script".into()));
                }
                Some(b) if !(1..=9).contains(&b.attempts) => {
                    return Err(invalid(format!(
                        "boot.attempts = {} must be 1 to 9 (U-Boot scripts read the counter as hex)",
                        b.attempts
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(n) = config.download.chunk_workers
            && !(1..=MAX_CHUNK_WORKERS).contains(&n)
        {
            return Err(invalid(format!(
                "download.chunk_workers = {n} must be 1 to {MAX_CHUNK_WORKERS} (leave it out for one less than the cores, at most {MAX_DEFAULT_CHUNK_WORKERS})"
            )));
        }
        let d = &config.download;
        if d.max_rate == Some(0) || d.metered_max_rate == Some(0) {
            return Err(invalid(
                "download.max_rate and download.metered_max_rate are bytes per second and must be at least 1 (leave them out for no cap)".into(),
            ));
        }
        if d.on_metered == OnMetered::Throttle && d.metered_max_rate.is_none() {
            return Err(invalid(
                "download.on_metered = \"throttle\" needs download.metered_max_rate (bytes per second)"
                    .into(),
            ));
        }
        if let Some(g) = d
            .metered_interfaces
            .iter()
            .find(|g| g.is_empty() || g.contains('/'))
        {
            return Err(invalid(format!(
                "download.metered_interfaces: {g:?} is not an interface name or glob"
            )));
        }
        if config.install.require_charging
            && config.install.charging_command.is_none()
            && config.flight.as_ref().is_none_or(|f| f.mavlink.is_none())
        {
            return Err(invalid(
                "install.require_charging needs flight.mavlink (BATTERY_STATUS charge_state) or install.charging_command: otherwise nothing could ever say the vehicle charges".into(),
            ));
        }
        if let Some(m) = &config.mqtt {
            if !(m.url.starts_with("mqtt://") || m.url.starts_with("mqtts://")) {
                return Err(invalid(format!(
                    "mqtt.url {:?} must start with mqtt:// or mqtts://",
                    m.url
                )));
            }
            if m.cert.is_some() != m.key.is_some() {
                return Err(invalid("mqtt.cert and mqtt.key go together".into()));
            }
        }
        if let Some(h) = &config.hub
            && !(h.endpoint.starts_with("http://") || h.endpoint.starts_with("https://"))
        {
            return Err(invalid(format!(
                "hub.endpoint {:?} must start with https:// (or http://)",
                h.endpoint
            )));
        }
        if let Some(f) = &config.flight {
            if f.mavlink.is_none() && f.gate_command.is_none() {
                return Err(invalid(
                    "[flight] needs mavlink or gate_command (remove the section to turn the gate off)".into(),
                ));
            }
            if let Some(m) = &f.mavlink {
                crate::flight::check_address(m).map_err(|e| invalid(format!("flight.mavlink: {e}")))?;
            }
            if !f.allowed_states.contains(&AllowedState::Disarmed) {
                return Err(invalid(
                    "flight.allowed_states must contain \"disarmed\": otherwise no upgrade could ever run"
                        .into(),
                ));
            }
            if f.system_id == Some(0) {
                return Err(invalid(
                    "flight.system_id is 0, the broadcast id: use the vehicle's own (1-255)".into(),
                ));
            }
            if f.confirm_samples == 0 {
                return Err(invalid("flight.confirm_samples must be at least 1".into()));
            }
            if f.min_battery_percent > 100 {
                return Err(invalid(format!(
                    "flight.min_battery_percent is {}, over 100",
                    f.min_battery_percent
                )));
            }
        }
        Ok(config)
    }

    /// The hub's TLS material, defaulting to the MQTT identity.
    pub fn hub_tls(&self) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
        let mqtt = self.mqtt.as_ref();
        let pick = |own: Option<&PathBuf>, from_mqtt: fn(&MqttConfig) -> Option<&PathBuf>| {
            own.cloned().or_else(|| mqtt.and_then(from_mqtt).cloned())
        };
        let hub = self.hub.as_ref();
        (
            pick(hub.and_then(|h| h.ca.as_ref()), |m| m.ca.as_ref()),
            pick(hub.and_then(|h| h.cert.as_ref()), |m| m.cert.as_ref()),
            pick(hub.and_then(|h| h.key.as_ref()), |m| m.key.as_ref()),
        )
    }

    /// Path of slot `slot`.
    pub fn slot_path(&self, slot: flightnode_proto::Slot) -> &Path {
        match slot {
            flightnode_proto::Slot::A => &self.slots.a,
            flightnode_proto::Slot::B => &self.slots.b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device_id = "drone-0001"
hardware = "cc-aarch64-v1"
trusted_keys = ["/etc/flightnode/release.pub"]
[slots]
backend = "file"
a = "/var/lib/flightnode/slots/a.img"
b = "/var/lib/flightnode/slots/b.img"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL, Path::new("agent.toml")).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/flightnode"));
        assert_eq!(c.factory_version, semver::Version::new(0, 0, 0));
        assert_eq!(c.activation.mode, ActivationMode::Command);
        assert_eq!(c.health.timeout, Duration::from_mins(1));
    }

    #[test]
    fn unknown_keys_and_bad_ids_are_refused_with_the_reason() {
        let err = Config::parse(&format!("{MINIMAL}\nsurprise = 1\n"), Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
        for bad in ["a+b", "a#", "a/b", "..", &"x".repeat(65)] {
            let text = MINIMAL.replace("drone-0001", bad);
            let err = Config::parse(&text, Path::new("x.toml")).unwrap_err();
            assert!(err.to_string().contains("device id"), "{bad}: {err}");
        }
    }

    #[test]
    fn flight_section_gets_documented_defaults_and_checks_the_link() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert!(c.flight.is_none(), "no [flight] section means no gate");
        let text = format!("{MINIMAL}\n[flight]\nmavlink = \"udpin:0.0.0.0:14540\"\n");
        let f = Config::parse(&text, Path::new("x.toml")).unwrap().flight.unwrap();
        assert_eq!(f.allowed_states, vec![AllowedState::Disarmed]);
        assert_eq!(f.unknown, UnknownPolicy::Wait);
        assert_eq!(f.stale_after, Duration::from_secs(3));
        assert_eq!((f.system_id, f.confirm_samples), (None, 3));
        assert!(!f.gate_download);
        for bad in [
            "[flight]\n",
            "[flight]\nmavlink = \"carrier-pigeon:1\"\n",
            "[flight]\nmavlink = \"udpin:127.0.0.1:14540\"\nsystem_id = 0\n",
            "[flight]\nmavlink = \"udpin:127.0.0.1:14540\"\nconfirm_samples = 0\n",
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{bad}"), Path::new("x.toml")).unwrap_err();
            assert!(err.to_string().contains("flight"), "{err}");
        }
    }

    #[test]
    fn chunk_workers_default_to_the_cores_but_one_and_zero_is_refused() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert_eq!(c.download.chunk_workers, None);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let default = c.download.chunk_workers();
        assert!((1..=MAX_DEFAULT_CHUNK_WORKERS).contains(&default), "{default}");
        assert_eq!(
            default,
            (cores - 1).clamp(1, MAX_DEFAULT_CHUNK_WORKERS),
            "{cores} cores"
        );
        let text = format!("{MINIMAL}\n[download]\nchunk_workers = 6\n");
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(
            c.download.chunk_workers(),
            6,
            "a set count is not capped at the default's cap"
        );
        for bad in [0, MAX_CHUNK_WORKERS + 1] {
            let text = format!("{MINIMAL}\n[download]\nchunk_workers = {bad}\n");
            let err = Config::parse(&text, Path::new("x.toml")).unwrap_err();
            assert!(err.to_string().contains("chunk_workers"), "{bad}: {err}");
        }
    }

    #[test]
    fn link_and_power_keys_get_defaults_and_are_checked() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert!(c.download.metered_interfaces.is_empty() && !c.download.networkmanager);
        assert_eq!(c.download.on_metered, OnMetered::Defer);
        assert_eq!((c.download.max_rate, c.download.window), (None, None));
        assert!(!c.install.require_charging);
        let text = format!(
            "{MINIMAL}\n[download]\nmetered_interfaces = [\"wwan*\"]\non_metered = \"throttle\"\nmetered_max_rate = 20000\nwindow = \"22:00-06:00\"\n"
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(c.download.metered_max_rate, Some(20000));
        assert_eq!(
            c.download.window.map(|w| w.to_string()).as_deref(),
            Some("22:00-06:00")
        );
        for (bad, says) in [
            ("[download]\non_metered = \"throttle\"\n", "metered_max_rate"),
            ("[download]\nmax_rate = 0\n", "at least 1"),
            ("[download]\nwindow = \"22-6\"\n", "HH:MM-HH:MM"),
            ("[download]\nmetered_interfaces = [\"\"]\n", "metered_interfaces"),
            ("[install]\nrequire_charging = true\n", "require_charging"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{bad}"), Path::new("x.toml")).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
        let text =
            format!("{MINIMAL}\n[install]\nrequire_charging = true\ncharging_command = \"dock-status\"\n");
        assert!(
            Config::parse(&text, Path::new("x.toml"))
                .unwrap()
                .install
                .require_charging
        );
    }

    #[test]
    fn reboot_mode_without_boot_section_is_refused() {
        let text = format!("{MINIMAL}\n[activation]\nmode = \"reboot\"\n");
        let err = Config::parse(&text, Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("[boot]"), "{err}");
    }

    #[test]
    fn boot_attempts_must_be_one_hex_digit() {
        let boot = "[activation]\nmode = \"reboot\"\n[boot]\nbackend = \"uboot\"\n";
        let err =
            Config::parse(&format!("{MINIMAL}\n{boot}attempts = 10\n"), Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("1 to 9"), "{err}");
        let c = Config::parse(&format!("{MINIMAL}\n{boot}attempts = 9\n"), Path::new("x.toml")).unwrap();
        let b = c.boot.unwrap();
        assert_eq!(b.attempts, 9);
        assert_eq!(b.initial_env, Path::new("/etc/u-boot-initial-env"));
        assert_eq!(b.tool_timeout, Duration::from_mins(5));
        assert_eq!(b.fw_env_config, Path::new("/etc/fw_env.config"));
        assert!(!b.allow_single_copy_env, "a single copy must be opted into");
    }
}
