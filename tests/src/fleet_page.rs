//! The hub's fleet page (`/ui`) as a person sees it, read from a [`Browser`] through the
//! `data-col` marks the page puts on its cells.

use crate::browser::Browser;
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The drones table: `[name, version, slot, phase, why, flight, battery]` per row.
const DRONES_JS: &str = r"
  [...document.querySelectorAll('#drones tbody tr')].map(tr => {
    const cell = c => tr.querySelector('[data-col=' + c + ']').textContent;
    return [tr.dataset.name, cell('version'), cell('slot'), cell('phase'), cell('why'),
            cell('flight'), cell('battery')];
  })";

/// One row of the drones table, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Committed version (without the `→ wanted` line under it).
    pub version: String,
    /// Active slot.
    pub slot: String,
    /// Phase.
    pub phase: String,
    /// The Why column.
    pub why: String,
    /// Flight state.
    pub flight: String,
    /// Battery, like `64 %`.
    pub battery: String,
}

/// The drones table by drone name.
pub fn drones(b: &mut Browser) -> Result<BTreeMap<String, Row>> {
    let rows = b.eval(DRONES_JS)?;
    let rows = rows
        .as_array()
        .context("the drones table did not read as a list")?;
    Ok(rows
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or("").to_owned();
            let row = Row {
                version: s(1),
                slot: s(2),
                phase: s(3),
                why: s(4),
                flight: s(5),
                battery: s(6),
            };
            (s(0), row)
        })
        .collect())
}

/// The state line of rollout `name` (`Halted: REASON`, …) and the message under it; `None`
/// while the page shows no such rollout.
pub fn rollout_state(b: &mut Browser, name: &str) -> Result<Option<(String, String)>> {
    let js = format!(
        "(() => {{
            const card = [...document.querySelectorAll('#rollouts .rollout')]
                .find(c => c.dataset.name === {name});
            if (!card) return null;
            const m = card.querySelector('[data-col=message]');
            return [card.querySelector('[data-col=state]').textContent, m ? m.textContent : ''];
        }})()",
        name = json!(name)
    );
    let v = b.eval(&js)?;
    Ok(match v {
        Value::Array(a) => Some((
            a[0].as_str().unwrap_or("").to_owned(),
            a.get(1).and_then(Value::as_str).unwrap_or("").to_owned(),
        )),
        _ => None,
    })
}
