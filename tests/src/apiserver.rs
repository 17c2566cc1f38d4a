//! A real Kubernetes API server (etcd + kube-apiserver, no kubelet, no controllers) on loopback,
//! one per test, the way controller-runtime's envtest runs one.
//!
//! The kube-apiserver binary is not part of the project: it is found through the environment
//! variable [`ENV_DIR`] (`FLIGHTNODE_K8S_DIR`), a directory holding `kube-apiserver.xz`, which
//! `.ci/run` sets when that directory exists beside the checkout. Without it,
//! [`ApiServer::start`] prints why and returns `None`, and the test passes as skipped.
//! `etcd` (Debian's `etcd-server`) and `xz` must be on `PATH` (`test.sh` installs them).
//!
//! Every server gets its own temp directory and free ports; the processes are SIGKILLed when the
//! [`ApiServer`] is dropped. Certificates and the service-account key are made with rcgen, so no
//! openssl is needed. Two static tokens, as in the script beside the binary:
//! - `kube-admin`: user `admin`, group `system:masters` ([`ApiServer::admin_client`]);
//! - `flight-controller`: user `flight-controller`, group `fleet-controllers`, no rights until a
//!   Role grants them ([`ApiServer::restricted_client`], [`RESTRICTED_USER`]).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use flightnode_tests::apiserver::ApiServer;
//! let Some(api) = ApiServer::start().await? else { return Ok(()) }; // skipped
//! let admin = api.admin_client().await?;
//! api.apply_yaml(&admin, "apiVersion: v1\nkind: Namespace\nmetadata: {name: flightnode}\n", None).await?;
//! let hub = api.restricted_client().await?; // what the hub's Role allows, and nothing more
//! # Ok(()) }
//! ```

use anyhow::{Context, Result, anyhow, bail};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::{Api, Client, Discovery};
use sha2::Digest;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the directory with `kube-apiserver.xz`.
pub const ENV_DIR: &str = "FLIGHTNODE_K8S_DIR";
/// User name of the restricted token.
pub const RESTRICTED_USER: &str = "flight-controller";
/// Group of the restricted token.
pub const RESTRICTED_GROUP: &str = "fleet-controllers";
/// Field manager the harness applies manifests with.
pub const FIELD_MANAGER: &str = "flightnode-tests";

/// The directory named by [`ENV_DIR`], when set and holding `kube-apiserver.xz`.
pub fn k8s_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(ENV_DIR)?);
    dir.join("kube-apiserver.xz").is_file().then_some(dir)
}

/// A running etcd + kube-apiserver pair; killed on drop.
pub struct ApiServer {
    dir: tempfile::TempDir,
    url: String,
    port: u16,
    ca: PathBuf,
    apiserver: Option<Child>,
    etcd: Option<Child>,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Unpacks `kube-apiserver.xz` once per content into the system temp dir (tests share it; the
/// 112 MiB unpack is the slow part of a start). Written to a temp name, then renamed.
fn unpacked_binary(k8s_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    // Tests in one binary start servers in parallel: one unpack at a time, or a second writer's
    // xz could still be writing the inode the first one renamed and executes (ETXTBSY).
    static UNPACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let xz = k8s_dir.join("kube-apiserver.xz");
    let bytes = std::fs::read(&xz).with_context(|| format!("read {}", xz.display()))?;
    let digest = hex_prefix(&sha2::Sha256::digest(&bytes));
    let cache = std::env::temp_dir().join(format!("flightnode-kube-apiserver-{digest}"));
    let bin = cache.join("kube-apiserver");
    let _one_at_a_time = UNPACK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let partial = cache.join(format!("kube-apiserver.{}.partial", std::process::id()));
    let out = std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .stdout(out)
        .status()
        .context("run xz (apt-get install xz-utils)")?;
    if !status.success() {
        bail!("xz -dc {} failed: {status}", xz.display());
    }
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &bin).with_context(|| format!("rename to {}", bin.display()))?;
    Ok(bin)
}

/// Spawns `cmd`, retrying briefly on ETXTBSY: a child forked by another test thread while the
/// binary was still open for writing holds that descriptor until it execs.
fn spawn_retrying(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc_etxtbsy()) && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// `ETXTBSY` on Linux.
const fn libc_etxtbsy() -> i32 {
    26
}

fn hex_prefix(digest: &[u8]) -> String {
    digest.iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn log_file(path: &Path) -> Result<Stdio> {
    Ok(std::fs::File::create(path)
        .with_context(|| format!("create {}", path.display()))?
        .into())
}

fn kubeconfig(url: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: test, cluster: {{server: \"{url}\", certificate-authority: \"{ca}\"}}}}]\n\
         users: [{{name: {user}, user: {{token: {token}}}}}]\n\
         contexts: [{{name: {user}, context: {{cluster: test, user: {user}, namespace: default}}}}]\n\
         current-context: {user}\n",
        ca = ca.display()
    )
}

impl ApiServer {
    /// Starts a server from [`k8s_dir`]; `None` (after printing why) when [`ENV_DIR`] is unset.
    pub async fn start() -> Result<Option<ApiServer>> {
        let Some(dir) = k8s_dir() else {
            eprintln!(
                "SKIPPED: no real Kubernetes API server: set {ENV_DIR} to a directory holding \
                 kube-apiserver.xz (.ci/run sets it when ../shared/k8s exists)"
            );
            return Ok(None);
        };
        let server = tokio::task::spawn_blocking(move || Self::start_from(&dir)).await??;
        server.wait_ready().await?;
        Ok(Some(server))
    }

    /// Starts etcd and the API server from `k8s_dir` (does not wait for readiness).
    pub fn start_from(k8s_dir: &Path) -> Result<ApiServer> {
        let bin = unpacked_binary(k8s_dir)?;
        let dir = tempfile::Builder::new()
            .prefix("flightnode-apiserver-")
            .tempdir()?;
        let root = dir.path().to_owned();
        let pki_dir = root.join("pki");
        let pki = crate::pki::Pki::generate(&pki_dir, "flightnode-test-apiserver-ca")?;
        let sa = rcgen::KeyPair::generate().context("service account key")?;
        let sa_key = pki_dir.join("sa.key");
        let sa_pub = pki_dir.join("sa.pub");
        std::fs::write(&sa_key, sa.serialize_pem())?;
        std::fs::write(&sa_pub, sa.public_key_pem())?;
        let tokens = pki_dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!(
                "kube-admin,admin,1,\"system:masters\"\nflight-controller,{RESTRICTED_USER},2,\"{RESTRICTED_GROUP}\"\n"
            ),
        )?;
        let (port, etcd_port, peer_port) = (free_port()?, free_port()?, free_port()?);
        let url = format!("https://127.0.0.1:{port}");
        for (name, user, token) in [
            ("admin", "admin", "kube-admin"),
            ("restricted", RESTRICTED_USER, "flight-controller"),
        ] {
            std::fs::write(
                root.join(format!("{name}.kubeconfig")),
                kubeconfig(&url, &pki.ca, user, token),
            )?;
        }
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(root.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(log_file(&root.join("etcd.log"))?)
            .stderr(log_file(&root.join("etcd.err.log"))?)
            .spawn()
            .context("start etcd (apt-get install etcd-server)")?;
        let mut server = ApiServer {
            dir,
            url,
            port,
            ca: pki.ca.clone(),
            apiserver: None,
            etcd: Some(etcd),
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["--etcd-servers", &etcd_url])
            .args(["--secure-port", &port.to_string(), "--bind-address", "127.0.0.1"])
            .args([
                "--advertise-address",
                "127.0.0.1",
                "--endpoint-reconciler-type=none",
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            .arg("--tls-cert-file")
            .arg(&pki.server_cert)
            .arg("--tls-private-key-file")
            .arg(&pki.server_key)
            .arg("--client-ca-file")
            .arg(&pki.ca)
            .arg("--token-auth-file")
            .arg(&tokens)
            .arg("--authorization-mode=RBAC")
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .arg("--service-account-key-file")
            .arg(&sa_pub)
            .arg("--service-account-signing-key-file")
            .arg(&sa_key)
            .stdout(log_file(&root.join("apiserver.log"))?)
            .stderr(log_file(&root.join("apiserver.err.log"))?);
        let apiserver = spawn_retrying(&mut cmd).with_context(|| format!("start {}", bin.display()))?;
        server.apiserver = Some(apiserver);
        Ok(server)
    }

    /// Waits until `/readyz` answers 200 to the admin token (generous: the machine may be busy).
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_mins(2);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.admin_client().await {
                Ok(client) => {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    match client.request_text(req).await {
                        Ok(text) if text.trim() == "ok" => return Ok(()),
                        Ok(text) => last = text,
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!(
            "kube-apiserver on {} not ready after 120 s (last: {last}); logs:\n{}",
            self.url,
            self.log_tail()
        )
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed the serving certificate (PEM file).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// This server's own directory (logs, kubeconfigs, pki, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kubeconfig of the `kube-admin` token (system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Kubeconfig of the `flight-controller` token (rights only from Roles bound to it).
    pub fn restricted_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("restricted.kubeconfig")
    }

    /// A kube client from a kubeconfig file, with namespace `default`.
    pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("read {}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("load {}", kubeconfig.display()))?;
        Client::try_from(config).context("build kube client")
    }

    /// A client with every right.
    pub async fn admin_client(&self) -> Result<Client> {
        Self::client_from(&self.admin_kubeconfig()).await
    }

    /// A client as user [`RESTRICTED_USER`] in group [`RESTRICTED_GROUP`].
    pub async fn restricted_client(&self) -> Result<Client> {
        Self::client_from(&self.restricted_kubeconfig()).await
    }

    /// Server-side applies every document of a multi-document YAML, in order, with field manager
    /// [`FIELD_MANAGER`] (forced). Namespaced objects without a namespace go to `namespace`
    /// (or `default`). A CRD is waited for until `Established`, so the next document may use it.
    pub async fn apply_yaml(
        &self,
        client: &Client,
        yaml: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<DynamicObject>> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| anyhow!("parse YAML: {e}"))?;
        let mut applied = Vec::new();
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let obj: DynamicObject = serde_json::from_value(doc).context("YAML document is not an object")?;
            let (api, name) = self.api_for(client, &obj, namespace).await?;
            let kind = obj.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let out = api
                .patch(&name, &params, &Patch::Apply(&obj))
                .await
                .with_context(|| format!("apply {kind} {name}"))?;
            if kind == "CustomResourceDefinition" {
                self.wait_established(client, &name).await?;
            }
            applied.push(out);
        }
        Ok(applied)
    }

    async fn api_for(
        &self,
        client: &Client,
        obj: &DynamicObject,
        namespace: Option<&str>,
    ) -> Result<(Api<DynamicObject>, String)> {
        let types = obj
            .types
            .as_ref()
            .ok_or_else(|| anyhow!("document without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(types).map_err(|e| anyhow!("{e}"))?;
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("{} without metadata.name", types.kind))?;
        // NB: discovery per document is slow but always current (a CRD applied just before).
        let discovery = Discovery::new(client.clone())
            .filter(&[gvk.group.as_str()])
            .run()
            .await
            .context("API discovery")?;
        let (ar, caps): (ApiResource, ApiCapabilities) = discovery
            .resolve_gvk(&gvk)
            .ok_or_else(|| anyhow!("the server does not serve {gvk:?}"))?;
        let api = if caps.scope == Scope::Namespaced {
            let ns = obj
                .metadata
                .namespace
                .clone()
                .or_else(|| namespace.map(str::to_owned))
                .unwrap_or_else(|| "default".to_owned());
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        Ok((api, name))
    }

    /// Waits until the CRD `name` is `Established` (its resources are served).
    pub async fn wait_established(&self, client: &Client, name: &str) -> Result<()> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let deadline = Instant::now() + Duration::from_mins(1);
        while Instant::now() < deadline {
            let crd = api.get(name).await.with_context(|| format!("get CRD {name}"))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                // Discovery lags Established a little; wait until the group is served.
                let group = crd.spec.group.clone();
                let served = Discovery::new(client.clone())
                    .filter(&[group.as_str()])
                    .run()
                    .await
                    .is_ok_and(|d| d.groups().any(|g| g.name() == group));
                if served {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("CRD {name} not established after 60 s")
    }

    /// Waits until `client` may `verb` `resource` (in API `group`, `""` for the core group) in
    /// `namespace`; `resource` may name a subresource (`flightnodes/status`). A Role or RoleBinding just applied takes effect only when the API server's
    /// RBAC authorizer has seen it through its informers, a moment later: a test that acts as the
    /// restricted user right after granting it would otherwise race that (and get a 403).
    pub async fn wait_allowed(
        &self,
        client: &Client,
        namespace: &str,
        group: &str,
        resource: &str,
        verb: &str,
    ) -> Result<()> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, sub)) => (r, Some(sub.to_owned())),
            None => (resource, None),
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    verb: Some(verb.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        while Instant::now() < deadline {
            let answer = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .with_context(|| format!("access review: {verb} {resource} in {namespace}"))?;
            if answer.status.is_some_and(|s| s.allowed) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("still not allowed to {verb} {resource} in {namespace} after 60 s: is the Role bound?")
    }

    /// The last lines of the API server's and etcd's logs (for failure messages).
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["apiserver.err.log", "etcd.err.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- {f}");
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Kills the API server (SIGKILL) and etcd, and waits for both.
    pub fn stop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
