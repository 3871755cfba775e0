// The fleetgate dashboard: plain JavaScript served by the gateway, no build step. It reads
// the same /api/v1 as the CLI with the operator's bearer token (kept in sessionStorage, or
// given once as #/page?token=... in the address), and offers the actions the token's role
// allows. Text from devices (ids, messages, log lines) is only ever set as text, never as HTML.
'use strict';

const API = '/api/v1';
const TOKEN_KEY = 'fleetgate.token';
const ROLES = ['read-only', 'operator', 'admin'];
let me = null;
let refreshTimer = null;

// ---- DOM helpers ---------------------------------------------------------------------------

/** An element; string and number children become text nodes, `null` children are skipped. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  append(node, children);
  return node;
}

/** Appends children (null ones skipped) to `node`; `Element.append` would print "null". */
function add(node, ...children) {
  return append(node, children);
}

function append(node, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  append(node, children);
  return node;
}

function badge(text) {
  return el('span', { class: 'badge ' + String(text || '').replace(/[^a-z_]/g, '') }, text || '-');
}

function dot(on) {
  return el('span', { class: on ? 'dot on' : 'dot', title: on ? 'online' : 'offline' });
}

function link(href, text) {
  return el('a', { href }, text);
}

function devLink(id) {
  return link('#/devices/' + encodeURIComponent(id), id);
}

/** An ISO time as "YYYY-MM-DD HH:MM:SS" (UTC), or "-". */
function when(t) {
  return t ? String(t).replace('T', ' ').replace(/\.\d+Z$/, 'Z').replace('Z', '') : '-';
}

function num(x, digits) {
  if (x === null || x === undefined) return '-';
  return typeof x === 'number' ? x.toFixed(digits === undefined ? 0 : digits) : String(x);
}

function table(headers, rows, empty) {
  if (!rows.length) return el('p', { class: 'muted' }, empty || 'None.');
  return el('table', {},
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { class: h.num ? 'num' : null }, h.label || h)))),
    el('tbody', {}, rows.map((r) => el('tr', {}, r.map((c, i) =>
      el('td', { class: headers[i] && headers[i].num ? 'num' : null }, c))))));
}

function kv(pairs) {
  return el('dl', { class: 'kv' }, pairs.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
}

function card(n, label) {
  return el('div', { class: 'card' }, el('div', { class: 'n' }, n), el('div', { class: 'l' }, label));
}

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const opts = options || {};
  const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN_KEY) };
  if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(API + path, {
    method: opts.method || 'GET',
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw new ApiError(401, 'the token was not accepted');
  }
  if (!res.ok) throw new ApiError(res.status, (body && body.error) || res.statusText);
  return body;
}

function may(role) {
  return me && ROLES.indexOf(me.role) >= ROLES.indexOf(role);
}

/** An action button: runs `action`, then shows the page again (or the error). */
function actionButton(label, action, cls) {
  return el('button', {
    class: cls || null,
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await action();
        await show();
      } catch (e) {
        ev.target.disabled = false;
        flash(e.message);
      }
    },
  }, label);
}

/** A button that fetches `path` with the token and saves the answer as `filename`. */
function actionDownload(label, path, filename) {
  return el('button', {
    onclick: async () => {
      try {
        const res = await fetch(API + path, { headers: { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN_KEY) } });
        if (!res.ok) throw new Error((await res.json()).error || res.statusText);
        const a = el('a', { href: URL.createObjectURL(await res.blob()), download: filename });
        a.click();
        setTimeout(() => URL.revokeObjectURL(a.href), 1000);
      } catch (e) {
        flash(e.message);
      }
    },
  }, label);
}

function flash(message) {
  const main = document.getElementById('main');
  main.insertBefore(el('p', { class: 'error' }, message), main.firstChild);
}

// ---- charts (inline SVG) -------------------------------------------------------------------

const COLORS = ['#0b5cad', '#c62828', '#2e7d32', '#b26a00', '#6a1b9a', '#00838f', '#5d4037', '#ad1457'];

/** Lines over time: series = [{name, points: [[ms, value], ...]}]. */
function lineChart(series, opts) {
  const W = 760, H = (opts && opts.height) || 220, L = 56, R = 12, T = 12, B = 28;
  const all = series.flatMap((s) => s.points);
  const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img',
    'aria-label': (opts && opts.label) || 'chart', 'data-series': series.length, 'data-points': all.length });
  if (!all.length) {
    chart.appendChild(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet'));
    return el('div', {}, chart);
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (opts && opts.yMin !== undefined) y0 = Math.min(y0, opts.yMin);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const x = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    chart.appendChild(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    chart.appendChild(svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmt(v)));
  }
  chart.appendChild(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
  chart.appendChild(svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const tx = (ms) => new Date(ms).toISOString().slice(11, 19);
  chart.appendChild(svg('text', { x: L, y: H - 8 }, tx(x0)));
  chart.appendChild(svg('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, tx(x1)));
  (opts && opts.thresholds || []).forEach((t) => {
    chart.appendChild(svg('line', { x1: L, x2: W - R, y1: y(t.value), y2: y(t.value),
      stroke: t.color, 'stroke-dasharray': '5 4' }));
  });
  series.forEach((s, i) => {
    const pts = s.points.slice().sort((a, b) => a[0] - b[0]).map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    chart.appendChild(svg('polyline', { points: pts.join(' '), fill: 'none',
      stroke: COLORS[i % COLORS.length], 'stroke-width': 1.8, 'data-name': s.name }));
    if (s.points.length === 1) {
      const [px, py] = pts[0].split(',');
      chart.appendChild(svg('circle', { cx: px, cy: py, r: 3, fill: COLORS[i % COLORS.length] }));
    }
  });
  return el('div', {}, chart, el('div', { class: 'legend' },
    series.map((s, i) => el('span', { style: `--c: ${COLORS[i % COLORS.length]}` }, s.name))));
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(0) + 'k';
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  return v.toFixed(3);
}

/** Horizontal bars with their warn and alert thresholds: bars = [{label, value, warn, alert, status}]. */
function barChart(bars) {
  const W = 760, row = 26, L = 150, R = 60, T = 10;
  const H = T * 2 + bars.length * row + 16;
  const max = Math.max(0.001, ...bars.flatMap((b) => [b.value || 0, b.alert || 0, b.warn || 0])) * 1.1;
  const x = (v) => L + (v / max) * (W - L - R);
  const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'drift per feature', 'data-bars': bars.length });
  const fill = { ok: '#2e7d32', warn: '#b26a00', alert: '#c62828' };
  bars.forEach((b, i) => {
    const y = T + i * row;
    chart.appendChild(svg('text', { x: L - 8, y: y + 16, 'text-anchor': 'end' }, b.label));
    chart.appendChild(svg('rect', { x: L, y: y + 5, height: 14, width: Math.max(1, x(b.value || 0) - L),
      fill: fill[b.status] || '#9aa4ae', 'data-feature': b.label }));
    chart.appendChild(svg('text', { x: x(b.value || 0) + 5, y: y + 16 }, b.value === null || b.value === undefined ? 'no window yet' : fmt(b.value)));
    [[b.warn, '#b26a00'], [b.alert, '#c62828']].forEach(([t, c]) => {
      if (t) chart.appendChild(svg('line', { x1: x(t), x2: x(t), y1: y + 2, y2: y + 22, stroke: c, 'stroke-width': 2 }));
    });
  });
  chart.appendChild(svg('text', { x: L, y: H - 4 }, 'PSI of the last window; ticks: warn and alert thresholds'));
  return chart;
}

/** One stacked bar per stage: how many of its devices are in each state. */
function stagesChart(stages) {
  const W = 760, row = 30, L = 70, R = 170, T = 8;
  const H = T * 2 + stages.length * row;
  const max = Math.max(1, ...stages.map((s) => s.devices || 0));
  const colors = { installed: '#2e7d32', healthy: '#2e7d32', updating: '#0b5cad', offered: '#0b5cad',
    pending: '#c3ccd5', waiting: '#c3ccd5', failed: '#c62828', rejected: '#c62828', timed_out: '#c62828',
    rolled_back: '#b26a00', rolling_back: '#b26a00' };
  const chart = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'stages' });
  stages.forEach((s, i) => {
    const y = T + i * row;
    chart.appendChild(svg('text', { x: 8, y: y + 18 }, `stage ${s.number}`));
    let x = L;
    for (const [state, n] of Object.entries(s.counts || {})) {
      const w = (n / max) * (W - L - R);
      chart.appendChild(svg('rect', { x, y: y + 5, width: Math.max(0, w), height: 18, fill: colors[state] || '#9aa4ae' },
        svg('title', {}, `${state}: ${n}`)));
      x += w;
    }
    chart.appendChild(svg('text', { x: x + 6, y: y + 18 }, `${s.devices || 0} devices (${s.size})`));
  });
  return chart;
}

// ---- pages ---------------------------------------------------------------------------------

async function pageFleet(main) {
  const [devices, open, rollouts] = await Promise.all([
    api('/devices'),
    api('/alerts?state=open&limit=10000'),
    api('/rollouts?state=running&limit=100'),
  ]);
  const online = devices.filter((d) => d.online).length;
  const count = (key) => {
    const m = new Map();
    devices.forEach((d) => { const k = key(d); if (k) m.set(k, (m.get(k) || 0) + 1); });
    return [...m.entries()].sort((a, b) => b[1] - a[1]);
  };
  const firmware = count((d) => d.firmware && `${d.firmware.name} ${d.firmware.version}`);
  const models = new Map();
  devices.forEach((d) => (d.models || []).forEach((m) => {
    const k = `${m.name} ${m.version}`;
    models.set(k, (models.get(k) || 0) + 1);
  }));
  const classes = count((d) => d.hardware && `${d.hardware.class} (${d.hardware.arch})`);
  const filter = el('input', { placeholder: 'filter by id, version, class, label', size: 36 });
  const rowsOf = (q) => devices
    .filter((d) => !q || JSON.stringify([d.id, d.labels, d.firmware, d.models, d.hardware]).toLowerCase().includes(q))
    .map((d) => [
      el('span', {}, dot(d.online), devLink(d.id)),
      d.firmware ? `${d.firmware.name} ${d.firmware.version}` : '-',
      (d.models || []).map((m) => `${m.name} ${m.version}`).join(', ') || '-',
      d.hardware ? d.hardware.class : '-',
      Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ') || '-',
      when(d.last_seen),
      d.counters.telemetry,
      d.counters.rejected,
    ]);
  const headers = ['Device', 'Firmware', 'Models', 'Class', 'Labels', 'Last seen',
    { label: 'Telemetry', num: true }, { label: 'Refused', num: true }];
  const holder = el('div', {}, table(headers, rowsOf(''), 'No device is enrolled yet: fleetgate devices enroll <id>.'));
  filter.addEventListener('input', () => {
    holder.replaceChildren(table(headers, rowsOf(filter.value.trim().toLowerCase()), 'No device matches.'));
  });
  add(main, 
    el('h1', {}, 'Fleet'),
    el('div', { class: 'cards' },
      card(devices.length, 'devices'), card(online, 'online'), card(devices.length - online, 'offline'),
      card(open.length, 'open alerts'), card(rollouts.length, 'rollouts running')),
    el('div', { class: 'row' },
      el('div', {}, el('h2', {}, 'Firmware'), table(['Version', { label: 'Devices', num: true }], firmware)),
      el('div', {}, el('h2', {}, 'Models'), table(['Version', { label: 'Devices', num: true }], [...models.entries()])),
      el('div', {}, el('h2', {}, 'Hardware'), table(['Class', { label: 'Devices', num: true }], classes))),
    el('h2', {}, 'Devices'),
    el('div', { class: 'toolbar' }, filter),
    holder,
  );
}

const METRICS = [
  ['temp_c', 'Temperature (°C)'], ['cpu_pct', 'CPU (%)'], ['inference_latency_us', 'Inference latency (µs)'],
  ['free_mem_bytes', 'Free memory (bytes)'], ['power_mw', 'Power (mW)'], ['battery_mv', 'Battery (mV)'],
];

async function pageDevice(main, id) {
  const enc = encodeURIComponent(id);
  const [d, rows, refusals, logs, alerts] = await Promise.all([
    api(`/devices/${enc}`),
    api(`/devices/${enc}/telemetry?limit=1000`),
    api(`/devices/${enc}/refusals`),
    api(`/devices/${enc}/logs?limit=50`),
    api(`/alerts?device=${enc}&limit=50`),
  ]);
  const present = METRICS.filter(([k]) => rows.some((r) => typeof r.hw[k] === 'number'));
  const select = el('select', {}, present.map(([k, label]) => el('option', { value: k }, label)));
  const chartBox = el('div', {});
  const draw = () => {
    const k = select.value;
    const points = rows.filter((r) => typeof r.hw[k] === 'number').map((r) => [Date.parse(r.received_at), r.hw[k]]);
    chartBox.replaceChildren(lineChart([{ name: k, points }], { label: `${id} ${k}` }));
  };
  select.addEventListener('change', draw);
  const hw = d.hardware;
  add(main, 
    el('h1', {}, dot(d.online), 'Device ', d.id),
    el('div', { class: 'row' },
      kv([
        ['Online', d.online ? `yes, since ${when(d.connected_at)}` : `no, since ${when(d.disconnected_at)}`],
        ['Enrolled', when(d.enrolled_at)],
        ['Revoked', d.revoked ? 'yes' : 'no'],
        ['Labels', Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(' ') || '-'],
        ['Firmware', d.firmware ? `${d.firmware.name} ${d.firmware.version} (release ${d.firmware.release})` : '-'],
        ['Models', (d.models || []).map((m) => `${m.name} ${m.version}`).join(', ') || '-'],
        ['Hardware', hw ? `${hw.class}, ${hw.arch}, ${hw.ram_bytes} B RAM, ${hw.flash_bytes} B flash` : '-'],
        ['Protocol', `${d.protocol || '-'} (${d.encoding})`],
      ]),
      kv([
        ['Telemetry', d.counters.telemetry], ['Lost', d.counters.lost], ['Duplicates', d.counters.duplicates],
        ['Alerts', d.counters.alerts], ['Logs', d.counters.logs], ['Refused', d.counters.rejected],
        ['Last seen', when(d.last_seen)], ['Connections', d.connections],
      ])),
    el('h2', {}, 'Telemetry'),
    present.length ? el('div', { class: 'toolbar' }, 'Metric ', select) : null,
    chartBox,
    el('h2', {}, 'Latest refusals'),
    el('p', { class: 'muted' }, `${refusals.total} of its messages refused since the gateway started.`),
    table(['Last', 'Reason', { label: 'Count', num: true }, 'Detail'],
      refusals.refusals.map((r) => [when(r.last_at), badge(r.reason), r.count, r.detail]), 'None.'),
    el('h2', {}, 'Alerts'),
    alertTable(alerts),
    el('h2', {}, 'Log'),
    table(['Received', 'Level', 'Text'], logs.map((l) => [when(l.received_at), l.level, l.text]), 'No log lines.'),
  );
  if (present.length) draw();
  else chartBox.append(lineChart([], { label: `${id} telemetry` }));
}

function alertTable(alerts) {
  return table(['Id', 'Severity', 'State', 'Device', 'Kind', 'Opened', { label: 'Count', num: true }, 'Message', ''],
    alerts.map((a) => [
      String(a.id), badge(a.severity), badge(a.state), devLink(a.device), a.kind, when(a.opened_at), a.count, a.message,
      el('span', {},
        may('operator') && a.state === 'open' ? actionButton('Acknowledge', () => api(`/alerts/${a.id}/ack`, { method: 'POST', body: {} })) : null,
        ' ',
        may('operator') && a.state !== 'resolved' ? actionButton('Resolve', () => api(`/alerts/${a.id}/resolve`, { method: 'POST', body: {} })) : null),
    ]), 'No alerts.');
}

async function pageAlerts(main, query) {
  const state = query.get('state') || 'unresolved';
  const lists = state === 'unresolved'
    ? await Promise.all([api('/alerts?state=open&limit=500'), api('/alerts?state=acknowledged&limit=500')])
    : [await api('/alerts?limit=500' + (state === 'all' ? '' : `&state=${state}`))];
  const alerts = lists.flat().sort((a, b) => b.id - a.id);
  const select = el('select', { onchange: (e) => { location.hash = `#/alerts?state=${e.target.value}`; } },
    ['unresolved', 'open', 'acknowledged', 'resolved', 'all'].map((s) =>
      el('option', { value: s, selected: s === state }, s)));
  add(main, el('h1', {}, 'Alerts'), el('div', { class: 'toolbar' }, 'Show ', select), alertTable(alerts));
}

async function pageRollouts(main) {
  const rollouts = await api('/rollouts?limit=200');
  add(main, el('h1', {}, 'Rollouts'), table(
    ['Id', 'Release', 'State', 'Stage', { label: 'Devices', num: true }, 'Devices by state', 'Created'],
    rollouts.map((r) => [
      link(`#/rollouts/${r.id}`, String(r.id)), `${r.kind} ${r.name} ${r.version}`, badge(r.state),
      `${r.stage.number} of ${r.stage.of}`, r.planned,
      Object.entries(r.counts).map(([k, v]) => `${k} ${v}`).join(', ') || '-', when(r.created.at),
    ]), 'No rollouts yet: fleetgate rollout create.'));
}

async function pageRollout(main, id) {
  const [r, devices, audit] = await Promise.all([
    api(`/rollouts/${id}`), api(`/rollouts/${id}/devices?limit=10000`), api(`/rollouts/${id}/audit?limit=10000`),
  ]);
  const act = (verb) => () => api(`/rollouts/${id}/${verb}`, { method: 'POST', body: {} });
  const live = r.state === 'running' || r.state === 'paused';
  add(main, 
    el('h1', {}, `Rollout ${r.id}: ${r.kind} ${r.name} ${r.version} `, badge(r.state)),
    may('operator') && live ? el('div', { class: 'toolbar' },
      r.state === 'running' ? actionButton('Pause', act('pause')) : actionButton('Resume', act('resume')),
      actionButton('Abort', act('abort'), 'danger'), actionButton('Roll back', act('rollback'), 'danger')) : null,
    kv([
      ['Release', `${r.version} (release ${r.release})`],
      ['Target', JSON.stringify(r.target)],
      ['Devices', r.planned],
      ['Stage', `${r.stage.number} of ${r.stage.of} (${r.stage.devices || 0} devices), started ${when(r.stage.started_at)}`],
      ['Baking', r.stage.baking_since ? `since ${when(r.stage.baking_since)}, until ${when(r.stage.bake_ends_at)}` : 'not yet'],
      ['Reason', r.reason ? `${r.reason} (by ${r.by})` : '-'],
      ['Created', `${when(r.created.at)} by ${r.created.by}`],
      ['Finished', when(r.finished_at)],
    ]),
    el('h2', {}, 'Stages'),
    stagesChart(r.stages),
    table(['Stage', 'Size', { label: 'Devices', num: true }, 'Devices by state'],
      r.stages.map((s) => [String(s.number), s.size, s.devices || 0,
        Object.entries(s.counts || {}).map(([k, v]) => `${k} ${v}`).join(', ') || '-'])),
    el('h2', {}, 'Health gates'),
    table(['Gate', 'Verdict', { label: 'Updated', num: true }, { label: 'Control', num: true },
      { label: 'Threshold', num: true }, 'Samples (updated/control)', 'Devices (updated/control)', 'At'],
    r.gates.map((g) => [g.gate, badge(g.verdict), num(g.updated, 3), num(g.control, 3), num(g.threshold, 3),
      `${g.updated_samples} / ${g.control_samples}`, `${g.updated_devices} / ${g.control_devices}`, when(g.at)]),
    'No gate has judged yet (gates judge while a stage bakes).'),
    el('h2', {}, 'Audit timeline'),
    audit.length ? el('ol', { class: 'timeline' }, audit.map((e) => el('li', {},
      el('span', { class: 't' }, when(e.at)), el('span', { class: 'e' }, e.event), e.message,
      el('span', { class: 'muted' }, ` (by ${e.by})`)))) : el('p', { class: 'muted' }, 'Nothing yet.'),
    el('h2', {}, 'Devices'),
    table(['Device', { label: 'Stage', num: true }, 'State', 'Transfer', 'Reason', 'Updated'],
      devices.map((d) => [devLink(d.device), d.stage, badge(d.state), d.transfer_state || '-', d.reason || '-', when(d.updated_at)])),
  );
}

async function pageDrift(main) {
  const streams = await api('/drift');
  add(main, el('h1', {}, 'Drift'), table(
    ['Model', 'Version', 'Cohort', 'Status', 'Predictions', 'Features alerting', 'Features warning',
      { label: 'Open window', num: true }, 'Last window'],
    streams.map((s) => [
      link(`#/drift/${encodeURIComponent(s.model)}/${encodeURIComponent(s.version)}?cohort=${encodeURIComponent(s.cohort)}`, s.model),
      s.version, s.cohort, badge(s.status), badge(s.prediction_status),
      s.features_alerting.join(', ') || '-', s.features_warning.join(', ') || '-', s.open_window_samples === null ? '-' : s.open_window_samples,
      when(s.last_window_closed_at),
    ]), 'No model version has a baseline and telemetry yet: fleetgate baseline upload.'));
}

async function pageDriftDetail(main, model, version, query) {
  const cohort = query.get('cohort') || 'all';
  const base = `/drift/${encodeURIComponent(model)}/${encodeURIComponent(version)}`;
  const [d, history] = await Promise.all([
    api(`${base}?cohort=${encodeURIComponent(cohort)}`),
    api(`${base}/history?cohort=${encodeURIComponent(cohort)}&limit=100`),
  ]);
  const series = d.features.map((f) => ({
    name: f.feature,
    points: history.flatMap((w) => w.features.filter((x) => x.feature === f.feature)
      .map((x) => [Date.parse(w.closed_at), x.psi])),
  }));
  const predictions = [{ name: 'prediction JS', points: history.filter((w) => w.prediction).map((w) => [Date.parse(w.closed_at), w.prediction.js]) }];
  // The prediction is null when the baseline has no predicted classes.
  const p = d.prediction ? d.prediction.last_window : null;
  const open = d.features.length ? d.features[0].open_window : (d.prediction ? d.prediction.open_window : null);
  add(main,
    el('h1', {}, `Drift: ${d.model} ${d.version} `, el('span', { class: 'muted' }, `cohort ${d.cohort}`)),
    kv([
      ['Open window', open ? `${open.samples} samples since ${when(open.opened_at)}` : '-'],
      ['Predictions', !d.prediction ? 'not in the baseline' : p ? `${d.prediction.status}: JS ${num(p.js, 4)} (threshold ${num(p.js_threshold, 4)}), mean confidence ${num(p.mean_confidence, 3)}` : 'no window yet'],
      ['Recent inputs', actionDownload('samples.csv', d.samples.replace(API, ''), `${d.model}-${d.version}-${d.cohort}.csv`)],
    ]),
    el('h2', {}, 'Per feature, last window'),
    barChart(d.features.map((f) => ({
      label: f.feature, status: f.status,
      value: f.last_window ? f.last_window.psi : null,
      warn: f.last_window ? f.last_window.warn_threshold : null,
      alert: f.last_window ? f.last_window.alert_threshold : null,
    }))),
    table(['Feature', 'Status', { label: 'N', num: true }, { label: 'PSI', num: true }, { label: 'JS', num: true },
      { label: 'KS', num: true }, { label: 'W1', num: true }, { label: 'Alert at', num: true }],
    d.features.map((f) => {
      const w = f.last_window || {};
      return [f.feature, badge(f.status), w.n === undefined ? '-' : w.n, num(w.psi, 4), num(w.js, 4), num(w.ks, 4),
        num(w.wasserstein, 4), num(w.alert_threshold, 4)];
    })),
    el('h2', {}, 'PSI per window'),
    lineChart(series, { label: 'PSI per feature over time', yMin: 0 }),
    el('h2', {}, 'Predictions per window'),
    lineChart(predictions, { label: 'prediction JS over time', yMin: 0 }),
  );
}

// ---- shell: login, routing, refresh --------------------------------------------------------

function loginForm(message) {
  const input = el('input', { type: 'password', placeholder: 'operator token', autocomplete: 'off' });
  const main = document.getElementById('main');
  const submit = async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    me = null;
    await show();
  };
  main.replaceChildren(el('form', { class: 'login', onsubmit: submit },
    el('h1', {}, 'Sign in'),
    message ? el('p', { class: 'error' }, message) : null,
    el('p', { class: 'muted' }, 'An operator token (fleetgate tokens create NAME --role read-only), or the gateway\'s bootstrap token. It stays in this tab only.'),
    input, el('button', { type: 'submit' }, 'Sign in')));
  document.body.dataset.ready = 'login';
  input.focus();
}

function parseHash() {
  let hash = location.hash.replace(/^#/, '') || '/fleet';
  const q = hash.indexOf('?');
  const query = new URLSearchParams(q >= 0 ? hash.slice(q + 1) : '');
  const path = (q >= 0 ? hash.slice(0, q) : hash).split('/').filter(Boolean).map(decodeURIComponent);
  // A token given in the address is kept for this tab and taken out of the address.
  if (query.has('token')) {
    sessionStorage.setItem(TOKEN_KEY, query.get('token'));
    query.delete('token');
    const rest = query.toString();
    hash = '/' + path.map(encodeURIComponent).join('/') + (rest ? '?' + rest : '');
    history.replaceState(null, '', '#' + hash);
    me = null;
  }
  return { path, query };
}

async function show() {
  clearTimeout(refreshTimer);
  const { path, query } = parseHash();
  const main = document.getElementById('main');
  document.body.dataset.ready = '';
  if (!sessionStorage.getItem(TOKEN_KEY)) return loginForm();
  const page = path[0] || 'fleet';
  document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.dataset.nav === page || (page === 'devices' && a.dataset.nav === 'fleet')));
  const box = el('div', {});
  try {
    if (!me) {
      me = await api('/me');
      document.getElementById('who').replaceChildren(`${me.name} (${me.role})`,
        el('button', { onclick: () => { sessionStorage.removeItem(TOKEN_KEY); me = null; show(); } }, 'Sign out'));
    }
    if (page === 'fleet') await pageFleet(box);
    else if (page === 'devices' && path[1]) await pageDevice(box, path[1]);
    else if (page === 'alerts') await pageAlerts(box, query);
    else if (page === 'rollouts' && path[1]) await pageRollout(box, path[1]);
    else if (page === 'rollouts') await pageRollouts(box);
    else if (page === 'drift' && path[2]) await pageDriftDetail(box, path[1], path[2], query);
    else if (page === 'drift') await pageDrift(box);
    else box.append(el('p', { class: 'error' }, 'No such page.'));
  } catch (e) {
    if (e.status === 401) return loginForm('That token was not accepted.');
    box.replaceChildren(el('p', { class: 'error' }, e.message));
  }
  main.replaceChildren(box);
  document.body.dataset.page = page;
  document.body.dataset.ready = page;
  // Lists follow the gateway; a page with a form being used is left alone.
  refreshTimer = setTimeout(() => {
    if (!document.activeElement || !['INPUT', 'SELECT'].includes(document.activeElement.tagName)) show();
  }, 15000);
}

window.addEventListener('hashchange', show);
show();
