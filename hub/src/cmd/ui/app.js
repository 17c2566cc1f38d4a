// The fleet page: polls /ui/api/fleet every second and redraws. Read-only until the operator
// signs in with a bearer token: then each rollout gets its verbs, POSTed with the token in the
// Authorization header (never a cookie, so no other site can act through this browser). The hub
// asks who the token is and whether that user may act; the page only shows the answer. Data only
// ever reaches the DOM as text (append of strings, textContent), never as markup.
'use strict';

const POLL_MS = 1000;
const VERBS = ['pause', 'resume', 'abort', 'promote', 'retry'];
// Per tab, gone when the tab closes; never in localStorage or a cookie.
const TOKEN_KEY = 'flightnode.token';
let polls = 0;
let readOnly = true;
let busy = false;
let last = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

// An element with attributes and children; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v;
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === '') continue;
    e.append(c);
  }
  return e;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.max(0, seconds);
  if (s < 60) return s + 's ago';
  if (s < 3600) return Math.floor(s / 60) + 'm ago';
  if (s < 86400) return Math.floor(s / 3600) + 'h ago';
  return Math.floor(s / 86400) + 'd ago';
}

// A class name from a value (phases are CamelCase words; anything else is dropped).
function cls(v) {
  return String(v || '').toLowerCase().replace(/[^a-z]/g, '');
}

// What a drone waits for, or why its last upgrade did not commit (the rollback cause).
function why(d) {
  const parts = [];
  let failed = false;
  if (d.waitReason) parts.push('waits: ' + d.waitReason);
  if (d.syncMessage && (d.syncReason === 'Pending' || d.syncReason === 'Waiting' || d.syncReason === 'Retrying')) {
    parts.push(d.syncReason + ': ' + d.syncMessage);
  }
  if (d.lastResult && d.lastResult !== 'Committed' && d.lastResult !== 'AlreadyInstalled') {
    parts.push(d.lastResult + (d.lastVersion ? ' ' + d.lastVersion : '') +
      (d.lastErrorCode ? ': ' + d.lastErrorCode : ''));
    failed = true;
  }
  if (d.armLock) parts.push('arm lock: ' + d.armLock);
  const title = [d.lastErrorMessage, d.syncMessage].filter(Boolean).join('\n');
  return { text: parts.join('; '), failed, title };
}

function droneRow(d) {
  const online = d.online === 'True';
  const name = el('td', {},
    el('span', { class: 'dot ' + (online ? 'on' : 'off'), title: online ? 'online' : 'offline' }),
    el('span', { 'data-col': 'name' }, d.name));
  if (d.deviceId && d.deviceId !== d.name) name.append(el('div', { class: 'sub' }, 'id ' + d.deviceId));
  const version = el('td', {}, el('span', { 'data-col': 'version' }, d.version || '–'));
  if (d.desiredVersion && d.desiredVersion !== d.version) {
    version.append(el('div', { class: 'sub', 'data-col': 'desired', title: 'the version the spec asks for' }, '→ ' + d.desiredVersion));
  }
  let slot = d.activeSlot || '–';
  if (d.bootedSlot && d.activeSlot && d.bootedSlot !== d.activeSlot) slot += ' (booted ' + d.bootedSlot + ')';
  const phase = d.phase || '–';
  const battery = d.batteryPercent === null || d.batteryPercent === undefined ? '–' : d.batteryPercent + ' %';
  const w = why(d);
  return el('tr', { 'data-name': d.name, class: online ? 'online' : 'offline' },
    name,
    version,
    el('td', { 'data-col': 'slot' }, slot),
    el('td', { 'data-col': 'phase', class: 'phase phase-' + cls(d.phase) }, phase),
    el('td', { 'data-col': 'flight' }, d.flightState || '–'),
    el('td', { 'data-col': 'battery', class: 'num' + (d.batteryPercent !== null && d.batteryPercent < 30 ? ' low' : '') }, battery),
    el('td', { 'data-col': 'heartbeat', class: 'num', title: d.lastHeartbeatTime || 'never' }, ago(d.heartbeatAgeSeconds)),
    el('td', { 'data-col': 'why', class: 'why' + (w.failed ? ' failed' : ''), title: w.title }, w.text));
}

// The rollout's state in one word and its reason: Halted (the breaker, or paused) wins.
function rolloutState(r) {
  if (r.halted && r.halted.status === 'True') {
    return { cls: r.paused ? 'paused' : 'halted', text: 'Halted: ' + r.halted.reason, message: r.halted.message };
  }
  if (r.complete && r.complete.status === 'True') {
    return { cls: 'complete', text: 'Complete', message: r.complete.message };
  }
  if (r.progressing) {
    return { cls: 'progressing', text: 'Progressing: ' + r.progressing.reason, message: r.progressing.message };
  }
  return { cls: 'progressing', text: 'Pending', message: 'the controller has not written a status yet' };
}

function rolloutCard(r) {
  const s = rolloutState(r);
  const c = r.counts || {};
  const count = (label, n, bad) => el('span', { class: bad && n > 0 ? 'bad' : null, 'data-count': label }, label + ' ' + (n || 0));
  const card = el('div', { class: 'rollout', 'data-name': r.name },
    el('div', { class: 'head' },
      el('span', { class: 'name' }, r.name),
      el('span', { 'data-col': 'version' }, 'version ' + r.version),
      el('span', { 'data-col': 'wave' }, 'wave ' + (r.wave || '–')),
      el('span', { class: 'state ' + s.cls, 'data-col': 'state', title: s.message || '' }, s.text)),
    s.message ? el('div', { class: 'sub', 'data-col': 'message' }, s.message) : null,
    el('div', { class: 'counts' },
      count('total', c.total), count('succeeded', c.succeeded), count('in progress', c.inProgress),
      count('waiting', c.waiting), count('not started', c.notStarted),
      count('rolled back', c.rolledBack, true), count('failed', c.failed, true),
      count('rejected', c.rejected, true), count('timed out', c.timedOut, true),
      c.pinned ? count('pinned', c.pinned) : null, c.superseded ? count('superseded', c.superseded) : null));
  if (r.superseded && r.superseded.status === 'True') {
    card.append(el('div', { class: 'sub' }, 'Superseded: ' + r.superseded.message));
  }
  if (r.events && r.events.length) {
    const list = el('ul', { class: 'events' });
    for (const e of r.events) {
      list.append(el('li', { class: cls(e.type) },
        el('span', { class: 't' }, e.time),
        el('span', { class: 'r' }, e.reason),
        e.note));
    }
    card.append(list);
  }
  if (!readOnly && token()) {
    card.append(el('div', { class: 'actions' }, ...VERBS.map(verb =>
      el('button', { type: 'button', 'data-verb': verb, 'data-rollout': r.name, 'data-namespace': r.namespace },
        verb))));
    for (const b of card.querySelectorAll('.actions button')) b.disabled = busy;
  }
  return card;
}

// The outcome of the last action, above the tables: the hub's own sentence.
function note(kind, text) {
  const p = document.getElementById('action');
  p.className = 'action ' + kind;
  p.textContent = text;
  p.hidden = false;
}

async function act(namespace, name, verb) {
  busy = true;
  if (last) render(last);
  note('pending', verb + ' ' + name + '…');
  try {
    const url = '/ui/api/rollouts/' + encodeURIComponent(namespace) + '/' +
      encodeURIComponent(name) + '/' + encodeURIComponent(verb);
    const res = await fetch(url, {
      method: 'POST',
      cache: 'no-store',
      credentials: 'omit',
      headers: { Authorization: 'Bearer ' + token() },
    });
    let body = {};
    try { body = await res.json(); } catch (e) { body = { error: 'HTTP ' + res.status }; }
    if (res.ok) {
      note(res.status === 202 ? 'pending' : 'ok', body.message + (body.user ? ' (as ' + body.user + ')' : ''));
    } else {
      note('error', verb + ' ' + name + ' refused (HTTP ' + res.status + '): ' + (body.error || res.statusText));
    }
  } catch (e) {
    note('error', verb + ' ' + name + ' failed: ' + e.message);
  } finally {
    busy = false;
    if (last) render(last);
  }
}

function signInState() {
  const signedIn = !readOnly && token() !== '';
  document.getElementById('signin').hidden = readOnly || signedIn;
  document.getElementById('signedin').hidden = !signedIn;
  const mode = document.getElementById('mode');
  mode.textContent = readOnly ? 'read-only' : (signedIn ? 'signed in' : 'read-only until signed in');
  mode.classList.toggle('acting', signedIn);
  mode.title = readOnly
    ? 'this hub cannot tell who a token is: nothing on this page acts'
    : (signedIn
      ? 'actions go with your token; the hub asks who it is and whether that user may act'
      : 'sign in with a bearer token; the hub asks who it is and whether that user may act');
}

function render(v) {
  last = v;
  readOnly = v.readOnly !== false;
  signInState();
  document.getElementById('store').textContent = 'store: ' + v.store;
  const tbody = document.querySelector('#drones tbody');
  tbody.replaceChildren(...v.drones.map(droneRow));
  document.getElementById('drone-count').textContent = String(v.drones.length);
  document.getElementById('no-drones').hidden = v.drones.length > 0;
  document.getElementById('rollouts').replaceChildren(...v.rollouts.map(rolloutCard));
  document.getElementById('rollout-count').textContent = String(v.rollouts.length);
  document.getElementById('no-rollouts').hidden = v.rollouts.length > 0;
}

function connection(cls, text) {
  const c = document.getElementById('conn');
  c.className = 'conn ' + cls;
  c.textContent = text;
  document.body.classList.toggle('stale', cls === 'down');
}

async function poll() {
  try {
    const res = await fetch('/ui/api/fleet', { cache: 'no-store' });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || ('HTTP ' + res.status));
    render(body);
    polls += 1;
    document.body.dataset.polls = String(polls);
    connection('live', 'live · ' + body.generatedTime);
  } catch (e) {
    connection('down', 'disconnected: ' + e.message + ' (retrying)');
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById('signin').addEventListener('submit', e => {
  e.preventDefault();
  const input = document.getElementById('token');
  const t = input.value.trim();
  input.value = '';
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  if (last) render(last);
});
document.getElementById('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  if (last) render(last);
});
// One listener for every card's buttons: the cards are redrawn every second.
document.getElementById('rollouts').addEventListener('click', e => {
  const b = e.target.closest('button[data-verb]');
  if (!b || busy) return;
  act(b.dataset.namespace, b.dataset.rollout, b.dataset.verb);
});

poll();
