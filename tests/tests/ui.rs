//! The fleet page (`/ui`) opened in a real browser: Debian's `chromium`, headless, driven over
//! the DevTools protocol (`flightnode_tests::browser`), against the real hub binary on its local
//! store with its controllers and three real agents (`flightnode-agent run`, file slots).
//!
//! drone-1 has a flight controller (the pymavlink stand-in, `flightnode_tests::fc_standin`),
//! in the air on 64 % battery.
//!
//! One page session, never reloaded (a mark set on the document at the start is still there at
//! the end): the page loads; its drones table matches the API (every drone, its version, slot,
//! phase, flight state and battery); given firmware in flight, drone-1 shows why the hub holds
//! the command back, then (a command straight to the drone) its phase changes to `Waiting` with
//! the drone's reason (`in_air`), and its new version and slot appear once it landed;
//! a canary's phase change during a rollout appears; the rollout halting (its canary fails the
//! health check and rolls back, the breaker trips) appears with the breaker's reason and the
//! rollback cause; a rollout whose version is HTML shows it as text; and every request the page
//! made went to the hub; when the hub stops, the page says it is disconnected and keeps the
//! last fleet it showed. Skipped with a message when
//! there is no `chromium`.
//!
//! A second test acts on the local store: a user of the hub's `--ui-tokens` file pauses a rollout
//! through the page's endpoint and the rollout's history names that user; no token, or one not in
//! the file, is 401 and changes nothing.
//!
//! The same page on a real API server, signing in and acting in the browser, is `ui_kube.rs`.
//!
//! `FLIGHTNODE_UI_SCREENSHOTS=DIR` keeps the two screenshots (`fleet-page.png`, drone-1 waiting
//! in the air; `fleet-page-halted.png`, the halted rollout) in DIR: the README's and the book's
//! pictures come from there.

use flightnode_tests::browser::{self, Browser};
use flightnode_tests::fc_standin::{Vehicle, free_udp_port};
use flightnode_tests::fleet::{Fleet, FleetOptions, condition, http_get, http_request, wait_until};
use flightnode_tests::fleet_page::{self, Row};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const GOOD: &str = "1.1.0";
const BAD: &str = "2.0.0";
const WAIT: Duration = Duration::from_mins(3);
/// Phases of an install in flight: any of them in the page is the change from `Idle`.
const ACTIVE: [&str; 6] = [
    "Downloading",
    "Staged",
    "Switching",
    "Testing",
    "RollingBack",
    "Waiting",
];

fn table(b: &mut Browser) -> BTreeMap<String, Row> {
    fleet_page::drones(b).unwrap()
}

/// The rollout `fleet` on the page: `[state, message]`, or null.
fn fleet_rollout(b: &mut Browser) -> Value {
    fleet_page::rollout_state(b, "fleet")
        .ok()
        .flatten()
        .map_or(Value::Null, |(state, message)| {
            serde_json::json!([state, message])
        })
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The same columns from the store's API (`/apis/…/flightnodes`): what the page must show
/// (`–` where the store has nothing).
fn table_from_api(nodes: &[Value]) -> BTreeMap<String, [String; 5]> {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "–".to_owned()
        } else {
            s.to_owned()
        }
    };
    nodes
        .iter()
        .map(|n| {
            let battery = n
                .pointer("/status/flight/batteryPercent")
                .and_then(Value::as_i64)
                .map_or("–".to_owned(), |b| format!("{b} %"));
            (
                text(n, "/metadata/name").to_owned(),
                [
                    or_dash(text(n, "/status/firmware/committedVersion")),
                    or_dash(text(n, "/status/firmware/activeSlot")),
                    or_dash(text(n, "/status/phase")),
                    or_dash(text(n, "/status/observedState")),
                    battery,
                ],
            )
        })
        .collect()
}

/// Sets (or with `null` clears) `spec.firmware` of `name`, as `kubectl patch --type merge`.
fn set_firmware(fleet: &Fleet, name: &str, firmware: &str) {
    http_request(
        fleet.hub.http_port,
        "PATCH",
        &format!("/apis/edge.drone.io/v1/namespaces/default/flightnodes/{name}"),
        "application/merge-patch+json",
        &format!(r#"{{"spec":{{"firmware":{firmware}}}}}"#),
    )
    .unwrap();
}

fn rollout_yaml(url: &str) -> String {
    format!(
        "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: fleet\nspec:\n\
         \x20 version: \"{BAD}\"\n  url: {url}\n\
         \x20 waves:\n    - count: 1\n      soak: 1s\n\
         \x20 failurePolicy:\n    rules:\n      - kind: rolledBack\n        maxCount: 1\n\
         \x20 droneTimeout: 10m\n"
    )
}

#[test]
fn the_fleet_page_shows_the_fleet_live_in_a_real_browser() {
    let Some(chromium) = browser::find() else {
        eprintln!("SKIPPED: no `chromium` on PATH (Debian package chromium; or set FLIGHTNODE_CHROMIUM)");
        return;
    };
    let mavlink_port = free_udp_port().unwrap();
    let mut vehicle = Vehicle::start(mavlink_port, &["--in-air", "--battery", "64"]).unwrap();
    let mut fleet = Fleet::start(FleetOptions {
        drones: 3,
        drone_extra: vec![format!(
            "[flight]\nmavlink = \"udpin:127.0.0.1:{mavlink_port}\"\nstale_after = \"2s\"\n"
        )],
        // The bad build fails its health check after a few seconds: its Testing phase is long
        // enough for the page (polling every second) to show it.
        health: |_| {
            format!(
                r#"if [ "$FLIGHTNODE_VERSION" = "{BAD}" ]; then sleep 3; echo "gps: no 3D fix after 30 s" >&2; exit 1; fi"#
            )
        },
        hub_args: vec![
            "--offline-after".into(),
            "60s".into(),
            "--controllers".into(),
            "--reconcile-interval".into(),
            "1s".into(),
        ],
        ..FleetOptions::default()
    })
    .unwrap();
    let port = fleet.hub.http_port;
    let names: BTreeSet<String> = fleet.drones.iter().map(|d| d.id.clone()).collect();
    let settled = wait_until(WAIT, Duration::from_millis(200), || {
        let nodes = fleet.hub.flightnodes().unwrap_or_default();
        nodes.len() == names.len()
            && nodes.iter().all(|n| {
                text(n, "/status/firmware/committedVersion") == "1.0.0"
                    && condition(n, "Online").is_some_and(|c| c["status"] == "True")
            })
            && nodes.iter().any(|n| {
                text(n, "/status/observedState") == "in-air"
                    && n.pointer("/status/flight/batteryPercent") == Some(&Value::from(64))
            })
    });
    assert!(
        settled,
        "the drones never came online (drone-1 in the air):\n{}",
        fleet.hub.log()
    );

    let html = http_get(port, "/ui").unwrap();
    assert!(html.contains("<title>flightnode fleet</title>"), "{html}");

    let mut b = Browser::start(&chromium, 1180, 600).unwrap();
    let url = format!("http://127.0.0.1:{port}/ui");
    b.open(&url).unwrap();
    b.eval("window.sameDocument = 'not reloaded'").unwrap();
    let loaded = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        table(&mut b).len() == names.len()
            && b.eval("document.getElementById('conn').className")
                .is_ok_and(|c| c == "conn live")
    });
    assert!(loaded, "the page never showed the fleet; chromium:\n{}", b.log());

    // The table matches the API: the same drones, versions, slots, phases, flight states and
    // batteries (all of it steady now: no install runs, drone-1 keeps flying).
    let api_rows = table_from_api(&fleet.hub.flightnodes().unwrap());
    let page = table(&mut b);
    assert_eq!(page.keys().cloned().collect::<BTreeSet<_>>(), names);
    for (name, want) in &api_rows {
        let p = &page[name];
        let shown = [&p.version, &p.slot, &p.phase, &p.flight, &p.battery].map(String::as_str);
        assert_eq!(
            shown,
            want.each_ref().map(String::as_str),
            "drone {name}: the page against the API"
        );
    }
    assert_eq!(page["drone-1"].flight, "in-air");
    // And the page's JSON agrees with the API too.
    let view: Value = serde_json::from_str(&http_get(port, "/ui/api/fleet").unwrap()).unwrap();
    let view_names: BTreeSet<String> = view["drones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(view_names, names);
    assert_eq!(view["readOnly"], true);

    // drone-1 is given firmware in flight: the hub holds the command back, and says why.
    let (_, good) = fleet.bundle("good", GOOD, 4096).unwrap();
    set_firmware(
        &fleet,
        "drone-1",
        &format!(r#"{{"version":"{GOOD}","url":"{good}"}}"#),
    );
    let held = wait_until(WAIT, Duration::from_millis(150), || {
        let row = &table(&mut b)["drone-1"];
        row.phase == "Idle" && row.why.contains("Waiting: flight state in-air")
    });
    assert!(
        held,
        "the hub's wait for drone-1 is not on the page: {:?}\nstore: {:#}",
        table(&mut b),
        fleet.hub.flightnode("drone-1").unwrap_or_default()
    );
    // A person's target would also pin drone-1 against the rollout below: release it.
    set_firmware(&fleet, "drone-1", "null");
    // A command straight to the drone (no hub gate): the drone's own flight gate holds it, and
    // its phase turns Waiting on the page, with the reason.
    fleet.hub_upgrade("drone-1", &["--url", &good]).unwrap();
    let waiting = wait_until(WAIT, Duration::from_millis(150), || {
        let row = &table(&mut b)["drone-1"];
        row.phase == "Waiting" && row.why.contains("waits: in_air")
    });
    assert!(
        waiting,
        "drone-1 never showed Waiting (in_air) on the page: {:?}\nstore: {:#}",
        table(&mut b),
        fleet.hub.flightnode("drone-1").unwrap_or_default()
    );
    let shots =
        std::env::var_os("FLIGHTNODE_UI_SCREENSHOTS").map_or_else(|| fleet.dir.path().to_owned(), Into::into);
    b.screenshot(&shots.join("fleet-page.png")).unwrap();
    // It lands: the install runs, and its new version and slot appear.
    vehicle.send("land").unwrap();
    vehicle.send("disarm").unwrap();
    let installed = wait_until(WAIT, Duration::from_millis(150), || {
        let row = &table(&mut b)["drone-1"];
        row.version == GOOD && row.slot == "b" && row.phase == "Idle" && row.flight == "disarmed"
    });
    assert!(
        installed,
        "drone-1's install never showed on the page: {:?}\nstore: {:#}",
        table(&mut b),
        fleet.hub.flightnode("drone-1").unwrap_or_default()
    );

    // A rollout of a build that fails its health check: the canary's phase changes on the page.
    let (_, bundle) = fleet.bundle("bad", BAD, 4096).unwrap();
    fleet.hub.apply(&rollout_yaml(&bundle)).unwrap();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let changed = wait_until(WAIT, Duration::from_millis(150), || {
        for (name, row) in table(&mut b) {
            seen.entry(name).or_default().insert(row.phase);
        }
        seen.values()
            .any(|phases| ACTIVE.iter().any(|a| phases.contains(*a)))
    });
    assert!(
        changed,
        "no drone's phase changed on the page; phases seen: {seen:?}\nhub log:\n{}",
        fleet.hub.log()
    );

    // The breaker trips: the page shows the halt with the store's reason and message.
    let mut last = Value::Null;
    let halted = wait_until(WAIT, Duration::from_millis(200), || {
        let Some(r) = fleet.hub.rollout("fleet") else {
            return false;
        };
        let store_halted = r["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted" && c["status"] == "True"))
            .cloned();
        last = fleet_rollout(&mut b);
        store_halted.is_some_and(|c| {
            last[0].as_str() == Some(&format!("Halted: {}", c["reason"].as_str().unwrap_or("?")))
                && last[1] == c["message"]
        })
    });
    assert!(
        halted,
        "the page never showed the halt; page: {last}, store: {:#}\nhub log:\n{}",
        fleet.hub.rollout("fleet").unwrap_or_default(),
        fleet.hub.log()
    );
    // The canary's rollback and its cause, on the page as in the store.
    let rolled_back = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        fleet.hub.flightnodes().unwrap_or_default().iter().any(|n| {
            let name = text(n, "/metadata/name");
            let code = text(n, "/status/lastUpgrade/errorCode");
            text(n, "/status/lastUpgrade/result") == "RolledBack"
                && table(&mut b).get(name).is_some_and(|row| {
                    row.phase == "Idle" && row.why.contains(&format!("RolledBack {BAD}: {code}"))
                })
        })
    });
    assert!(
        rolled_back,
        "the canary's rollback is not on the page: {:?}",
        table(&mut b)
    );
    let events = b
        .eval("[...document.querySelectorAll('#rollouts .events .r')].map(e => e.textContent)")
        .unwrap();
    assert!(
        events.as_array().unwrap().iter().any(|e| e == "Halted"),
        "the Halted event is not on the page: {events}"
    );
    b.screenshot(&shots.join("fleet-page-halted.png")).unwrap();

    // Data is text on the page, never markup: a rollout whose version is an HTML element with a
    // script shows it literally (paused, so it dispatches nothing).
    let markup = r#"<img src=x onerror="document.body.dataset.pwned=1">"#;
    fleet
        .hub
        .apply(&format!(
            "apiVersion: edge.drone.io/v1\nkind: FirmwareRollout\nmetadata:\n  name: markup\nspec:\n\
             \x20 version: '{markup}'\n  url: {bundle}\n  paused: true\n"
        ))
        .unwrap();
    let literal = wait_until(Duration::from_secs(30), Duration::from_millis(150), || {
        b.eval(
            "document.querySelector('#rollouts .rollout[data-name=markup] [data-col=version]')?.textContent",
        )
        .is_ok_and(|t| t.as_str() == Some(&format!("version {markup}")))
    });
    assert!(literal, "the markup rollout's version is not shown as text");
    assert_eq!(b.eval("document.querySelectorAll('img').length").unwrap(), 0);
    assert_eq!(b.eval("document.body.dataset.pwned ?? 'no'").unwrap(), "no");

    // All of it in one document, and every request went to the hub.
    assert_eq!(b.eval("window.sameDocument").unwrap(), "not reloaded");
    let origin = format!("http://127.0.0.1:{port}/");
    let urls = b.requested_urls();
    assert!(urls.iter().any(|u| u.ends_with("/ui/api/fleet")), "{urls:?}");
    for u in &urls {
        assert!(u.starts_with(&origin), "the page requested {u}, outside the hub");
    }
    let png = std::fs::read(shots.join("fleet-page-halted.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is no PNG");
    // The hub goes away: the page says so and keeps what it showed.
    fleet.hub.stop();
    let down = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        b.eval("document.getElementById('conn').className")
            .is_ok_and(|c| c == "conn down")
    });
    assert!(down, "the page never showed the hub disconnected");
    assert_eq!(
        table(&mut b).len(),
        names.len(),
        "the last fleet stays on the page"
    );
}

/// A POST with `Authorization: Bearer TOKEN` (none when empty): the status and the body.
fn post_as(port: u16, path: &str, token: &str) -> (String, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("0").to_owned();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// On the local store the page acts for the users of `--ui-tokens`: a pause with a token from
/// the file is carried out and the rollout's history names that file's user; a token not in the
/// file, or none, is 401 and changes nothing.
#[test]
fn on_the_local_store_a_token_file_user_acts_and_is_named_in_the_history() {
    let tokens = tempfile::tempdir().unwrap();
    let file = tokens.path().join("ui-tokens.csv");
    std::fs::write(&file, "# token,user\nops-secret-1,alice\n").unwrap();
    let fleet = Fleet::start(FleetOptions {
        drones: 0,
        hub_args: vec![
            "--controllers".into(),
            "--reconcile-interval".into(),
            "1s".into(),
            "--ui-tokens".into(),
            file.display().to_string(),
        ],
        ..FleetOptions::default()
    })
    .unwrap();
    let port = fleet.hub.http_port;
    let rollout_path = "/apis/edge.drone.io/v1/namespaces/default/firmwarerollouts/fleet";
    http_request(
        port,
        "PUT",
        rollout_path,
        "application/json",
        r#"{"apiVersion":"edge.drone.io/v1","kind":"FirmwareRollout","metadata":{"name":"fleet"},
            "spec":{"version":"2.0.0","url":"http://127.0.0.1:9/none.fnb"}}"#,
    )
    .unwrap();
    let get = || -> Value { serde_json::from_str(&http_get(port, rollout_path).unwrap()).unwrap() };
    let view: Value = serde_json::from_str(&http_get(port, "/ui/api/fleet").unwrap()).unwrap();
    assert_eq!(
        view["readOnly"], false,
        "a hub with --ui-tokens offers the sign-in"
    );
    assert_eq!(view["rollouts"][0]["namespace"], "default", "{view:#}");

    // The controller saw the rollout as created, so the pause is an edit of its own.
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            get()["status"]["observedGeneration"] == 1
        }),
        "the controller never observed the rollout:\n{}",
        fleet.hub.log()
    );
    let pause = "/ui/api/rollouts/default/fleet/pause";
    for token in ["", "not-in-the-file"] {
        let (status, body) = post_as(port, pause, token);
        assert_eq!(status, "401", "token {token:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("--ui-tokens") || e.contains("not signed in")),
            "{body}"
        );
    }
    assert_ne!(get()["spec"]["paused"], true, "a refused POST paused the rollout");
    let (status, body) = post_as(port, "/ui/api/rollouts/default/fleet/delete", "ops-secret-1");
    assert_eq!(status, "404", "{body}");

    let (status, body) = post_as(port, pause, "ops-secret-1");
    assert_eq!(status, "200", "{body}\nhub log:\n{}", fleet.hub.log());
    assert_eq!(body["user"], "alice");
    assert_eq!(body["message"], "firmwarerollout.edge.drone.io/fleet paused");
    assert_eq!(get()["spec"]["paused"], true);
    let mut last = Value::Null;
    let named = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        last = get();
        last["status"]["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["action"] == "Paused" && e["by"] == "alice"))
    });
    assert!(named, "the history does not name alice's pause: {last:#}");
    // Again: nothing to change, said so.
    let (status, body) = post_as(port, pause, "ops-secret-1");
    assert_eq!(
        (status.as_str(), body["result"].as_str()),
        ("200", Some("unchanged")),
        "{body}"
    );
}
