// The fleetsim console: hash-routed views over the JSON API (/api/v1/...), live charts fed by the
// server-sent sample stream. Data is written as text (never as HTML), so no identity, property or
// payload can inject markup.
"use strict";

const $ = (s) => document.querySelector(s);
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const fmt = (v) => v === null || v === undefined ? "–" : (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(1)) : String(v));
const time = (ms) => new Date(ms).toLocaleTimeString();

async function api(path, options) {
  const r = await fetch(path, options);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { message: text }; }
  if (!r.ok) throw new Error(`${r.status} ${(body && body.error) || ""}: ${(body && body.message) || text}`);
  return body;
}
const post = (path, body, method) => api(path, { method: method || "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });

function rows(table, pairs) {
  table.replaceChildren(...pairs.map(([k, v]) => { const tr = el("tr"); tr.append(el("th", k), el("td", fmt(v))); return tr; }));
}
function card(title, value, sub) { const c = el("div", undefined, "card"); c.append(el("b", fmt(value)), el("span", title + (sub ? " · " + sub : ""))); return c; }

// ---- charts -----------------------------------------------------------------------------------
const WINDOW = 600;
const charts = {};
window.fleetsimCharts = charts;
const chartDefs = {
  connected: { el: "#chart-connected", series: [["connected", "#2563eb"], ["identities", "#9aa4b2"]] },
  rates: { el: "#chart-rates", series: [["generatedPerSec", "#2563eb", "generated"], ["ackedPerSec", "#067647", "acked"], ["droppedPerSec", "#b42318", "dropped"], ["retransmitsPerSec", "#d97706", "retransmitted"]] },
  latency: { el: "#chart-latency", series: [["pubackP50Ms", "#067647", "PUBACK p50"], ["pubackP99Ms", "#2563eb", "PUBACK p99"], ["connectP99Ms", "#d97706", "connect p99"]] },
  faults: { el: "#chart-faults", series: [["faultsActive", "#b42318", "faults on"], ["faultEventsPerSec", "#d97706", "fault events/s"], ["reconnectsPerSec", "#2563eb", "reconnects/s"]] },
  hubConnections: { el: "#chart-hub-connections", series: [["hubConnections", "#2563eb", "connections"]] },
  hubTelemetry: { el: "#chart-hub-telemetry", series: [["hubTelemetryPerSec", "#067647", "received/s"]] },
  hubFaults: { el: "#chart-hub-faults", series: [["faultsActive", "#b42318", "faults on"], ["faultEventsPerSec", "#d97706", "fault events/s"]] },
};
function makeCharts() {
  for (const [name, def] of Object.entries(chartDefs)) {
    const host = $(def.el);
    const opts = {
      width: Math.max(host.clientWidth, 400), height: 200,
      series: [{}].concat(def.series.map(([key, stroke, label]) => ({ label: label || key, stroke, width: 1.5, spanGaps: true }))),
      axes: [{}, { size: 50 }],
      scales: { x: { time: true } },
    };
    const data = [[]].concat(def.series.map(() => []));
    charts[name] = { plot: new uPlot(opts, data, host), data, keys: def.series.map((s) => s[0]) };
  }
}
function addSamples(samples) {
  for (const c of Object.values(charts)) {
    for (const s of samples) {
      c.data[0].push(s.t / 1000);
      c.keys.forEach((k, i) => c.data[i + 1].push(s[k] === undefined ? null : s[k]));
    }
    const extra = c.data[0].length - WINDOW;
    if (extra > 0) c.data.forEach((a) => a.splice(0, extra));
    c.plot.setData(c.data);
  }
}

// ---- fleet view -------------------------------------------------------------------------------
async function refreshFleet() {
  const o = await api("/api/v1/overview");
  $("#nav-emulator").hidden = !o.emulator;
  const s = o.states, t = o.telemetry, r = o.rates;
  $("#fleet-cards").replaceChildren(
    card("identities", o.identities),
    card("connected once", o.ramp.connectedOnce, Math.round(o.ramp.fraction * 100) + " % of ramp"),
    ...Object.entries(s).map(([k, v]) => card(k, v)),
    card("generated/s", r.generatedPerSec), card("acked/s", r.ackedPerSec), card("dropped/s", r.droppedPerSec), card("retransmitted/s", r.retransmitsPerSec),
    card("acked", t.acked), card("dropped", t.dropped), card("queued", t.queued),
  );
  const l = o.latencyMs;
  rows($("#latency-table"), Object.entries(l).map(([k, v]) => [k, `p50 ${fmt(v.p50)} · p90 ${fmt(v.p90)} · p99 ${fmt(v.p99)} (${fmt(v.count)})`]));
  rows($("#reconnects-table"), Object.entries(o.reconnects));
  rows($("#errors-table"), Object.entries(o.errors).length ? Object.entries(o.errors) : [["none", ""]]);
  $("#ci").hidden = !o.ci;
  if (o.ci) {
    $("#ci-progress span").style.width = (o.ci.fraction * 100) + "%";
    $("#ci-checks tbody").replaceChildren(...o.ci.checks.map((c) => {
      const tr = el("tr");
      const standing = c.ok === null ? "judged at the end" : (c.ok ? "passing" : "failing");
      tr.append(el("td", c.name), el("td", fmt(c.limit)), el("td", fmt(c.value)), el("td", standing, c.ok === null ? "muted" : (c.ok ? "ok" : "bad")));
      return tr;
    }));
  }
}

// ---- devices view -----------------------------------------------------------------------------
const page = { offset: 0, limit: 50 };
let templatesKnown = false;
// Each filter change starts a request; only the latest one's answer is shown, whatever order the
// answers arrive in.
let devicesAsked = 0;
async function refreshDevices() {
  const mine = ++devicesAsked;
  const q = new URLSearchParams({ offset: page.offset, limit: page.limit });
  for (const [k, id] of [["prefix", "#filter-prefix"], ["template", "#filter-template"], ["state", "#filter-state"]]) {
    if ($(id).value) q.set(k, $(id).value);
  }
  const d = await api("/api/v1/devices?" + q);
  if (mine !== devicesAsked) return;
  if (!templatesKnown) {
    templatesKnown = true;
    $("#filter-template").append(...d.templates.map((t) => { const o = el("option", t); o.value = t; return o; }));
  }
  const last = Math.min(d.offset + d.items.length, d.total);
  $("#devices-total").textContent = d.total ? `${d.offset + 1}–${last} of ${d.total}` : "no identity matches";
  $("#page-prev").disabled = d.offset === 0;
  $("#page-next").disabled = last >= d.total;
  $("#devices-table tbody").replaceChildren(...d.items.map((v) => {
    const tr = el("tr");
    tr.dataset.id = v.id;
    tr.append(el("td", v.id), el("td", v.template), el("td", v.state), el("td", v.credentials), el("td", v.transport), el("td", fmt(v.generated)), el("td", fmt(v.acked)));
    tr.onclick = () => { location.hash = "#/device/" + encodeURIComponent(v.id); };
    return tr;
  }));
}

// ---- device page ------------------------------------------------------------------------------
let deviceId = null;
const devicePath = (id) => { const [d, m] = id.split("/"); return "/api/v1/devices/" + encodeURIComponent(d) + (m ? "/modules/" + encodeURIComponent(m) : ""); };
const pretty = (v) => v === undefined || v === null ? "–" : JSON.stringify(v, null, 2);
async function refreshDevice() {
  if (!deviceId) return;
  const d = await api(devicePath(deviceId));
  $("#device-title").textContent = d.id;
  rows($("#device-info"), [["state", d.state], ["template", d.template], ["credentials", d.credentials.path + " (no secrets shown)"], ["transport", d.credentials.transport],
    ...Object.entries(d.counters), ["twin version", d.twin.version]]);
  $("#device-history").replaceChildren(...d.history.map((h) => el("li", `${time(h.at)}  ${h.state}`)));
  $("#device-telemetry").replaceChildren(...d.lastTelemetry.slice().reverse().map((m) => el("li", `${time(m.at)}  ${m.body !== undefined ? m.body : m.bytes + " bytes"}`)));
  $("#device-commands").replaceChildren(...d.commands.slice().reverse().map((c) => el("li", `${time(c.at)}  ${c.name} → ${c.status}`)));
  $("#twin-desired").textContent = d.twin.error ? d.twin.error : pretty(d.twin.desired);
  $("#twin-reported").textContent = d.twin.error ? d.twin.error : pretty(d.twin.reported);
  return d;
}
function parseJson(text) { try { return JSON.parse(text); } catch (_) { return text; } }
async function invoke(ev) {
  ev.preventDefault();
  const out = $("#invoke-result");
  out.textContent = "invoking…";
  try {
    const r = await post(devicePath(deviceId) + "/actions/invoke", { method: $("#invoke-method").value, payload: parseJson($("#invoke-payload").value) });
    out.textContent = `status ${r.status} in ${r.latencyMs} ms\n${pretty(r.payload)}`;
  } catch (e) { out.textContent = String(e.message); }
}
async function setDesired(ev) {
  ev.preventDefault();
  const out = $("#desired-ack");
  const name = $("#desired-name").value;
  const value = parseJson($("#desired-value").value);
  out.textContent = "setting…";
  try {
    const r = await post(devicePath(deviceId) + "/actions/desired", { patch: { [name]: value } });
    const version = r.desiredVersion;
    out.textContent = `desired ${name} = ${JSON.stringify(value)} (version ${version}); waiting for the device's acknowledgement…`;
    const id = deviceId;
    for (let i = 0; i < 60 && id === deviceId; i++) {
      await new Promise((res) => setTimeout(res, 1000));
      const d = await refreshDevice();
      const ack = d && d.twin.reported && d.twin.reported[name];
      if (ack && typeof ack === "object" && "ac" in ack && ack.av >= version) {
        out.textContent = `acknowledged: ${name} = ${JSON.stringify(ack.value)}, ac ${ack.ac}, av ${ack.av}${ack.ad ? " (" + ack.ad + ")" : ""}`;
        return;
      }
    }
    out.textContent += "\nno acknowledgement yet";
  } catch (e) { out.textContent = String(e.message); }
}
async function action(name, body) {
  const out = $("#action-result");
  try {
    const r = await post(devicePath(deviceId) + "/actions/" + name, body);
    out.textContent = `${name}: ${JSON.stringify(r)}`;
  } catch (e) { out.textContent = `${name}: ${e.message}`; }
}

// ---- emulator view ----------------------------------------------------------------------------
// Each fault's "on" value when switched on from the panel (editable); "off" is its default.
const FAULTS = [
  ["drop_fraction", 0.2, 0, "fraction of connections closed every drop_every_secs"],
  ["drop_every_secs", 10, 60, "seconds between drops"],
  ["storm_every_secs", 30, 0, "every N s close every connection"],
  ["outage_every_secs", 60, 0, "every N s refuse connects for outage_secs"],
  ["outage_secs", 10, 0, "outage length (s)"],
  ["connects_per_sec", 10, 0, "accepted connects per second"],
  ["puback_delay_ms", 300, 0, "PUBACK held back (ms)"],
  ["twin_error_rate", 0.3, 0, "twin requests failed"],
  ["method_drop_rate", 0.5, 0, "direct methods never delivered"],
  ["dps_throttle_rate", 0.3, 0, "DPS requests answered 429"],
  ["token_lifetime_secs", 60, 0, "connections expired after N s"],
];
async function refreshEmulator() {
  const e = await api("/api/v1/emulator");
  $("#emulator-cards").replaceChildren(card("devices", e.devices), card("modules", e.modules), card("hub connections", e.connections.hub),
    card("DPS connections", e.connections.dps), card("telemetry received", e.telemetryReceived), card("faults on", e.faults.active),
    card("outage left (s)", e.faults.outageSecondsLeft));
  showFaults(e.faults);
}
function showFaults(f) {
  const body = $("#faults tbody");
  if (!body.children.length) {
    body.append(...FAULTS.map(([knob, on, off, help]) => {
      const tr = el("tr", undefined, "fault");
      tr.dataset.knob = knob;
      const value = el("input"); value.type = "number"; value.step = "any"; value.value = on;
      const box = el("input"); box.type = "checkbox";
      box.onchange = async () => {
        const v = box.checked ? Number(value.value) : off;
        try { await post("/api/v1/emulator/faults", { [knob]: v }, "PATCH"); $("#faults-result").textContent = `${knob} = ${v}`; await refreshEmulator(); }
        catch (err) { $("#faults-result").textContent = err.message; box.checked = !box.checked; }
      };
      const name = el("td", knob); name.title = help;
      const cell = el("td"); cell.append(value);
      const toggle = el("td"); toggle.append(box);
      tr.append(name, cell, toggle);
      return tr;
    }));
  }
  for (const [knob, , off] of FAULTS) {
    const tr = body.querySelector(`tr[data-knob="${knob}"]`);
    const box = tr.querySelector("input[type=checkbox]");
    if (document.activeElement !== box) box.checked = f[knob] !== off && f[knob] !== null;
  }
}
let tail = { device: null, after: 0 };
async function refreshTail() {
  if (!tail.device) return;
  const r = await api("/api/v1/emulator/telemetry?" + new URLSearchParams({ device: tail.device, after: tail.after }));
  const list = $("#tail");
  for (const m of r.messages) {
    tail.after = Math.max(tail.after, m.seq);
    list.prepend(el("li", `#${m.seq} ${m.enqueuedTime}  ${m.body !== undefined ? m.body : "(binary)"}`));
  }
  while (list.children.length > 200) list.lastChild.remove();
}

// ---- routing and refresh ----------------------------------------------------------------------
// A standalone emulator (`fleetsim hub`) runs no fleet: only its emulator view is shown.
let fleetOn = true;
let current = "fleet";
function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = h.split("/");
  const views = fleetOn ? ["fleet", "devices", "device", "emulator"] : ["emulator"];
  current = views.includes(view) ? view : views[0];
  if (current === "device") deviceId = decodeURIComponent(rest.join("/"));
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + current;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === current || (current === "device" && a.dataset.view === "devices"));
  if (current === "device") { for (const id of ["#invoke-result", "#desired-ack", "#action-result"]) $(id).textContent = ""; }
  refresh();
}
async function refresh() {
  try {
    if (current === "fleet") await refreshFleet();
    else if (current === "devices") await refreshDevices();
    else if (current === "device") await refreshDevice();
    else if (current === "emulator") { await refreshEmulator(); await refreshTail(); }
  } catch (e) { $("#live").textContent = "error: " + e.message; }
}

async function start() {
  makeCharts();
  const o = await api("/api/v1/overview").catch(() => null);
  if (o) {
    fleetOn = o.fleet !== false;
    $("#nav-emulator").hidden = !o.emulator;
    for (const v of ["fleet", "devices"]) document.querySelector(`nav a[data-view="${v}"]`).hidden = !fleetOn;
  }
  const s = await api("/api/v1/series");
  addSamples(s.samples);
  const events = new EventSource("/api/v1/stream");
  events.addEventListener("sample", (ev) => { addSamples([JSON.parse(ev.data)]); $("#live").textContent = "live · " + time(Date.now()); });
  events.onerror = () => { $("#live").textContent = "stream lost, retrying…"; };
  for (const id of ["#filter-prefix", "#filter-template", "#filter-state"]) $(id).addEventListener("input", () => { page.offset = 0; refreshDevices(); });
  $("#filters").onsubmit = (e) => e.preventDefault();
  $("#page-prev").onclick = () => { page.offset = Math.max(0, page.offset - page.limit); refreshDevices(); };
  $("#page-next").onclick = () => { page.offset += page.limit; refreshDevices(); };
  $("#invoke-form").onsubmit = invoke;
  $("#desired-form").onsubmit = setDesired;
  $("#c2d-form").onsubmit = (e) => { e.preventDefault(); action("c2d", { body: $("#c2d-body").value }); };
  $("#reboot-send").onclick = () => action("reboot", { downtimeSecs: Number($("#reboot-secs").value) });
  $("#disconnect-send").onclick = () => action("disconnect", {});
  $("#fault-drop").onclick = async () => { try { $("#faults-result").textContent = JSON.stringify(await post("/api/v1/emulator/faults/drop", {})); } catch (e) { $("#faults-result").textContent = e.message; } };
  $("#fault-outage").onclick = async () => { try { showFaults(await post("/api/v1/emulator/faults/outage", { seconds: Number($("#outage-secs").value) })); } catch (e) { $("#faults-result").textContent = e.message; } };
  $("#faults-clear").onclick = async () => { try { showFaults(await api("/api/v1/emulator/faults", { method: "DELETE" })); } catch (e) { $("#faults-result").textContent = e.message; } };
  $("#tail-form").onsubmit = (e) => { e.preventDefault(); tail = { device: $("#tail-device").value, after: 0 }; $("#tail").replaceChildren(); refreshTail(); };
  const states = ["provisioning", "connecting", "connected", "backoff", "rebooting", "stopped"];
  $("#filter-state").append(...states.map((s) => { const o = el("option", s); o.value = s; return o; }));
  window.addEventListener("hashchange", route);
  route();
  setInterval(() => { if (current !== "devices" || document.activeElement.tagName !== "INPUT") refresh(); }, 2000);
}
document.addEventListener("DOMContentLoaded", start);
