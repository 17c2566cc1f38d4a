//! The real-API-server launcher: it starts, the admin token has every right, the restricted one
//! none until a Role grants them, and manifests apply.

use flightnode_tests::apiserver::ApiServer;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_starts_a_server_with_rbac() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(api) = ApiServer::start().await? else {
        return Ok(());
    };
    let admin = api.admin_client().await?;
    api.apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c1}\ndata: {k: v}\n",
        Some("fleet"),
    )
    .await?;
    let restricted = api.restricted_client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(restricted.clone(), "fleet");
    let denied = cms.get("c1").await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the restricted token must have no rights before a Role: {denied:?}"
    );
    api.apply_yaml(
        &admin,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: read-cm}\n\
         rules: [{apiGroups: [\"\"], resources: [configmaps], verbs: [get]}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: read-cm}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-cm}\n\
         subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: flight-controller}]\n",
        Some("fleet"),
    )
    .await?;
    api.wait_allowed(&restricted, "fleet", "", "configmaps", "get")
        .await?;
    let cm = cms.get("c1").await?;
    assert_eq!(
        cm.data.unwrap_or_default().get("k").map(String::as_str),
        Some("v")
    );
    Ok(())
}
