//! The fleet page (`/ui`) opened in a real browser: Debian's `chromium`, headless, driven over
//! the DevTools protocol (`flightnode_tests::browser`), against the real hub binary on its local
//! store with its controllers and three real agents (`flightnode-agent run`, file slots).
//!
//! One page session, never reloaded (a mark set on the document at the start is still there at
//! the end): the page loads; its drones table matches the API (every drone, its version, slot
//! and phase); a canary's phase change during a rollout appears; the rollout halting (its canary
//! fails the health check and rolls back, the breaker trips) appears with the breaker's reason;
//! and every request the page made went to the hub. Skipped with a message when there is no
//! `chromium`.
//!
//! `FLIGHTNODE_UI_SCREENSHOTS=DIR` keeps the two screenshots (`fleet-page.png`, the fleet at
//! rest; `fleet-page-halted.png`, the halted rollout) in DIR: the README's and the book's
//! pictures come from there.

use flightnode_tests::browser::{self, Browser};
use flightnode_tests::fleet::{Fleet, FleetOptions, condition, http_get, wait_until};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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

/// The drones table as the page shows it: name → (version, slot, phase, why).
const TABLE_JS: &str = r"
  [...document.querySelectorAll('#drones tbody tr')].map(tr => {
    const cell = c => tr.querySelector('[data-col=' + c + ']').textContent;
    return [tr.dataset.name, cell('version'), cell('slot'), cell('phase'), cell('why')];
  })";

/// The rollout `fleet` as the page shows it: (state, message), or null.
const ROLLOUT_JS: &str = r"
  (() => {
    const card = document.querySelector('#rollouts .rollout[data-name=fleet]');
    if (!card) return null;
    const m = card.querySelector('[data-col=message]');
    return [card.querySelector('[data-col=state]').textContent, m ? m.textContent : ''];
  })()";

type Row = (String, String, String, String);

fn table(b: &mut Browser) -> BTreeMap<String, Row> {
    let rows = b.eval(TABLE_JS).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or("").to_owned();
            (s(0), (s(1), s(2), s(3), s(4)))
        })
        .collect()
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The same table from the store's API (`/apis/…/flightnodes`): what the page must show.
fn table_from_api(nodes: &[Value]) -> BTreeMap<String, (String, String, String)> {
    nodes
        .iter()
        .map(|n| {
            (
                text(n, "/metadata/name").to_owned(),
                (
                    text(n, "/status/firmware/committedVersion").to_owned(),
                    text(n, "/status/firmware/activeSlot").to_owned(),
                    text(n, "/status/phase").to_owned(),
                ),
            )
        })
        .collect()
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
    let fleet = Fleet::start(FleetOptions {
        drones: 3,
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
    });
    assert!(settled, "the drones never came online:\n{}", fleet.hub.log());

    // The page is served with its policy, and names nothing outside the hub.
    let html = http_get(port, "/ui").unwrap();
    assert!(html.contains("<title>flightnode fleet</title>"), "{html}");

    let mut b = Browser::start(&chromium, 1180, 640).unwrap();
    let url = format!("http://127.0.0.1:{port}/ui");
    b.open(&url).unwrap();
    b.eval("window.sameDocument = 'not reloaded'").unwrap();
    let loaded = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        table(&mut b).len() == names.len()
            && b.eval("document.getElementById('conn').className")
                .is_ok_and(|c| c == "conn live")
    });
    assert!(loaded, "the page never showed the fleet; chromium:\n{}", b.log());

    // The table matches the API: the same drones, versions, slots and phases.
    let api_rows = table_from_api(&fleet.hub.flightnodes().unwrap());
    let page = table(&mut b);
    assert_eq!(page.keys().cloned().collect::<BTreeSet<_>>(), names);
    for (name, (version, slot, phase)) in &api_rows {
        let (p_version, p_slot, p_phase, _) = &page[name];
        assert_eq!(
            (p_version, p_slot, p_phase),
            (version, slot, phase),
            "drone {name}: the page against the API"
        );
    }
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
    let shots =
        std::env::var_os("FLIGHTNODE_UI_SCREENSHOTS").map_or_else(|| fleet.dir.path().to_owned(), Into::into);
    b.screenshot(&shots.join("fleet-page.png")).unwrap();

    // A rollout of a build that fails its health check: the canary's phase changes on the page.
    let (_, bundle) = fleet.bundle("bad", BAD, 4096).unwrap();
    fleet.hub.apply(&rollout_yaml(&bundle)).unwrap();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let changed = wait_until(WAIT, Duration::from_millis(150), || {
        for (name, (_, _, phase, _)) in table(&mut b) {
            seen.entry(name).or_default().insert(phase);
        }
        seen.values()
            .any(|phases| ACTIVE.iter().any(|a| phases.contains(*a)))
    });
    assert!(
        changed,
        "no drone's phase changed on the page; phases seen: {seen:?}\nhub log:\n{}",
        fleet.hub.log()
    );

    // The breaker trips: the page shows the halt with the store's reason.
    let mut last = Value::Null;
    let halted = wait_until(WAIT, Duration::from_millis(200), || {
        let Some(r) = fleet.hub.rollout("fleet") else {
            return false;
        };
        let store_halted = r["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Halted" && c["status"] == "True"))
            .cloned();
        last = b.eval(ROLLOUT_JS).unwrap_or(Value::Null);
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
    // The canary's rollback and why, in the page and the store alike.
    let rolled_back = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        table(&mut b).values().any(|(version, _, phase, why)| {
            version == "1.0.0" && phase == "Idle" && why.contains("RolledBack")
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
}
