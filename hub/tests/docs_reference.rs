//! The hub's parts of the reference against the code: `docs/src/reference/cli.md` against the
//! binary's `-h`, `crd.md` against the CRDs `flightnode-hub crd` prints, `metrics.md` against
//! the registry `/metrics` encodes; and the examples in `hub/deploy/examples` against the API
//! types and the checks the controllers make.

use flightnode_hub::api::flightnode::FlightNode;
use flightnode_hub::api::rollout::{self, FirmwareRollout};
use flightnode_hub::metrics::{ConditionLabel, Metrics, RolloutGauges};
use flightnode_tests::reference::{Page, assert_cli_page, assert_same};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[test]
fn cli_reference_matches_the_hubs_help() {
    assert_cli_page(
        &Page::reference("cli"),
        Path::new(env!("CARGO_BIN_EXE_flightnode-hub")),
        "flightnode-hub",
    );
}

/// Every property path under `prefix` of an OpenAPI schema: `spec.firmware.version`, with `[]`
/// for the items of a list (`spec.waves[].count`). A map (`additionalProperties`) is one field.
fn property_paths(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (name, sub) in properties {
        let path = format!("{prefix}.{name}");
        out.insert(path.clone());
        if sub["type"] == "array" {
            property_paths(&sub["items"], &format!("{path}[]"), out);
        } else {
            property_paths(sub, &path, out);
        }
    }
}

#[test]
fn crd_reference_documents_every_field_of_both_crds() {
    let crds: Vec<Value> = serde_saphyr::from_multiple(&flightnode_hub::api::crd_yaml().unwrap()).unwrap();
    let crds: Vec<&Value> = crds.iter().filter(|d| !d.is_null()).collect();
    assert_eq!(crds.len(), 2, "flightnode-hub crd prints two CRDs");
    let page = Page::reference("crd");
    for crd in crds {
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .expect("a CRD names its kind");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut fields = BTreeSet::new();
        for top in ["spec", "status"] {
            property_paths(&schema["properties"][top], top, &mut fields);
        }
        let mut documented = BTreeSet::new();
        for part in ["spec", "status"] {
            let section = page.section(3, &format!("{kind} {part}"));
            for key in section.table_keys() {
                assert!(
                    key.starts_with(&format!("{part}.")),
                    "{} lists `{key}`, which is not under {part}",
                    section.at(&page)
                );
                assert!(
                    documented.insert(key.clone()),
                    "{} lists `{key}` twice",
                    section.at(&page)
                );
            }
        }
        assert_same(
            &format!("{kind} fields"),
            &fields,
            "the CRD (`flightnode-hub crd`)",
            &documented,
            &format!("{} (### {kind} spec/status)", page.path),
        );
    }
}

/// The registry with one series in every family, so each shows its labels.
fn populated_metrics() -> Metrics {
    let m = Metrics::new();
    m.heartbeat("ok").inc();
    m.writes("ok").inc();
    m.write_duration.observe(0.01);
    m.drones
        .get_or_create(&ConditionLabel {
            condition: "Ready".into(),
            status: "True".into(),
        })
        .set(1);
    m.reconcile_done("node", std::time::Duration::from_millis(3));
    m.set_rollouts(&[RolloutGauges {
        rollout: "fw-2".into(),
        drones: [("succeeded", 1)].into_iter().collect(),
        wave: 1,
        halted: false,
        deadline_exceeded: false,
        paused: false,
    }]);
    m.set_fleet(
        &[("1.2.0".to_owned(), 1)].into_iter().collect(),
        &[("Idle".to_owned(), 1)].into_iter().collect(),
    );
    m
}

/// name → (type, label names), from OpenMetrics text: counters as `NAME_total`, histograms by
/// their base name without `le`.
fn exposed(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut base_of = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE NAME KIND");
            let shown = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            base_of.insert(name.to_owned(), shown.clone());
            out.insert(shown, (kind.to_owned(), BTreeSet::new()));
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split([' ', '{']).next().unwrap_or_default();
            let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|s| series.strip_suffix(s).filter(|b| base_of.contains_key(*b)))
                .unwrap_or(series);
            let shown = base_of
                .get(family)
                .unwrap_or_else(|| panic!("series {series} has no # TYPE line"));
            if let Some((labels, _)) = line.split_once('{').and_then(|(_, l)| l.split_once('}')) {
                let names = labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_owned()))
                    .filter(|k| k != "le");
                out.get_mut(shown).expect("typed").1.extend(names);
            }
        }
    }
    out
}

/// The metric names of OpenMetrics text, as [`exposed`] names them.
fn exposed_names(text: &str) -> BTreeSet<String> {
    exposed(text).into_keys().collect()
}

/// A `flightnode-hub serve` process (local store, plain gRPC, ports picked by the kernel),
/// killed when dropped.
struct ServedHub {
    child: std::process::Child,
    http: String,
    _data: tempfile::TempDir,
}

impl ServedHub {
    fn start() -> ServedHub {
        use std::io::BufRead;
        let data = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flightnode-hub"));
        cmd.arg("serve")
            .arg("--insecure")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("FLIGHTNODE_HUB_") {
                cmd.env_remove(var);
            }
        }
        let mut child = cmd.spawn().expect("starting flightnode-hub serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = std::io::BufReader::new(stdout).read_line(&mut line);
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .map(str::to_owned);
        let Some(http) = http.filter(|_| read.is_ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flightnode-hub serve did not print its listening line: {line:?}");
        };
        ServedHub {
            child,
            http,
            _data: data,
        }
    }

    /// The body of `GET path` (HTTP/1.0: no chunked encoding to undo).
    fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.http).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.http).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.contains(" 200 "), "GET {path}: {head}");
        body.to_owned()
    }
}

impl Drop for ServedHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn metrics_reference_documents_every_metric_with_its_type_and_labels() {
    let exposed = exposed(&populated_metrics().encode());
    assert!(
        exposed.contains_key("flightnode_hub_heartbeats_received_total"),
        "the registry's text was not read: {exposed:?}"
    );
    let page = Page::reference("metrics");
    let section = page.section(2, "Hub metrics");
    let rows = section.table_rows();
    let names = |keys: Vec<&String>| keys.into_iter().cloned().collect::<BTreeSet<String>>();
    let documented = names(rows.iter().map(|r| &r[0]).collect());
    assert_same(
        "metrics",
        &names(exposed.keys().collect()),
        "the hub's registry",
        &documented,
        &section.at(&page),
    );
    // And what the served endpoint shows, in case something registers past `Metrics`. A family
    // with labels shows only once it has a series, so a fresh hub shows a subset.
    let scraped = exposed_names(&ServedHub::start().get("/metrics"));
    let undocumented: Vec<&String> = scraped.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "`GET /metrics` of flightnode-hub serve has {undocumented:?}, which {} does not document",
        section.at(&page)
    );
    assert!(
        scraped.contains("flightnode_hub_leader"),
        "the scrape was not read: {scraped:?}"
    );
    for row in &rows {
        let (kind, labels) = &exposed[&row[0]];
        assert_eq!(&row[1], kind, "{}: the type of `{}`", section.at(&page), row[0]);
        let documented: BTreeSet<String> = row[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            &documented,
            labels,
            "{}: the labels of `{}`",
            section.at(&page),
            row[0]
        );
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples")
}

/// Every field of an example must be one its CRD's schema has: serde drops an unknown field
/// silently, and a misspelt one would leave the example meaning less than it says.
fn assert_known(value: &Value, schema: &Value, path: &str, file: &str) {
    match value {
        Value::Object(fields) => {
            for (name, v) in fields {
                let here = format!("{path}.{name}");
                let sub = schema["properties"]
                    .get(name)
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or_else(|| panic!("{file}: `{here}` is not a field of the CRD (misspelt?)"));
                assert_known(v, sub, &here, file);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                assert_known(v, &schema["items"], &format!("{path}[{i}]"), file);
            }
        }
        _ => {}
    }
}

/// The `spec` schema of each kind, from the CRDs `flightnode-hub crd` prints.
fn spec_schemas() -> BTreeMap<String, Value> {
    let crds: Vec<Value> = serde_saphyr::from_multiple(&flightnode_hub::api::crd_yaml().unwrap()).unwrap();
    crds.into_iter()
        .filter(|d| !d.is_null())
        .map(|crd| {
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_owned();
            let spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
            (kind, spec)
        })
        .collect()
}

#[test]
fn examples_hold_a_valid_firmware_rollout_and_a_flightnode_with_spec_firmware() {
    let schemas = spec_schemas();
    let mut rollouts = 0;
    let mut nodes_with_firmware = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let file = format!(
            "hub/deploy/examples/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            assert_eq!(doc["apiVersion"], "edge.drone.io/v1", "{file}");
            match doc["kind"].as_str() {
                Some("FirmwareRollout") => {
                    let r: FirmwareRollout =
                        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                    // The checks the local store makes on `apply -f`, as the CRD's schema does.
                    flightnode_hub::decide::rollout_spec::validate(&r.spec)
                        .unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert_known(&doc["spec"], &schemas["FirmwareRollout"], "spec", &file);
                    rollouts += 1;
                }
                Some("FlightNode") => {
                    let n: FlightNode =
                        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert_known(&doc["spec"], &schemas["FlightNode"], "spec", &file);
                    if let Some(f) = &n.spec.firmware {
                        assert!(
                            f.url.starts_with("https://") || f.url.starts_with("http://"),
                            "{file}: spec.firmware.url {} is not http(s)",
                            f.url
                        );
                        semver::Version::parse(&f.version)
                            .unwrap_or_else(|e| panic!("{file}: spec.firmware.version {}: {e}", f.version));
                        nodes_with_firmware += 1;
                    }
                }
                other => panic!("{file}: unexpected kind {other:?}"),
            }
        }
    }
    assert!(rollouts >= 1, "hub/deploy/examples has no FirmwareRollout");
    assert!(
        nodes_with_firmware >= 1,
        "hub/deploy/examples has no FlightNode with spec.firmware"
    );
}

/// The keys of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn http_reference_documents_every_endpoint_and_every_field_of_the_fleet_json() {
    use flightnode_hub::api::flightnode::new_flightnode;
    use flightnode_hub::cmd::ui;
    let page = Page::reference("http");
    let endpoints = page.section(2, "Endpoints").table_keys();
    let hub = ServedHub::start();
    // Every documented GET without a placeholder answers 200 on a fresh local-store hub.
    for path in endpoints.iter().filter(|p| !p.contains('{')) {
        hub.get(path);
    }
    for path in ["/metrics", "/healthz", "/readyz", "/ui", "/ui/api/fleet"] {
        assert!(
            endpoints.iter().any(|e| e == path),
            "{} does not list {path}",
            page.section(2, "Endpoints").at(&page)
        );
    }
    // The page names only what the hub serves: its script and style are documented paths.
    let html = hub.get("/ui");
    for asset in ["/ui/app.js", "/ui/style.css"] {
        assert!(html.contains(asset), "the page no longer loads {asset}");
    }

    let node = std::sync::Arc::new(new_flightnode("drone-1", "default", "hw"));
    let rollout = FirmwareRollout::new("fleet", rollout::FirmwareRolloutSpec::default());
    let view = serde_json::to_value(ui::view(
        "local",
        true,
        jiff::Timestamp::UNIX_EPOCH,
        &[node],
        &[rollout],
        |_| Vec::new(),
    ))
    .unwrap();
    // The served JSON has the same top-level fields as the one built here.
    let served: Value = serde_json::from_str(&hub.get("/ui/api/fleet")).unwrap();
    assert_eq!(keys(&served), keys(&view), "GET /ui/api/fleet");
    for (section, fields) in [
        ("Top level", keys(&view)),
        ("drones[]", keys(&view["drones"][0])),
        ("rollouts[]", keys(&view["rollouts"][0])),
    ] {
        let s = page.section(3, section);
        let documented: BTreeSet<String> = s.table_keys().into_iter().collect();
        assert_same(
            &format!("fields of {section}"),
            &fields,
            "the hub's FleetView",
            &documented,
            &s.at(&page),
        );
    }
}
