//! `hub/deploy/` as a cluster would take it: every object of the kustomization (plus the optional
//! auto-register RBAC and the examples, a FlightNode with `spec.firmware` and a FirmwareRollout)
//! applied with server-side apply, dry run and strict field validation, against a real
//! kube-apiserver — the guarantee `helm template --validate` gave, for our manifests. Only the CRD
//! and the namespace are created for real: the API server cannot check a FlightNode without its
//! CRD, nor a namespaced object without its namespace.
//!
//! Needs the API server from `FLIGHTNODE_K8S_DIR` (`.ci/run` sets it; see
//! `flightnode_tests::apiserver`); skips with a message without it.

use flightnode_tests::apiserver::ApiServer;
use kube::api::{Api, DynamicObject, Patch, PatchParams, ValidationDirective};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use serde_json::Value;
use std::path::{Path, PathBuf};

const MANAGER: &str = "flightnode-deploy-check";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The YAML documents of one file, skipping empty ones (a leading `---`).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// `kustomize build` for what our kustomization uses: a list of resource files. Anything else
/// (patches, generators, bases) fails here, so this renderer can never silently drop a feature.
fn kustomize_build(dir: &Path) -> Vec<Value> {
    let kustomization = documents(&dir.join("kustomization.yaml"));
    assert_eq!(kustomization.len(), 1);
    let map = kustomization[0]
        .as_object()
        .expect("kustomization.yaml is a mapping");
    for key in map.keys() {
        assert!(
            ["resources", "apiVersion", "kind"].contains(&key.as_str()),
            "kustomization.yaml uses `{key}`: teach this renderer (or use kustomize) before relying on it"
        );
    }
    map["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .flat_map(|r| {
            let file = dir.join(r.as_str().expect("a resource is a file name"));
            assert!(
                file.is_file(),
                "{} is not a file (bases are not supported)",
                file.display()
            );
            documents(&file)
        })
        .collect()
}

fn gvk(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, obj["kind"].as_str().expect("kind"))
}

fn describe(obj: &Value) -> String {
    format!(
        "{} {}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

async fn api_for(client: &kube::Client, obj: &Value) -> Api<DynamicObject> {
    let (resource, caps) = discovery::pinned_kind(client, &gvk(obj))
        .await
        .unwrap_or_else(|e| panic!("the API server does not serve {}: {e}", describe(obj)));
    match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_else(|| panic!("{} is namespaced but names no namespace", describe(obj)));
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    }
}

/// Server-side apply of one object; `dry_run` leaves the cluster unchanged. Strict field
/// validation: an unknown or duplicated field is an error, not a silently dropped line.
async fn apply(client: &kube::Client, obj: &Value, dry_run: bool) -> Result<DynamicObject, kube::Error> {
    let api = api_for(client, obj).await;
    let mut params = PatchParams::apply(MANAGER).validation(ValidationDirective::Strict);
    if dry_run {
        params = params.dry_run();
    }
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    api.patch(name, &params, &Patch::Apply(obj)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_manifests_pass_server_side_dry_run_on_a_real_api_server() {
    let Some(server) = ApiServer::start().await.unwrap() else {
        return;
    };
    let client = server.admin_client().await.unwrap();

    let rendered = kustomize_build(&deploy_dir());
    let kinds: Vec<String> = rendered.iter().map(describe).collect();
    for want in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        // The fleet page's token and access reviews (cluster-scoped resources).
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(
            rendered.iter().any(|o| o["kind"] == want),
            "the kustomization lost its {want}: {kinds:?}"
        );
    }

    // One job per ServiceAccount: only the controllers may change what a drone installs.
    let find = |kind: &str, name: &str| {
        rendered
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}: {kinds:?}"))
    };
    let may_patch_spec = |role: &Value| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "flightnodes")
                && r["verbs"].as_array().unwrap().iter().any(|v| v == "patch")
        })
    };
    assert!(
        !may_patch_spec(find("Role", "flightnode-hub")),
        "the drone-facing Role may patch specs"
    );
    assert!(may_patch_spec(find("Role", "flightnode-controller")));
    for (name, controllers) in [("flightnode-hub", false), ("flightnode-controller", true)] {
        let pod = &find("Deployment", name)["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], name);
        let runs_controllers = pod["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "FLIGHTNODE_HUB_CONTROLLERS" && e["value"] == "true");
        assert_eq!(runs_controllers, controllers, "{name}");
        assert!(
            pod["affinity"]["podAntiAffinity"].is_object(),
            "{name}: its two replicas may land on one node"
        );
        assert_eq!(find("PodDisruptionBudget", name)["spec"]["minAvailable"], 1);
    }
    let service = find("Service", "flightnode-hub");
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        "flightnode-hub"
    );

    // What a namespaced object or a FlightNode cannot be checked without: created for real.
    for obj in rendered
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition" || o["kind"] == "Namespace")
    {
        apply(&client, obj, false)
            .await
            .unwrap_or_else(|e| panic!("creating {}: {e}", describe(obj)));
        if obj["kind"] == "CustomResourceDefinition" {
            let name = obj["metadata"]["name"].as_str().unwrap();
            server.wait_established(&client, name).await.unwrap();
        }
    }

    let mut objects = rendered.clone();
    objects.extend(documents(&deploy_dir().join("rbac-auto-register.yaml")));
    // Every example: the FlightNode with spec.firmware and the FirmwareRollout.
    let mut examples: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("examples"))
        .expect("hub/deploy/examples")
        .map(|e| e.expect("an example").path())
        .collect();
    examples.sort();
    for example in &examples {
        objects.extend(documents(example));
    }
    for kind in ["FlightNode", "FirmwareRollout"] {
        assert!(
            objects.iter().any(|o| o["kind"] == kind),
            "hub/deploy/examples has no {kind}"
        );
    }
    for obj in &objects {
        let back = apply(&client, obj, true)
            .await
            .unwrap_or_else(|e| panic!("the API server rejects {}: {e}", describe(obj)));
        assert_eq!(back.metadata.name.as_deref(), obj["metadata"]["name"].as_str());
    }

    // Dry run means dry: nothing but the prerequisites exists afterwards.
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let api = api_for(&client, deployment).await;
    let name = deployment["metadata"]["name"].as_str().unwrap();
    assert!(
        api.get_opt(name).await.unwrap().is_none(),
        "the dry run created the Deployment"
    );

    // And the check has teeth: a misspelt field and a FlightNode without its required
    // hardwareId are refused, as `kubectl apply` would refuse them.
    let mut typo = deployment.clone();
    let sc = typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        .as_object_mut()
        .unwrap();
    let ro = sc.remove("readOnlyRootFilesystem").unwrap();
    sc.insert("readOnlyRootFileSystem".into(), ro);
    let err = apply(&client, &typo, true)
        .await
        .expect_err("a misspelt field passed");
    assert!(err.to_string().contains("readOnlyRootFileSystem"), "{err}");

    let mut flightnode = documents(&deploy_dir().join("examples/flightnode.yaml")).remove(0);
    flightnode["spec"].as_object_mut().unwrap().remove("hardwareId");
    let err = apply(&client, &flightnode, true)
        .await
        .expect_err("a FlightNode without hardwareId passed");
    assert!(err.to_string().contains("hardwareId"), "{err}");
}
