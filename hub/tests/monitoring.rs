//! `hub/deploy/monitoring` against the real tools: the alerting rules pass `promtool check
//! rules` and the unit tests of `promtool-tests.yml`, and the PrometheusRule holds the same
//! groups as the plain rules file; then a real Prometheus scrapes a real `flightnode-hub serve`
//! (local store, controllers, a FirmwareRollout, drones heartbeating over gRPC, one gone
//! silent, invalid heartbeats) with the rules loaded, and every query of the Grafana dashboard
//! and every alert expression runs on it:
//!
//! - every dashboard query is valid and returns data, and so does every series selector in it
//!   (so a misspelt metric or label fails even inside `… or vector(0)`);
//! - every alert expression is valid, its metrics exist with the labels it matches on, and
//!   Prometheus evaluates every rule without error;
//! - two alerts the hub's state calls for (invalid heartbeats, a rollout past its progress
//!   deadline) become pending on Prometheus, with the hub's own labels.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool`); skips with a `SKIPPED`
//! message without it.

use flightnode_tests::fleet::{Hub, Proc, free_port, http_get, http_request};
use flightnode_tests::poll::wait_until;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The job name Prometheus scrapes the hub as, and what the dashboard's `$job` stands for.
const JOB: &str = "flightnode-hub";

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring")
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Both Prometheus tools, or `None` after printing why the test is skipped.
fn tools() -> Option<(PathBuf, PathBuf)> {
    if let (Some(p), Some(t)) = (on_path("prometheus"), on_path("promtool")) {
        Some((p, t))
    } else {
        eprintln!(
            "SKIPPED: prometheus and promtool are not both on PATH (Debian package `prometheus`; test.sh installs it)"
        );
        None
    }
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// `promtool ARGS` in `dir`; panics with its output when it fails.
fn promtool(tool: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running promtool {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every rule of a `groups:` list.
fn rules(groups: &Value) -> Vec<&Value> {
    groups
        .as_array()
        .expect("groups is a list")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("a group has rules"))
        .collect()
}

/// The anchors mdBook gives the headings of a page: lower case, spaces to `-`, other
/// punctuation dropped.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn rules_pass_promtool_and_the_prometheusrule_holds_the_same_groups() {
    let Some((_, tool)) = tools() else {
        return;
    };
    let dir = monitoring_dir();
    let plain = yaml(&dir.join("flightnode.rules.yml"));
    let crd = yaml(&dir.join("prometheusrule.yaml"));
    assert_eq!(crd["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(crd["kind"], "PrometheusRule");
    let (in_crd, in_plain) = (rules(&crd["spec"]["groups"]), rules(&plain["groups"]));
    assert_eq!(
        in_crd.len(),
        in_plain.len(),
        "the two rule files hold different numbers of rules"
    );
    for (a, b) in in_crd.iter().zip(&in_plain) {
        assert_eq!(
            a, b,
            "prometheusrule.yaml and flightnode.rules.yml differ at {}: edit both",
            b["alert"]
        );
    }
    assert_eq!(
        crd["spec"]["groups"], plain["groups"],
        "prometheusrule.yaml's groups differ from flightnode.rules.yml's (names, order): edit both"
    );

    let checked = promtool(&tool, &dir, &["check", "rules", "flightnode.rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    // promtool reads rule files only: the PrometheusRule's groups, written out as one.
    let tmp = tempfile::tempdir().unwrap();
    let groups_only = tmp.path().join("prometheusrule-groups.json");
    std::fs::write(
        &groups_only,
        serde_json::to_string(&serde_json::json!({ "groups": crd["spec"]["groups"] })).unwrap(),
    )
    .unwrap();
    promtool(
        &tool,
        &dir,
        &["check", "rules", &groups_only.display().to_string()],
    );

    let tested = promtool(&tool, &dir, &["test", "rules", "promtool-tests.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert: a `for`, a severity, the three annotations, a runbook that points at its
    // section of the alerts page; and unit tests where it fires and where it does not.
    let alerts_page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/operator/alerts.md");
    let anchors = heading_anchors(&std::fs::read_to_string(&alerts_page).unwrap());
    let unit = yaml(&dir.join("promtool-tests.yml"));
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in unit["tests"].as_array().expect("tests") {
        for t in case["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = t["alertname"].as_str().expect("alertname").to_owned();
            if t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fired.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let all = rules(&plain["groups"]);
    let alerts: Vec<&&Value> = all.iter().filter(|r| r["alert"].is_string()).collect();
    assert!(alerts.len() >= 6, "only {} alerts", alerts.len());
    for rule in alerts {
        let name = rule["alert"].as_str().unwrap();
        assert!(rule["for"].is_string(), "{name}: no `for`");
        assert!(
            ["critical", "warning", "info"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity must be critical, warning or info"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name}: no `{key}` annotation"
            );
        }
        let runbook = rule["annotations"]["runbook"].as_str().unwrap();
        let Some((_, anchor)) = runbook.split_once("alerts.md#") else {
            panic!("{name}: the runbook names no section of alerts.md: {runbook}");
        };
        let anchor = anchor.trim_end_matches(['.', ')']).to_owned();
        assert_eq!(
            anchor,
            name.to_lowercase(),
            "{name}: the runbook points at another alert"
        );
        assert!(
            anchors.contains(&anchor),
            "{name}: docs/src/operator/alerts.md has no heading for #{anchor}"
        );
        assert!(fired.contains(name), "promtool-tests.yml never fires {name}");
        assert!(
            quiet.contains(name),
            "promtool-tests.yml never checks that {name} stays quiet"
        );
    }
}

#[test]
fn podmonitor_scrapes_the_http_port_of_both_deployments() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let text = std::fs::read_to_string(deploy.join("deployment.yaml")).unwrap();
    let deployments: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let pods: Vec<&Value> = deployments
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| &d["spec"]["template"])
        .collect();
    assert_eq!(pods.len(), 2, "deployment.yaml: the hub and the controllers");
    let monitor = yaml(&monitoring_dir().join("podmonitor.yaml"));
    assert_eq!(monitor["kind"], "PodMonitor");
    let [expression] = monitor["spec"]["selector"]["matchExpressions"]
        .as_array()
        .expect("matchExpressions")
        .as_slice()
    else {
        panic!("podmonitor.yaml: one matchExpression expected");
    };
    assert_eq!(expression["operator"], "In");
    let key = expression["key"].as_str().unwrap();
    let values: Vec<&Value> = expression["values"].as_array().unwrap().iter().collect();
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    for pod in pods {
        let label = &pod["metadata"]["labels"][key];
        assert!(
            values.contains(&label),
            "the PodMonitor does not select pods labelled {key}={label}"
        );
        let ports = pod["spec"]["containers"][0]["ports"].as_array().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p["name"] == port && p["containerPort"] == 8080),
            "pods labelled {key}={label} have no port `{port}` on 8080"
        );
    }
}

/// `application/x-www-form-urlencoded` of one value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus on loopback, scraping one target every second, with `rules` loaded.
struct Prometheus {
    port: u16,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: &str, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display()
            ),
        )
        .unwrap();
        let port = free_port().unwrap();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::spawn(cmd, &dir.path().join("prometheus.log")).unwrap();
        let p = Prometheus {
            port,
            proc,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_mins(1), Duration::from_millis(200), || {
                http_get(port, "/-/ready").is_ok()
            }),
            "Prometheus did not become ready:\n{}",
            p.proc.log()
        );
        p
    }

    /// The `data` of an API call; panics unless its status is `success`.
    fn api(&self, path: &str) -> Value {
        let body = http_get(self.port, path).unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {v}");
        v["data"].clone()
    }

    /// The result of an instant query; panics when Prometheus refuses it.
    fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let body = http_get(self.port, &path).unwrap_or_else(|_| {
            // A 400 is an invalid query: ask again for Prometheus' own words.
            let why = http_request(self.port, "GET", &path, "text/plain", "").err();
            panic!("query `{promql}` refused: {why:?}")
        });
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "query `{promql}`: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Heartbeats of `drones` drones every second over gRPC until `stop`; drone 0 only once (it
/// goes offline), and one heartbeat with an invalid device id each round.
fn heartbeat_loop(
    addr: std::net::SocketAddr,
    drones: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut clients = flightnode_tests::load::pool(addr, 1).await.unwrap();
            let client = &mut clients[0];
            let mut seq = 1u64;
            while !stop.load(Ordering::SeqCst) {
                for i in 0..drones {
                    if i == 0 && seq > 1 {
                        continue;
                    }
                    let version = if i % 2 == 0 { "1.0.0" } else { "1.1.0" };
                    let hb = flightnode_tests::load::idle_heartbeat(i, version, seq);
                    let _ = client.heartbeat(hb).await;
                }
                let mut bad = flightnode_tests::load::idle_heartbeat(0, "1.0.0", seq);
                bad.device_id = "not a device id/".into();
                let _ = client.heartbeat(bad).await;
                seq += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    })
}

/// Every `flightnode_hub_…` selector of a PromQL expression: the metric name and its
/// `{…}` matchers, if any.
fn selectors(promql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = promql;
    while let Some(at) = rest.find("flightnode_hub_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut end = name_len;
        if tail[name_len..].starts_with('{') {
            end = name_len + tail[name_len..].find('}').expect("a closed matcher") + 1;
        }
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The label names a selector matches on.
fn matcher_labels(selector: &str) -> Vec<String> {
    let Some((_, inner)) = selector.split_once('{') else {
        return Vec::new();
    };
    inner
        .trim_end_matches('}')
        .split(',')
        .filter_map(|m| {
            let m = m.trim();
            let end = m.find(['=', '!'])?;
            Some(m[..end].trim().to_owned())
        })
        .collect()
}

/// The dashboard's template variables as one test stands for them: every `$job` is the hub's
/// job; Grafana's rate interval is a minute.
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("${job}", JOB)
        .replace("$job", JOB)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m");
    assert!(
        !out.contains('$'),
        "`{expr}` uses a template variable this test does not know (or the dashboard does not define)"
    );
    out
}

/// Every `expr` of the dashboard's panels (also panels nested in rows), with its panel title.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "panel {title}: its datasource is not the ${{datasource}} variable"
                );
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel {title}: a query's datasource is not the ${{datasource}} variable"
                );
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title}: a query without expr"));
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[test]
fn every_dashboard_query_and_alert_expression_runs_on_a_real_prometheus_scraping_a_hub() {
    let Some((prometheus_bin, _)) = tools() else {
        return;
    };
    let dir = monitoring_dir();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .expect("grafana-dashboard.json is JSON");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard has no Prometheus `datasource` variable"
    );
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "only {} dashboard queries", queries.len());

    // The hub: local store, controllers, an embedded broker nobody listens on (the drones here
    // are heartbeats only), a short grace so the silent drone turns offline within the test.
    let tmp = tempfile::tempdir().unwrap();
    let mqtt = free_port().unwrap();
    let mut hub = Hub::new(
        tmp.path(),
        vec![
            "--controllers".into(),
            "--reconcile-interval".into(),
            "300ms".into(),
            "--offline-after".into(),
            "2s".into(),
            "--embedded-broker".into(),
            format!("127.0.0.1:{mqtt}"),
            "--mqtt-url".into(),
            format!("mqtt://127.0.0.1:{mqtt}"),
        ],
    )
    .unwrap();
    hub.start().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", hub.grpc_port).parse().unwrap();
    let sender = heartbeat_loop(grpc, 6, Arc::clone(&stop));
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            hub.flightnodes().is_ok_and(|n| n.len() >= 6)
        }),
        "the drones' FlightNodes did not appear:\n{}",
        hub.log()
    );
    // Drones that never answer: the canary is dispatched and then nothing moves, so the
    // rollout runs past its progress deadline.
    hub.apply(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fw-2\nspec:\n\
         \x20 version: \"2.0.0\"\n  url: http://fw.example/2.0.0.fnb\n\
         \x20 waves:\n    - count: 2\n      soak: 1s\n  progressDeadline: 2s\n",
    )
    .unwrap();

    let rules_file = dir.join("flightnode.rules.yml");
    let prometheus = Prometheus::start(
        &prometheus_bin,
        &format!("127.0.0.1:{}", hub.http_port),
        &rules_file,
    );
    // Scraped, with the rollout and the offline drone in, and a few seconds of samples for
    // every `rate(…[1m])`.
    let scraped = wait_until(Duration::from_mins(1), Duration::from_millis(500), || {
        let up = prometheus.query(&format!("up{{job=\"{JOB}\"}} == 1"));
        let rollout = prometheus.query("flightnode_hub_rollout_progress_deadline_exceeded == 1");
        let offline = prometheus.query(r#"flightnode_hub_drones{condition="Online",status="False"}"#);
        let samples = prometheus.query(&format!("count_over_time(up{{job=\"{JOB}\"}}[1m]) >= 5"));
        !up.is_empty() && !rollout.is_empty() && !offline.is_empty() && !samples.is_empty()
    });
    assert!(
        scraped,
        "Prometheus did not scrape the hub with a stuck rollout and an offline drone;\n\
         targets: {}\nhub /metrics:\n{}\nhub log:\n{}",
        prometheus.api("/api/v1/targets"),
        http_get(hub.http_port, "/metrics").unwrap_or_default(),
        hub.log()
    );

    // The fleet gauges count what the drones report: three drones on each version, all idle.
    let by = |promql: &str, label: &str| -> BTreeMap<String, String> {
        prometheus
            .query(promql)
            .iter()
            .map(|s| {
                (
                    s["metric"][label].as_str().unwrap_or("?").to_owned(),
                    s["value"][1].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        by("flightnode_hub_drones_by_version", "version"),
        BTreeMap::from([("1.0.0".into(), "3".into()), ("1.1.0".into(), "3".into())])
    );
    assert_eq!(
        by("flightnode_hub_drones_by_phase", "phase"),
        BTreeMap::from([("Idle".into(), "6".into())])
    );

    // The dashboard: every query and every selector in it returns data.
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let promql = substitute(expr);
        if prometheus.query(&promql).is_empty() {
            empty.push(format!("{title}: {promql}"));
        }
        for selector in selectors(&promql) {
            if prometheus.query(&format!("group({selector})")).is_empty() {
                empty.push(format!("{title}: selector {selector} (in {promql})"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data on a Prometheus scraping a live hub (misspelt metric or label?):\n{}",
        empty.join("\n")
    );
    // The check has teeth: a misspelt metric empties a plain query, and one behind
    // `or vector(0)` is caught by its selector.
    let (_, plain_query) = queries
        .iter()
        .find(|(_, q)| !q.contains("vector("))
        .expect("a query without a fallback");
    let misspelt = substitute(plain_query).replace("flightnode_hub_", "flightnode_hbu_");
    assert!(prometheus.query(&misspelt).is_empty(), "{misspelt} returned data");
    let (_, fallback) = queries
        .iter()
        .find(|(_, q)| q.contains("or vector(0)"))
        .expect("a query with a fallback");
    let misspelt = substitute(fallback).replacen("flightnode_hub_", "flightnode_hub_x", 1);
    assert!(
        !prometheus.query(&misspelt).is_empty(),
        "{misspelt}: the fallback should hide it"
    );
    let bad = selectors(&misspelt).remove(0);
    assert!(
        prometheus.query(&format!("group({bad})")).is_empty(),
        "{bad} returned data"
    );

    // The alert expressions: valid, and the metrics they read exist with the labels they match.
    let plain = yaml(&rules_file);
    let mut series_labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in rules(&plain["groups"]) {
        let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or("?");
        let expr = rule["expr"].as_str().expect("expr");
        prometheus.query(expr);
        for selector in selectors(expr) {
            let metric = selector.split('{').next().unwrap().to_owned();
            let labels = series_labels.entry(metric.clone()).or_insert_with(|| {
                let found = prometheus.query(&metric);
                assert!(!found.is_empty(), "{name}: no series of {metric} on a live hub");
                found
                    .iter()
                    .flat_map(|s| s["metric"].as_object().unwrap().keys().cloned())
                    .collect()
            });
            for label in matcher_labels(&selector) {
                assert!(
                    labels.contains(&label),
                    "{name}: {metric} has no label `{label}` (it has {labels:?})"
                );
            }
        }
    }

    // Prometheus itself evaluated every rule without error, and what the hub's state calls for
    // is pending (every `for` is longer than this test).
    let mut evaluated = false;
    let mut pending = BTreeSet::new();
    let healthy = wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let groups = prometheus.api("/api/v1/rules");
        let all: Vec<Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        evaluated = !all.is_empty()
            && all.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        pending = all
            .iter()
            .flat_map(|r| r["alerts"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["labels"]["job"] == JOB)
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
            .collect();
        evaluated
            && pending.contains("FlightNodeHeartbeatsRejected")
            && pending.contains("FlightNodeRolloutProgressDeadlineExceeded")
    });
    let groups = prometheus.api("/api/v1/rules");
    for group in groups["groups"].as_array().into_iter().flatten() {
        for r in group["rules"].as_array().into_iter().flatten() {
            assert_eq!(
                r["health"], "ok",
                "Prometheus could not evaluate {}: {}",
                r["name"], r["lastError"]
            );
        }
    }
    assert_eq!(
        rules(&plain["groups"]).len(),
        groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum::<usize>(),
        "Prometheus did not load every rule"
    );
    assert!(
        healthy,
        "evaluated: {evaluated}; pending alerts: {pending:?}; want FlightNodeHeartbeatsRejected and \
         FlightNodeRolloutProgressDeadlineExceeded"
    );
    assert!(
        !pending.contains("FlightNodeRolloutHalted") && !pending.contains("FlightNodeNoLeader"),
        "alerts pending that the hub's state does not call for: {pending:?}"
    );

    stop.store(true, Ordering::SeqCst);
    let _ = sender.join();
}
