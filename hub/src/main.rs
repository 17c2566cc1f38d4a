//! `flightnode-hub`: gRPC heartbeats in, `FlightNode` status out.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flightnode_hub::cmd::serve::{ControllerOptions, ServeOptions, StoreKind};
use flightnode_hub::controller::reconcile::ControllerConfig;
use flightnode_hub::decide::node_sync::Policy;
use flightnode_hub::heartbeat::hub::HubConfig;
use flightnode_hub::heartbeat::scheduler::SchedulerConfig;
use flightnode_hub::heartbeat::session::SessionConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "flightnode-hub",
    version,
    about = "flightnode hub: gRPC heartbeats in, FlightNode status out"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve gRPC heartbeats and write FlightNode status.
    Serve(Box<ServeArgs>),
    /// Print the FlightNode CRD as YAML.
    Crd,
    /// List FlightNodes like `kubectl get flightnodes`.
    Get(GetArgs),
    /// Publish an MQTT upgrade command for one drone.
    Upgrade(UpgradeArgs),
    /// Publish an MQTT cancel command for one drone.
    Cancel(CancelArgs),
    /// Create or update FirmwareRollouts (and FlightNode spec.firmware) on a local hub.
    Apply(ApplyArgs),
    /// FirmwareRollout commands.
    Rollout {
        #[command(subcommand)]
        command: RolloutCmd,
    },
    /// The fleet at a glance: counts per version, phase and flight state, online, and the drones
    /// that need attention and why.
    Fleet(FleetArgs),
    /// Describe one drone: slots, versions, flights since commit, its last upgrade and why it
    /// ended so, the flight controller, conditions and recent events.
    Drone(DroneArgs),
}

#[derive(Args)]
struct FleetArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Namespace [default: the kubeconfig context's, else `default`].
    #[arg(long, short = 'n', env = "FLIGHTNODE_HUB_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(Args)]
struct DroneArgs {
    /// FlightNode name.
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Namespace [default: the kubeconfig context's, else `default`].
    #[arg(long, short = 'n', env = "FLIGHTNODE_HUB_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Show a rollout's waves, counts and drones; follows it until it completes or halts
    /// (exit code 1 when the circuit breaker halted it).
    Status(RolloutStatusArgs),
    /// Pause a rollout: nothing new is dispatched, drones already dispatched go on
    /// (sets `spec.paused: true`, like a merge patch of `{"spec":{"paused":true}}` with kubectl).
    Pause(RolloutNameArgs),
    /// Resume a paused or halted rollout: clears `spec.paused`, and lifts a circuit-breaker halt
    /// or an abort without a spec edit (the breaker counts afresh from then).
    Resume(RolloutNameArgs),
    /// Abort a rollout: nothing new is dispatched and every drone that has not started is called
    /// back (`Halted`, reason `Aborted`) until `resume` or a new target. Refused for a complete
    /// rollout.
    Abort(RolloutNameArgs),
    /// End the current wave's soak now: the next wave starts (refused while the wave's drones
    /// still work, in the last wave, or while halted).
    Promote(RolloutNameArgs),
    /// A new attempt for the drones of the rollout's target that failed (failed, rejected,
    /// rolled back, timed out), and only those (refused when none did).
    Retry(RolloutNameArgs),
    /// The rollout's recorded events (waves advanced, halts, completion), oldest first.
    History(RolloutNameArgs),
}

#[derive(Args)]
struct RolloutNameArgs {
    /// Rollout name.
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Namespace [default: the kubeconfig context's, else `default`].
    #[arg(long, short = 'n', env = "FLIGHTNODE_HUB_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(Args)]
struct SourceArgs {
    /// A hub's HTTP address (local store) [default: http://127.0.0.1:8080; as `kubectl
    /// flightnode`: the cluster].
    #[arg(long, env = "FLIGHTNODE_HUB_SERVER", conflicts_with = "kube")]
    server: Option<String>,
    /// Read from the cluster (KUBECONFIG or in-cluster) instead.
    #[arg(long)]
    kube: bool,
}

/// The hub's default HTTP address.
const LOCAL_HUB: &str = "http://127.0.0.1:8080";

impl SourceArgs {
    /// Whether this talks to a local hub rather than a cluster. As a kubectl plugin the cluster
    /// of the kubeconfig is the default, as it is for kubectl.
    fn local(&self) -> bool {
        !self.kube && (self.server.is_some() || !as_kubectl_plugin())
    }

    async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(if self.local() {
            flightnode_hub::store::kube::client_for_url(self.server.as_deref().unwrap_or(LOCAL_HUB))?
        } else {
            flightnode_hub::store::kube::client_from_env().await?
        })
    }

    /// `namespace`, else the kubeconfig context's for a cluster, else `default`.
    fn namespace(&self, namespace: Option<&str>, client: &kube::Client) -> String {
        match namespace {
            Some(ns) => ns.to_owned(),
            None if self.local() => "default".to_owned(),
            None => client.default_namespace().to_owned(),
        }
    }
}

/// Run as `kubectl-flightnode` (a link to this binary on PATH), i.e. as `kubectl flightnode …`.
fn as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().starts_with("kubectl-flightnode"))
        })
        .unwrap_or(false)
}

#[derive(Args)]
struct RolloutStatusArgs {
    /// Rollout name.
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Namespace.
    #[arg(
        long,
        short = 'n',
        env = "FLIGHTNODE_HUB_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// Print once instead of following the rollout.
    #[arg(long)]
    once: bool,
    /// Poll interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    interval: Duration,
}

#[derive(Args)]
struct ApplyArgs {
    /// YAML file with FirmwareRollout and FlightNode documents.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// The hub's HTTP address (local store).
    #[arg(long, env = "FLIGHTNODE_HUB_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Namespace of documents without one.
    #[arg(
        long,
        short = 'n',
        env = "FLIGHTNODE_HUB_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
}

#[derive(Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each bool is an independent command-line switch, not a state an enum would model better"
)]
struct ServeArgs {
    /// Also run an MQTT broker on this address (plain TCP, no auth: laptops and the demo).
    #[cfg(feature = "embedded-broker")]
    #[arg(long, env = "FLIGHTNODE_HUB_EMBEDDED_BROKER", num_args = 0..=1, default_missing_value = "127.0.0.1:1883")]
    embedded_broker: Option<SocketAddr>,
    /// gRPC listen address.
    #[arg(long, env = "FLIGHTNODE_HUB_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    grpc_addr: SocketAddr,
    /// HTTP listen address (/metrics, /healthz, /readyz, the fleet page /ui, local API).
    #[arg(long, env = "FLIGHTNODE_HUB_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Status sink.
    #[arg(long, env = "FLIGHTNODE_HUB_STORE", value_enum, default_value = "local")]
    store: StoreKind,
    /// Directory of the local store.
    #[arg(long, env = "FLIGHTNODE_HUB_DATA_DIR", default_value = "flightnode-hub-data")]
    data_dir: PathBuf,
    /// Namespace of the FlightNodes [default: the pod's namespace in cluster, else `default`].
    #[arg(long, env = "FLIGHTNODE_HUB_NAMESPACE")]
    namespace: Option<String>,
    /// Local store: a token file (lines `token,user`) whose users may act from the fleet page
    /// (pause, resume, abort, promote, retry) after signing in with their token. With the kube
    /// store the API server reviews the page's tokens instead (TokenReview, SubjectAccessReview).
    #[arg(long, env = "FLIGHTNODE_HUB_UI_TOKENS")]
    ui_tokens: Option<PathBuf>,
    /// Server certificate (PEM).
    #[arg(long, env = "FLIGHTNODE_HUB_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "FLIGHTNODE_HUB_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA of drone client certificates (PEM): requires mTLS and the device identity check.
    #[arg(long, env = "FLIGHTNODE_HUB_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// Serve gRPC in plaintext without authentication (local demo only).
    #[arg(long, env = "FLIGHTNODE_HUB_INSECURE")]
    insecure: bool,
    /// Sustained status writes per second.
    #[arg(long, env = "FLIGHTNODE_HUB_API_QPS", default_value_t = 20.0)]
    api_qps: f64,
    /// Status write burst. Half of it is kept for transitions: first writes and refreshes only
    /// take a token while more than burst/2 are left.
    #[arg(long, env = "FLIGHTNODE_HUB_API_BURST", default_value_t = 40)]
    api_burst: u32,
    /// The agents' heartbeat interval (for the default grace period; advertised with --advertise-interval).
    #[arg(long, env = "FLIGHTNODE_HUB_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    heartbeat_interval: Duration,
    /// Tell agents to use --heartbeat-interval.
    #[arg(long, env = "FLIGHTNODE_HUB_ADVERTISE_INTERVAL")]
    advertise_interval: bool,
    /// Grace period before a silent drone is offline [default: 3 × heartbeat interval + 5s].
    #[arg(long, env = "FLIGHTNODE_HUB_OFFLINE_AFTER", value_parser = humantime::parse_duration)]
    offline_after: Option<Duration>,
    /// Rewrite an unchanged status when its lastHeartbeatTime is this old.
    #[arg(long, env = "FLIGHTNODE_HUB_STATUS_REFRESH", value_parser = humantime::parse_duration, default_value = "60s")]
    status_refresh: Duration,
    /// Create missing FlightNodes (kube store; the local store always creates).
    #[arg(long, env = "FLIGHTNODE_HUB_AUTO_REGISTER")]
    auto_register: bool,
    /// How long a heartbeat with new events waits for them to be durable before answering.
    #[arg(long, env = "FLIGHTNODE_HUB_ACK_WAIT", value_parser = humantime::parse_duration, default_value = "2s")]
    ack_wait: Duration,
    /// Timeout of one Kubernetes API request.
    #[arg(long, env = "FLIGHTNODE_HUB_WRITE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    write_timeout: Duration,
    /// API writes in flight at once: heartbeat status writes, and, each, the controllers' drone
    /// writes and commands.
    #[arg(long, env = "FLIGHTNODE_HUB_WRITE_CONCURRENCY", default_value_t = 8)]
    write_concurrency: usize,
    /// Run the node reconciler and the FirmwareRollout controller (commands go to --mqtt-url).
    #[arg(long, env = "FLIGHTNODE_HUB_CONTROLLERS")]
    controllers: bool,
    /// With --store kube: run the controllers only on the holder of the Lease
    /// `flightnode-hub-controller` (several replicas). Off: this replica always reconciles.
    #[arg(long, env = "FLIGHTNODE_HUB_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// This replica's identity in the Lease [default: $POD_NAME, else host name + pid].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Attempts per generation of spec.firmware for transient failures.
    #[arg(long, env = "FLIGHTNODE_HUB_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// Back-off after the first failed attempt (doubles per attempt).
    #[arg(long, env = "FLIGHTNODE_HUB_RETRY_BACKOFF", value_parser = humantime::parse_duration, default_value = "30s")]
    retry_backoff: Duration,
    /// Longest time between two reconcile passes.
    #[arg(long, env = "FLIGHTNODE_HUB_RECONCILE_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    reconcile_interval: Duration,
    #[command(flatten)]
    mqtt: MqttArgs,
}

#[derive(Args)]
struct GetArgs {
    /// `flightnodes` (`fn`, default) or `rollouts` (`firmwarerollouts`, `fwr`).
    #[arg(default_value = "flightnodes")]
    resource: String,
    /// A hub's HTTP address (local store).
    #[arg(
        long,
        env = "FLIGHTNODE_HUB_SERVER",
        default_value = "http://127.0.0.1:8080",
        conflicts_with = "kube"
    )]
    server: String,
    /// Read from the cluster (KUBECONFIG or in-cluster) instead.
    #[arg(long)]
    kube: bool,
    /// Namespace [default: all].
    #[arg(long, short = 'n', env = "FLIGHTNODE_HUB_NAMESPACE")]
    namespace: Option<String>,
    /// Print a JSON FlightNodeList.
    #[arg(long)]
    json: bool,
    /// Keep polling and print rows that changed.
    #[arg(long, short = 'w')]
    watch: bool,
    /// Poll interval with --watch.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    interval: Duration,
}

#[derive(Args)]
#[allow(clippy::struct_field_names, reason = "the flags are --mqtt-*")]
struct MqttArgs {
    /// Broker URL, mqtt://host:port or mqtts://host:port.
    #[arg(
        long,
        env = "FLIGHTNODE_HUB_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    mqtt_url: String,
    /// CA bundle (PEM) for mqtts://.
    #[arg(long, env = "FLIGHTNODE_HUB_MQTT_CA")]
    mqtt_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "FLIGHTNODE_HUB_MQTT_CERT")]
    mqtt_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, env = "FLIGHTNODE_HUB_MQTT_KEY")]
    mqtt_key: Option<PathBuf>,
    /// MQTT client id.
    #[arg(long, env = "FLIGHTNODE_HUB_MQTT_CLIENT_ID", default_value = "flightnode-hub")]
    mqtt_client_id: String,
    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    mqtt_timeout: Duration,
    /// The hub's command key (PKCS#8 PEM ed25519; in a cluster, mounted from a Secret): every
    /// command is signed for its drone with it, and heartbeat responses carry the hub's signed
    /// time. Drones list its public key in `[commands] hub_keys`. Without it commands go out
    /// unsigned, and drones obey them only with `insecure_accept_unsigned`.
    #[arg(long, env = "FLIGHTNODE_HUB_COMMAND_KEY")]
    command_key: Option<PathBuf>,
    /// How long a signed command stays valid: a drone that was away longer (a long flight, a
    /// hangar without network) refuses it as expired and the hub sends a fresh one.
    #[arg(long, env = "FLIGHTNODE_HUB_COMMAND_VALIDITY", value_parser = humantime::parse_duration, default_value = "24h")]
    command_validity: Duration,
}

impl MqttArgs {
    fn target(&self) -> anyhow::Result<flightnode_hub::controller::mqtt::MqttTarget> {
        Ok(flightnode_hub::controller::mqtt::MqttTarget {
            url: self.mqtt_url.clone(),
            ca: self.mqtt_ca.clone(),
            cert: self.mqtt_cert.clone(),
            key: self.mqtt_key.clone(),
            client_id: self.mqtt_client_id.clone(),
            timeout: self.mqtt_timeout,
            signer: self.signer()?,
        })
    }

    fn signer(&self) -> anyhow::Result<Option<flightnode_hub::signing::CommandSigner>> {
        self.command_key
            .as_deref()
            .map(|path| flightnode_hub::signing::CommandSigner::load(path, self.command_validity))
            .transpose()
            .map_err(anyhow::Error::from)
    }
}

#[derive(Args)]
struct UpgradeArgs {
    /// Device id.
    #[arg(long)]
    device: String,
    /// Bundle URL.
    #[arg(long, conflicts_with_all = ["bundle", "base_url"])]
    url: Option<String>,
    /// Bundle file (its version is read from the manifest); published under --base-url.
    #[arg(long, requires = "base_url")]
    bundle: Option<PathBuf>,
    /// URL the bundle file is served under.
    #[arg(long)]
    base_url: Option<String>,
    /// Upgrade id [default: derived from the URL, so re-publishing is the same upgrade].
    #[arg(long)]
    upgrade_id: Option<String>,
    /// Allow a lower version for this install.
    #[arg(long)]
    allow_downgrade: bool,
    #[command(flatten)]
    mqtt: MqttArgs,
}

#[derive(Args)]
struct CancelArgs {
    /// Device id.
    #[arg(long)]
    device: String,
    /// The upgrade to cancel.
    #[arg(long)]
    upgrade_id: String,
    #[command(flatten)]
    mqtt: MqttArgs,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "flightnode-hub".to_owned(), |h| h.trim().to_owned());
    format!("{host}-{}", std::process::id())
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    #[cfg(feature = "embedded-broker")]
    if let Some(listen) = a.embedded_broker {
        flightnode_hub::cmd::broker::start(listen)
            .with_context(|| format!("starting the embedded MQTT broker on {listen}"))?;
    }
    let identity = a.identity.clone().unwrap_or_else(default_identity);
    let mqtt_target = a.mqtt.target()?;
    let signer = mqtt_target.signer.clone();
    if let Some(s) = &signer {
        tracing::info!(key_id = %s.key_id(), "commands and heartbeat times are signed with the hub's command key");
    }
    let grace = a
        .offline_after
        .unwrap_or(a.heartbeat_interval * 3 + Duration::from_secs(5));
    let opts = ServeOptions {
        grpc_addr: a.grpc_addr,
        http_addr: a.http_addr,
        store: a.store,
        data_dir: a.data_dir,
        namespace: a.namespace,
        ui_tokens: a.ui_tokens,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        client_ca: a.client_ca,
        insecure: a.insecure,
        hub: HubConfig {
            session: SessionConfig {
                refresh: a.status_refresh,
                grace,
                sink_stores_events: false,
            },
            scheduler: SchedulerConfig {
                qps: a.api_qps,
                burst: a.api_burst,
                workers: a.write_concurrency,
                auto_register: a.auto_register,
                ..SchedulerConfig::default()
            },
            ack_wait: a.ack_wait,
            signer,
            advertise_interval_secs: if a.advertise_interval {
                u32::try_from(a.heartbeat_interval.as_secs()).unwrap_or(u32::MAX)
            } else {
                0
            },
        },
        write_timeout: a.write_timeout,
        controllers: a.controllers.then(|| ControllerOptions {
            // NB: one MQTT client id per replica, or the broker disconnects one for the other.
            mqtt: flightnode_hub::controller::mqtt::MqttTarget {
                client_id: format!("{}-{}", a.mqtt.mqtt_client_id, identity),
                ..mqtt_target.clone()
            },
            config: ControllerConfig {
                policy: Policy {
                    max_attempts: a.max_attempts.max(1),
                    backoff: a.retry_backoff,
                    ..Policy::default()
                },
                interval: a.reconcile_interval,
                concurrent_writes: a.write_concurrency.max(1),
                ..ControllerConfig::default()
            },
            leader_election: a.leader_election,
            identity: identity.clone(),
        }),
    };
    flightnode_hub::cmd::serve::serve(
        opts,
        |bound| {
            // One parseable line for scripts and tests that start the hub on port 0.
            println!("flightnode-hub listening grpc={} http={}", bound.grpc, bound.http);
        },
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// How long a verb waits for the controller to carry out its request.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

/// `rollout pause|resume|abort|promote|retry NAME`: the same code path as the fleet page's
/// buttons ([`flightnode_hub::cmd::verb::act`]), as the user the kubeconfig names.
async fn rollout_verb(a: &RolloutNameArgs, verb: flightnode_hub::cmd::verb::Verb) -> anyhow::Result<()> {
    use flightnode_hub::cmd::verb::{Outcome, act};
    let client = a.source.client().await?;
    let ns = a.source.namespace(a.namespace.as_deref(), &client);
    let by = flightnode_hub::cmd::rollout::whoami(&client, a.source.local()).await;
    let outcome = act(&client, &ns, &a.name, verb, &by, REQUEST_WAIT).await?;
    let line = outcome.line(&a.name, verb, REQUEST_WAIT);
    if matches!(outcome, Outcome::Refused(_)) {
        anyhow::bail!(line);
    }
    println!("{line}");
    Ok(())
}

// One match arm per subcommand; splitting it would only move the dispatch elsewhere.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = if as_kubectl_plugin() {
        // kubectl runs `kubectl-flightnode ARGS`: help and errors name the command the user typed.
        let mut cmd = <Cli as clap::CommandFactory>::command()
            .name("kubectl flightnode")
            .bin_name("kubectl flightnode");
        let matches = cmd.get_matches_mut();
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
            .map_err(|e| e.format(&mut cmd))
            .unwrap_or_else(|e| e.exit())
    } else {
        Cli::parse()
    };
    match cli.command {
        Cmd::Serve(a) => serve(*a).await,
        Cmd::Crd => {
            print!("{}", flightnode_hub::api::crd_yaml()?);
            Ok(())
        }
        Cmd::Get(a)
            if matches!(
                a.resource.as_str(),
                "rollouts" | "rollout" | "firmwarerollouts" | "fwr"
            ) =>
        {
            let client = if a.kube {
                flightnode_hub::store::kube::client_from_env().await?
            } else {
                flightnode_hub::store::kube::client_for_url(&a.server)?
            };
            let items = flightnode_hub::cmd::rollout::list(&client, a.namespace.as_deref()).await?;
            if a.json {
                let body = serde_json::json!({"apiVersion": "edge.drone.io/v1", "kind": "FirmwareRolloutList", "items": items});
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else if items.is_empty() {
                println!("No resources found");
            } else {
                print!("{}", flightnode_hub::cmd::rollout::table(&items));
            }
            Ok(())
        }
        Cmd::Get(a) if !matches!(a.resource.as_str(), "flightnodes" | "flightnode" | "fn") => {
            anyhow::bail!("unknown resource {:?}: flightnodes or rollouts", a.resource)
        }
        Cmd::Apply(a) => {
            let yaml =
                std::fs::read_to_string(&a.file).with_context(|| format!("read {}", a.file.display()))?;
            let client = flightnode_hub::store::kube::client_for_url(&a.server)?;
            let lines = flightnode_hub::cmd::rollout::apply(&client, &a.namespace, &yaml)
                .await
                .with_context(|| format!("apply -f {} to {}", a.file.display(), a.server))?;
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Fleet(a) => {
            let client = a.source.client().await?;
            let ns = a.source.namespace(a.namespace.as_deref(), &client);
            let nodes = flightnode_hub::cmd::get::list(&client, Some(&ns)).await?;
            print!(
                "{}",
                flightnode_hub::cmd::fleet::summary(&nodes, &ns, time::OffsetDateTime::now_utc())
            );
            Ok(())
        }
        Cmd::Drone(a) => {
            let client = a.source.client().await?;
            let ns = a.source.namespace(a.namespace.as_deref(), &client);
            let api: kube::Api<flightnode_hub::api::flightnode::FlightNode> =
                kube::Api::namespaced(client.clone(), &ns);
            let node = api
                .get_opt(&a.name)
                .await
                .with_context(|| format!("read FlightNode {} in namespace {ns}", a.name))?
                .with_context(|| {
                    format!(
                        "no drone {} in namespace {ns}; `kubectl flightnode fleet` lists them",
                        a.name
                    )
                })?;
            // Events are a nice-to-have: a user without the right to list them still sees the drone.
            let events = flightnode_hub::cmd::fleet::events(&client, &ns, &a.name, a.source.local())
                .await
                .unwrap_or_else(|e| vec![format!("<cannot list events: {e}>")]);
            print!(
                "{}",
                flightnode_hub::cmd::fleet::describe(&node, &events, time::OffsetDateTime::now_utc())
            );
            Ok(())
        }
        Cmd::Rollout {
            command: RolloutCmd::Pause(a),
        } => rollout_verb(&a, flightnode_hub::cmd::verb::Verb::Pause).await,
        Cmd::Rollout {
            command: RolloutCmd::Resume(a),
        } => rollout_verb(&a, flightnode_hub::cmd::verb::Verb::Resume).await,
        Cmd::Rollout {
            command: RolloutCmd::Abort(a),
        } => rollout_verb(&a, flightnode_hub::cmd::verb::Verb::Abort).await,
        Cmd::Rollout {
            command: RolloutCmd::Promote(a),
        } => rollout_verb(&a, flightnode_hub::cmd::verb::Verb::Promote).await,
        Cmd::Rollout {
            command: RolloutCmd::Retry(a),
        } => rollout_verb(&a, flightnode_hub::cmd::verb::Verb::Retry).await,
        Cmd::Rollout {
            command: RolloutCmd::History(a),
        } => {
            let client = a.source.client().await?;
            let ns = a.source.namespace(a.namespace.as_deref(), &client);
            print!(
                "{}",
                flightnode_hub::cmd::rollout::history(&client, &ns, &a.name, a.source.local()).await?
            );
            Ok(())
        }
        Cmd::Rollout {
            command: RolloutCmd::Status(a),
        } => {
            let client = a.source.client().await?;
            let ended = flightnode_hub::cmd::rollout::status(
                &client,
                &a.namespace,
                &a.name,
                !a.once,
                a.interval,
                &mut std::io::stdout(),
            )
            .await?;
            // Like `kubectl rollout status`: a script can tell a halted rollout by the exit code.
            match ended {
                flightnode_hub::cmd::rollout::Watched::Halted(why) => {
                    anyhow::bail!("rollout {} is halted: {why}", a.name)
                }
                flightnode_hub::cmd::rollout::Watched::Stalled(reason, why) => {
                    anyhow::bail!("rollout {} cannot progress ({reason}): {why}", a.name)
                }
                flightnode_hub::cmd::rollout::Watched::Complete
                | flightnode_hub::cmd::rollout::Watched::InProgress => Ok(()),
            }
        }
        Cmd::Get(a) => {
            let source = if a.kube {
                flightnode_hub::cmd::get::Source::Kube
            } else {
                flightnode_hub::cmd::get::Source::Server(a.server)
            };
            let opts = flightnode_hub::cmd::get::GetOptions {
                source,
                namespace: a.namespace,
                json: a.json,
                watch: a.watch,
                interval: a.interval,
            };
            flightnode_hub::cmd::get::run(opts, &mut std::io::stdout()).await?;
            Ok(())
        }
        Cmd::Upgrade(a) => {
            let cmd = flightnode_hub::cmd::upgrade::upgrade_command(
                a.url.as_deref(),
                a.bundle.as_deref(),
                a.base_url.as_deref(),
                a.upgrade_id,
                a.allow_downgrade,
            )?;
            flightnode_hub::controller::mqtt::publish(&a.mqtt.target()?, &a.device, &cmd)
                .await
                .with_context(|| format!("publish upgrade for {}", a.device))?;
            println!("{}", cmd.upgrade_id());
            Ok(())
        }
        Cmd::Cancel(a) => {
            let cmd = flightnode_proto::mqtt::Command::Cancel {
                upgrade_id: a.upgrade_id,
            };
            flightnode_hub::controller::mqtt::publish(&a.mqtt.target()?, &a.device, &cmd)
                .await
                .with_context(|| format!("publish cancel for {}", a.device))?;
            Ok(())
        }
    }
}
