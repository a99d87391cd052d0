// Breakwater's dashboard: polls the admin API once a second with the admin token the
// operator typed in (kept in this tab's sessionStorage, sent only as a bearer header,
// never put in a URL or on the page) and draws the fleet, the last 15 minutes, the
// events and the routing decisions. No framework, no network beyond the admin API.
"use strict";

const TOKEN_KEY = "breakwater-admin-token";
const FAULTS = ["down", "error", "slow", "hang", "midstream", "gpu_failing", "gpu_degraded", "gpu_hung", "ok"];
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY);
let timer = null;

// Builds an element; children are nodes or strings (set as text, never parsed as HTML).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + token }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    logout("The admin token was refused.");
    throw new Error("unauthorized");
  }
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = (json && json.error && json.error.message) || text || r.statusText;
    throw new Error(msg);
  }
  return json;
}

function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
const pct = (x) => (x === null || x === undefined ? "–" : fmt(x * 100, 1) + " %");
const gib = (b) => (b === null || b === undefined ? "–" : fmt(b / 2 ** 30, 1));
const clock = (ms) => new Date(ms).toLocaleTimeString();

// ---- login ----

function showLogin(message) {
  $("login").hidden = false;
  $("app").hidden = true;
  $("reload").hidden = true;
  $("logout").hidden = true;
  $("policy").textContent = "";
  $("login-error").textContent = message || "";
  $("token").focus();
}

function logout(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer) clearInterval(timer);
  timer = null;
  showLogin(message);
}

async function login(given) {
  token = given;
  try {
    const status = await api("GET", "/admin/status");
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").hidden = true;
    $("app").hidden = false;
    $("reload").hidden = false;
    $("logout").hidden = false;
    render(status, null, null, null);
    refresh();
    timer = setInterval(refresh, 1000);
  } catch (e) {
    if (e.message !== "unauthorized") showLogin("Could not reach the admin API: " + e.message);
  }
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const given = $("token").value;
  $("token").value = "";
  login(given);
});
$("logout").addEventListener("click", () => logout(""));
$("reload").addEventListener("click", () =>
  act(() => api("POST", "/admin/reload"), (r) =>
    r.changed ? `Policy reloaded: ${r.revision}` : `Policy unchanged (${r.revision})`));

// ---- actions ----

async function act(call, describe) {
  const notice = $("notice");
  try {
    const r = await call();
    notice.textContent = describe(r);
    notice.className = "notice";
  } catch (e) {
    notice.textContent = "Failed: " + e.message;
    notice.className = "notice error";
  }
  refresh();
}

function drain(id, drained) {
  const what = drained ? "undrain" : "drain";
  act(() => api("POST", `/admin/shards/${encodeURIComponent(id)}/${what}`),
    () => `Shard ${id} ${drained ? "undrained" : "drained"}`);
}

function fault(id, mode) {
  act(() => api("POST", `/admin/shards/${encodeURIComponent(id)}/fault`, { mode }),
    () => `Shard ${id}: fault ${mode}`);
}

// ---- refresh ----

let refreshing = false;
async function refresh() {
  if (!token || refreshing) return;
  refreshing = true;
  try {
    const [status, history, events, decisions] = await Promise.all([
      api("GET", "/admin/status"),
      api("GET", "/admin/history"),
      api("GET", "/admin/events"),
      api("GET", "/admin/decisions?limit=40"),
    ]);
    render(status, history, events, decisions);
  } catch (e) {
    if (e.message !== "unauthorized") $("notice").textContent = "Update failed: " + e.message;
  } finally {
    refreshing = false;
  }
}

// Re-rendering replaces nodes; keep keyboard focus on the control that had it.
function keepingFocus(fn) {
  const key = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.key : undefined;
  fn();
  if (key) {
    const again = document.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}

function render(status, history, events, decisions) {
  keepingFocus(() => {
    renderPolicy(status);
    renderFleet(status);
    if (history) { renderNow(status, history); renderCharts(history); }
    if (events) renderEvents(events);
    if (decisions) renderDecisions(decisions);
  });
}

function renderPolicy(status) {
  const p = status.policy || {};
  const parts = [
    el("span", {}, `policy ${p.revision || "?"}`),
    p.loaded_at_unix_ms ? ` · loaded ${clock(p.loaded_at_unix_ms)}` : "",
    ` · reloads ${p.reloads_applied || 0} applied, ${p.reloads_rejected || 0} rejected`,
    p.last_error ? el("span", { class: "bad" }, ` · last reload rejected: ${p.last_error}`) : "",
    ` · ${status.ready ? "ready" : "NOT READY"}${status.stopping ? " · stopping" : ""}`,
    ` · v${status.version}`,
    ...clusterParts(status),
    ...discoveryParts(status),
  ];
  $("policy").replaceChildren(...parts);
}

// `[cluster]`: the store's state, the replicas seen, and each limited tenant's use across
// them (what is left in the store plus what this replica holds).
function clusterParts(status) {
  const c = status.cluster;
  if (!c) return [];
  const replicas = (c.replicas || []).map((r) => r.id).join(", ");
  const tenants = ((status.admission || {}).tenants || [])
    .filter((t) => t.rpm !== null || t.tpm !== null)
    .map((t) => [
      t.id,
      t.rpm !== null ? ` rpm ${fmt(t.rpm_remaining)}/${fmt(t.rpm)} left` : "",
      t.tpm !== null ? ` tpm ${fmt(t.tpm_remaining)}/${fmt(t.tpm)} left` : "",
    ].join(""))
    .join("; ");
  const state = c.state === "up"
    ? el("span", { class: "good", id: "cluster-state" }, "store up")
    : el("span", { class: "bad", id: "cluster-state" },
      c.state === "down" ? `store down, limits local (${c.last_error || "no answer"})` : "store not reached yet");
  return [
    el("br"),
    `cluster ${c.replica_id}: `, state,
    ` · ${(c.replicas || []).length} replica(s): ${replicas}`,
    tenants ? ` · ${tenants}` : "",
  ];
}

// Discovered pools: what each looks up, the shards it has from DNS, and whether the
// lookups answer (failing ones keep the shards last found).
function discoveryParts(status) {
  const pools = status.discovery || [];
  if (!pools.length) return [];
  return [el("br"), "discovery: ", ...pools.flatMap((d, i) => [
    i ? " · " : "",
    `${d.pool} ${d.target}: ${d.shards} shard(s), `,
    d.error
      ? el("span", { class: "bad", id: `discovery-${d.pool}` },
        `lookups failing (${d.failures} in a row: ${d.error}), keeping the shards last found`)
      : el("span", { class: "good", id: `discovery-${d.pool}` },
        d.last_ok_unix_ms ? `resolved ${clock(d.last_ok_unix_ms)}` : "not resolved yet"),
  ])];
}

function renderNow(status, h) {
  const last = (xs) => (xs.length ? xs[xs.length - 1] : null);
  const mean = (xs, n) => {
    const t = xs.slice(-n).filter((x) => x !== null);
    return t.length ? t.reduce((a, b) => a + b, 0) / t.length : null;
  };
  const healthy = status.shards.filter((s) => s.state === "healthy").length;
  const stats = [
    ["requests / s (10 s)", fmt(mean(h.requests_per_s, 10), 1)],
    ["refused / s (10 s)", fmt(mean(h.refused_per_s, 10), 1)],
    ["goodput / s (10 s)", fmt(mean(h.goodput_per_s, 10), 1)],
    ["TTFT p99, last second", last(h.ttft_p99_ms) === null ? "–" : fmt(last(h.ttft_p99_ms)) + " ms"],
    ["healthy shards", `${healthy} / ${status.shards.length}`],
    ["in flight", fmt(status.in_flight)],
  ];
  $("now").replaceChildren(...stats.map(([k, v]) =>
    el("div", { class: "stat" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))));
}

function chart(svg, series, opts = {}) {
  const W = 600, H = 140, L = 40, B = 16, T = 6;
  const all = series.flatMap((s) => s.filter((v) => v !== null && !Number.isNaN(v)));
  const max = Math.max(opts.min || 1, ...all) * 1.1;
  // A fixed 15-minute axis, newest point at the right edge.
  const n = Math.max(opts.points || 900, ...series.map((s) => s.length));
  const x = (i, len) => L + ((W - L - 4) * (i + (n - len))) / (n - 1);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const nodes = [];
  for (const f of [0, 0.5, 1]) {
    nodes.push(svgEl("line", { class: "grid", x1: L, x2: W - 4, y1: y(max * f / 1.1), y2: y(max * f / 1.1) }));
    const label = svgEl("text", { class: "axis", x: 2, y: y(max * f / 1.1) + 3 });
    label.textContent = fmt(max * f / 1.1, max < 10 ? 1 : 0);
    nodes.push(label);
  }
  const span = svgEl("text", { class: "axis", x: L, y: H - 3 });
  span.textContent = `${Math.round(n / 60)} min ago`;
  const now = svgEl("text", { class: "axis", x: W - 30, y: H - 3 });
  now.textContent = "now";
  nodes.push(span, now);
  series.forEach((s, k) => {
    let d = "", pen = false;
    s.forEach((v, i) => {
      if (v === null || Number.isNaN(v)) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(i, s.length).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) nodes.push(svgEl("path", { class: "s" + k, d }));
  });
  svg.replaceChildren(...nodes);
}

function renderCharts(h) {
  chart($("chart-requests"), [h.requests_per_s, h.refused_per_s]);
  chart($("chart-goodput"), [h.goodput_per_s]);
  chart($("chart-ttft"), [h.ttft_p99_ms], { min: 10 });
}

function shardCard(s, demo) {
  const limit = s.effective_limit_tokens || s.admission_limit_tokens || 1;
  const load = Math.min(1, s.inflight_tokens / limit);
  const gpu = s.gpu;
  const m = s.last_minute || {};
  const kv = [
    ["load", `${fmt(s.inflight_tokens)} of ${fmt(limit)} tokens (limit; capacity ${fmt(s.capacity_tps)} tok/s), ${fmt(s.inflight_requests)} req`],
    ["engine", `queue ${fmt(s.queue_depth, 0)}, running ${fmt(s.running, 0)}, KV ${pct(s.kv_usage)}`],
    ["last minute", `${fmt(m.requests_per_s, 1)} req/s, TTFT p50 ${fmt(m.ttft_p50_ms)} ms, p99 ${fmt(m.ttft_p99_ms)} ms`],
  ];
  if (gpu) {
    const used = gpu.memory_total_bytes - gpu.memory_free_bytes;
    kv.push(["GPU", `${gpu.verdict}: ${gib(used)} / ${gib(gpu.memory_total_bytes)} GiB, util ${fmt(gpu.utilization_gpu_pct)} %, ${fmt(gpu.temperature_c)} °C`]);
    if (gpu.reasons && gpu.reasons.length) kv.push(["GPU why", gpu.reasons.join("; ")]);
  }
  // Through CSSOM: the page's CSP allows no inline style attribute.
  const fill = el("span", {});
  fill.style.width = `${(load * 100).toFixed(1)}%`;
  const actions = el("div", { class: "actions" },
    el("button", {
      type: "button", "data-key": `drain-${s.id}`, class: s.drained ? "" : "danger",
      onclick: () => drain(s.id, s.drained),
    }, s.drained ? "Undrain" : "Drain"));
  const faults = demo ? el("div", { class: "faults", role: "group", "aria-label": `faults for ${s.id}` },
    FAULTS.map((f) => el("button", {
      type: "button", "data-key": `fault-${s.id}-${f}`, "data-shard": s.id, "data-fault": f,
      title: `inject ${f} into ${s.id}`, onclick: () => fault(s.id, f),
    }, f))) : null;
  return el("article", { class: `shard ${s.state}`, "data-shard": s.id, "data-state": s.state },
    el("header", {},
      el("span", { class: "id" }, s.id),
      el("span", { class: `badge ${s.state}`, "data-role": "state" }, s.state)),
    el("div", { class: "reason" }, s.reason || ""),
    el("div", { class: "bar" + (load >= 1 ? " full" : ""), role: "meter", "aria-valuemin": 0, "aria-valuemax": limit, "aria-valuenow": s.inflight_tokens, "aria-label": `load of ${s.id}` },
      fill),
    el("dl", { class: "kv" }, kv.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    actions, faults);
}

function renderFleet(status) {
  const regions = new Map();
  for (const s of status.shards) {
    if (!regions.has(s.region)) regions.set(s.region, new Map());
    const pools = regions.get(s.region);
    if (!pools.has(s.pool)) pools.set(s.pool, []);
    pools.get(s.pool).push(s);
  }
  const nodes = [];
  // Home region first, then the others by name.
  const order = [...regions.keys()].sort((a, b) =>
    (b === status.home_region) - (a === status.home_region) || a.localeCompare(b));
  for (const region of order) {
    const pools = regions.get(region);
    const shards = [...pools.values()].flat();
    const up = shards.filter((s) => s.state === "healthy" || s.state === "degraded").length;
    nodes.push(el("section", { class: "region", "data-region": region },
      el("h3", {}, `Region ${region} `,
        el("span", { class: "home" }, `${region === status.home_region ? "(home) " : ""}${up} of ${shards.length} shards serving`)),
      [...pools].map(([pool, list]) => el("div", { class: "pool" },
        el("h4", {}, `Pool ${pool}`),
        el("div", { class: "shards" }, list.map((s) => shardCard(s, status.demo)))))));
  }
  $("fleet").replaceChildren(...nodes);
}

function renderEvents(e) {
  const items = [
    ...(e.events || []).map((t) => ({ at: t.at_unix_ms, text: `${t.shard}: ${t.from} → ${t.to} — ${t.reason}`, cls: t.to === "ejected" ? "s-bad" : t.to === "healthy" ? "s-ok" : "s-warn" })),
    ...(e.operations || []).map((o) => ({ at: o.at_unix_ms, text: `${o.kind.replace("_", " ")} ${o.subject}: ${o.detail}`, cls: o.kind === "reload_rejected" ? "s-bad" : "" })),
  ].sort((a, b) => b.at - a.at).slice(0, 100);
  $("events").replaceChildren(...(items.length ? items.map((i) =>
    el("li", { class: i.cls }, el("time", {}, clock(i.at)), i.text)) : [el("li", {}, "No events yet.")]));
}

function candidatesTable(list) {
  return el("table", {},
    el("thead", {}, el("tr", {}, ["shard", "region", "tier", "score", "excluded"].map((h) => el("th", {}, h)))),
    el("tbody", {}, list.map((c) => el("tr", { class: c.excluded ? "excluded" : "" },
      el("td", {}, c.shard), el("td", {}, c.region), el("td", { class: "num" }, c.tier),
      el("td", { class: "num" }, fmt(c.score, 4)), el("td", {}, c.excluded || "")))));
}

function renderDecisions(d) {
  const rows = d.decisions.map((x) => {
    const attempts = x.attempts.map((a) => `${a.shard} ${a.outcome || "…"} (${fmt(a.ms, 1)} ms)`).join(" → ");
    const cls = x.status >= 200 && x.status < 300 ? "s-ok" : x.status === 429 ? "s-warn" : "s-bad";
    const details = el("details", { "data-request": x.id },
      el("summary", { "data-key": `decision-${x.id}` }, `${clock(x.at_unix_ms)} ${x.id.slice(0, 12)}`),
      el("div", {}, `tenant ${x.tenant || "–"} (${x.priority}), ${fmt(x.estimated_tokens)} tokens est., queue ${x.queue_wait_ms === null ? "none" : fmt(x.queue_wait_ms, 1) + " ms"}, total ${fmt(x.total_ms, 1)} ms${x.refusal ? ", refused: " + x.refusal : ""}`),
      x.candidates.length ? candidatesTable(x.candidates) : el("div", {}, "No pick was made."),
      x.attempts.filter((a) => a.candidates).map((a) => el("div", {}, `retry on ${a.shard} saw:`, candidatesTable(a.candidates))));
    return el("tr", {},
      el("td", {}, details), el("td", {}, x.model || "–"),
      el("td", { class: "num " + cls }, x.status), el("td", {}, attempts || "–"));
  });
  const open = new Set([...document.querySelectorAll("#decisions details[open]")].map((e) => e.dataset.request));
  $("decisions").replaceChildren(el("div", { class: "decisions-wrap" }, el("table", {},
    el("thead", {}, el("tr", {}, ["request", "model", "status", "attempts"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows))));
  for (const id of open) {
    const again = document.querySelector(`#decisions details[data-request="${CSS.escape(id)}"]`);
    if (again) again.open = true;
  }
}

if (token) login(token); else showLogin("");
