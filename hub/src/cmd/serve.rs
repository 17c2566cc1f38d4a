//! `flightnode-hub serve`: picks the sink, starts the tasks, serves gRPC and HTTP until shutdown.

use crate::cmd::http::HttpState;
use crate::heartbeat::hub::{Hub, HubConfig};
use crate::heartbeat::session::SpecCache;
use crate::store::kube::KubeSink;
use crate::store::local::LocalStore;
use crate::store::sink::StatusSink;
use crate::{Error, Result};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// How long a stopping hub keeps writing queued statuses (well inside Kubernetes' default 30 s
/// termination grace period).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where statuses go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded sled store, served on the HTTP port.
    Local,
    /// The Kubernetes API (in cluster, or KUBECONFIG).
    Kube,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Sink.
    pub store: StoreKind,
    /// Local store directory.
    pub data_dir: PathBuf,
    /// Namespace of the `FlightNode`s (`None`: the pod's, else the kubeconfig's, else `default`).
    pub namespace: Option<String>,
    /// Server certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Server key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates (PEM): enables mTLS and the device identity check.
    pub client_ca: Option<PathBuf>,
    /// Plaintext gRPC, no authentication.
    pub insecure: bool,
    /// Sessions, scheduler, acks.
    pub hub: HubConfig,
    /// Timeout of one Kubernetes request.
    pub write_timeout: Duration,
    /// Run the node reconciler and the rollout controller (on the Lease holder, with the kube
    /// store), publishing commands through this broker.
    pub controllers: Option<ControllerOptions>,
    /// The fleet page's token file for the local store (lines `token,user`): its users may act
    /// from the page. With the kube store the API server reviews tokens instead.
    pub ui_tokens: Option<PathBuf>,
}

/// Settings of the reconcilers.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Broker the commands go to.
    pub mqtt: crate::controller::mqtt::MqttTarget,
    /// Retry policy, gate, interval.
    pub config: crate::controller::reconcile::ControllerConfig,
    /// Elect a leader on a Lease (kube store); off: this replica always reconciles.
    pub leader_election: bool,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

fn tls_config(opts: &ServeOptions) -> Result<Option<ServerTlsConfig>> {
    if opts.insecure {
        if opts.tls_cert.is_some() || opts.client_ca.is_some() {
            return Err(Error::Invalid(
                "--insecure cannot be combined with --tls-cert or --client-ca".into(),
            ));
        }
        tracing::warn!(
            "INSECURE: gRPC is served in plaintext without client authentication (--insecure); any \
             client can report for any drone. Use this only for a local demo."
        );
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) else {
        return Err(Error::Invalid(
            "--tls-cert and --tls-key are required (or --insecure for a local demo)".into(),
        ));
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &opts.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    } else {
        tracing::warn!("no --client-ca: drones are not authenticated; any client can report for any drone");
    }
    Ok(Some(tls))
}

fn pod_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Addresses actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// gRPC.
    pub grpc: SocketAddr,
    /// HTTP.
    pub http: SocketAddr,
}

/// Serves until `shutdown` resolves. `on_bound` is called once both ports listen.
pub async fn serve(
    opts: ServeOptions,
    on_bound: impl FnOnce(Bound) + Send,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tls = tls_config(&opts)?;
    let specs = Arc::new(SpecCache::default());
    let mut hub_config = opts.hub.clone();
    let (hub, kube_watch) = match opts.store {
        StoreKind::Local => {
            let namespace = opts.namespace.clone().unwrap_or_else(|| "default".to_owned());
            let store = LocalStore::open(&opts.data_dir, &namespace)?;
            hub_config.session.sink_stores_events = true;
            let sink: Arc<dyn StatusSink> = Arc::new(store.clone());
            tracing::info!(data_dir = %opts.data_dir.display(), %namespace, "status sink: local store");
            let hub = Hub::new(hub_config, sink, Some(store.clone()), specs);
            // Drones stored online before a restart are watched until they are heard again.
            for node in store.list(Some(&namespace)) {
                hub.node_seen(&node);
            }
            (hub, None)
        }
        StoreKind::Kube => {
            let client = crate::store::kube::client_from_env().await?;
            let namespace = opts
                .namespace
                .clone()
                .or_else(pod_namespace)
                .unwrap_or_else(|| client.default_namespace().to_owned());
            hub_config.session.sink_stores_events = false;
            let sink: Arc<dyn StatusSink> =
                Arc::new(KubeSink::new(client.clone(), &namespace, opts.write_timeout));
            tracing::info!(%namespace, "status sink: kubernetes (server-side apply)");
            (Hub::new(hub_config, sink, None, specs), Some((client, namespace)))
        }
    };
    let kube_client = kube_watch.as_ref().map(|(client, _)| client.clone());
    let mut tasks = hub.start();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The Lease is released only after the controllers stopped (see the end of this function).
    let (lease_stop_tx, lease_stop_rx) = tokio::sync::watch::channel(false);
    let mut lease_task = None;
    let mut controller_tasks = Vec::new();
    let fleet: crate::cmd::ui::ControllerFleet = Arc::default();
    if let Some(c) = &opts.controllers {
        let (lease, others) =
            start_controllers(c, &hub, kube_watch.clone(), lease_stop_rx, Arc::clone(&fleet))?;
        lease_task = lease;
        controller_tasks = others;
    }
    if let Some((client, namespace)) = kube_watch {
        let hub_ref = Arc::clone(&hub);
        let on_node = move |node: &crate::api::flightnode::FlightNode| hub_ref.node_seen(node);
        tasks.push(tokio::spawn(crate::store::kube::watch_specs(
            client, namespace, on_node,
        )));
    }

    let serve_err = |addr: SocketAddr| {
        move |source: std::io::Error| Error::Serve {
            addr: addr.to_string(),
            source,
        }
    };
    let grpc_listener = tokio::net::TcpListener::bind(opts.grpc_addr)
        .await
        .map_err(serve_err(opts.grpc_addr))?;
    let http_listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .map_err(serve_err(opts.http_addr))?;
    let bound = Bound {
        grpc: grpc_listener.local_addr().map_err(serve_err(opts.grpc_addr))?,
        http: http_listener.local_addr().map_err(serve_err(opts.http_addr))?,
    };

    let authority = ui_authority(&opts, &hub, kube_client.as_ref(), bound.http)?;
    let ready = Arc::new(AtomicBool::new(false));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let router = crate::cmd::http::router(HttpState {
        hub: Arc::clone(&hub),
        ready: Arc::clone(&ready),
        fleet,
        authority,
    });
    let http_rx = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, router)
            .with_graceful_shutdown(stopped(http_rx))
            .await
    });

    let mut builder = Server::builder();
    let require_identity = opts.client_ca.is_some();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(Error::Tls)?;
    }
    let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc = builder
        .add_service(crate::heartbeat::grpc::service(
            Arc::clone(&hub),
            require_identity,
        ))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx));
    ready.store(true, Ordering::SeqCst);
    tracing::info!(grpc = %bound.grpc, http = %bound.http, mtls = require_identity, "flightnode-hub serving");
    on_bound(bound);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let result = grpc.await.map_err(|source| Error::Grpc {
        addr: bound.grpc.to_string(),
        source,
    });
    ready.store(false, Ordering::SeqCst);
    let _ = http.await;
    // The controllers stop first, so nothing they do can land after the Lease is released and
    // another replica took over; then the lease loop releases the Lease.
    for t in controller_tasks {
        t.abort();
        let _ = t.await;
    }
    let _ = lease_stop_tx.send(true);
    if let Some(lease) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), lease).await;
    }
    for t in tasks {
        t.abort();
    }
    // What drones reported last still goes out (transitions first), within a bound.
    hub.scheduler.drain(DRAIN_TIMEOUT).await;
    result
}

/// Who may act from the fleet page: on a cluster the API server reviews tokens (and the hub
/// writes with its own client); on the local store the users of `--ui-tokens`, whose actions go
/// through this hub's own HTTP API like the CLI's; else nobody.
fn ui_authority(
    opts: &ServeOptions,
    hub: &Hub,
    kube: Option<&kube::Client>,
    http: SocketAddr,
) -> Result<crate::cmd::ui::act::Authority> {
    use crate::cmd::ui::act::{Authority, read_token_file};
    if let Some(client) = kube {
        if opts.ui_tokens.is_some() {
            tracing::warn!(
                "--ui-tokens is for the local store; with --store kube the API server reviews the page's tokens"
            );
        }
        return Ok(Authority::Kube(client.clone()));
    }
    let (Some(path), Some(_)) = (&opts.ui_tokens, &hub.local) else {
        return Ok(Authority::None);
    };
    let users = read_token_file(path).map_err(|e| Error::Invalid(flightnode_proto::error::chain(&e)))?;
    // The hub's own HTTP port, on loopback when it listens on every address.
    let ip = if http.ip().is_unspecified() {
        match http {
            SocketAddr::V4(_) => std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        http.ip()
    };
    let client = crate::store::kube::client_for_url(&format!("http://{}", SocketAddr::new(ip, http.port())))?;
    tracing::info!(users = users.len(), path = %path.display(), "fleet page: token file users may act");
    Ok(Authority::Tokens { users, client })
}

type Tasks = (
    Option<tokio::task::JoinHandle<()>>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Starts the reconcilers; with the kube store and leader election also the Lease loop. The
/// kube store's caches go into `fleet` once they listed, for the fleet page (on every replica:
/// reading needs no Lease).
fn start_controllers(
    c: &ControllerOptions,
    hub: &Arc<Hub>,
    kube: Option<(kube::Client, String)>,
    stop: tokio::sync::watch::Receiver<bool>,
    fleet: crate::cmd::ui::ControllerFleet,
) -> Result<Tasks> {
    use crate::controller::fence::{FencedCommands, FencedStore};
    use crate::controller::lease::Leadership;
    let publisher: Arc<dyn crate::controller::mqtt::CommandSink> =
        Arc::new(crate::controller::mqtt::MqttPublisher::start(&c.mqtt)?);
    let metrics = Arc::clone(&hub.metrics);
    let config = c.config.clone();
    let mut tasks = Vec::new();
    let mut lease_task = None;
    match (kube, &hub.local) {
        (Some((client, namespace)), _) => {
            let leader = if c.leader_election {
                let leader = Leadership::follower();
                let lease = crate::controller::lease::LeaseConfig::new(&namespace, &c.identity);
                lease_task = Some(tokio::spawn(crate::controller::lease::run(
                    client.clone(),
                    lease,
                    leader.clone(),
                    stop,
                )));
                leader
            } else {
                Leadership::always()
            };
            let identity = c.identity.clone();
            let leader_metric = metrics.leader.clone();
            let gauge = leader.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    leader_metric.set(0);
                    gauge.gained().await;
                    leader_metric.set(1);
                    gauge.lost().await;
                }
            }));
            let commands = Arc::new(FencedCommands::new(publisher, leader.clone()));
            tasks.push(tokio::spawn(async move {
                let store = match crate::store::fleet::KubeFleet::start(client, &namespace, &identity).await {
                    Ok(s) => {
                        let s = Arc::new(s);
                        let _ = fleet.set(Arc::clone(&s) as Arc<dyn crate::store::fleet::FleetStore>);
                        s
                    }
                    Err(e) => {
                        tracing::error!(error = %flightnode_proto::error::Chain(&e), "controllers not started");
                        return;
                    }
                };
                let controllers = crate::controller::reconcile::Controllers::new(
                    Arc::new(FencedStore::new(store, leader.clone())),
                    commands,
                    metrics,
                    config,
                );
                controllers.run(leader).await;
            }));
        }
        (None, Some(local)) => {
            let hub_ref = Arc::clone(hub);
            let on_change: crate::store::fleet::OnNodeChange =
                Arc::new(move |node: &crate::api::flightnode::FlightNode| hub_ref.node_seen(node));
            let store = Arc::new(crate::store::fleet::LocalFleet::new(local.clone(), on_change));
            metrics.leader.set(1);
            let controllers =
                crate::controller::reconcile::Controllers::new(store, publisher, metrics, config);
            tasks.push(tokio::spawn(controllers.run(Leadership::always())));
        }
        (None, None) => {}
    }
    Ok((lease_task, tasks))
}
