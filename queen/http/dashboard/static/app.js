// The Apiary dashboard: reads /api/* of the queen that served it, streams its events
// (/api/stream, server-sent events read through fetch so the admin token can go in a
// header, which EventSource cannot send), and acts through the same admin RPCs as the CLI.
// Everything shown comes from the cluster, so it is written as text, never as HTML.
"use strict";

const TOKEN_KEY = "apiary.dashboard.token";
const REFRESH_MS = 3000;
const REQUESTS_MS = 5000;
const MAX_EVENTS = 200;
const REQUEST_KINDS = new Set([
  "REQUEST_QUEUED", "REQUEST_STARTED", "REQUEST_COMPLETED", "REQUEST_FAILED",
  "REQUEST_CANCELLED",
]);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  cluster: null,
  points: [],
  interval: 5,
  span: 900,
  clockOffset: 0, // the queen's clock minus ours, in seconds
  events: [],
  stream: null, // the AbortController of the open stream
  retryMs: 1000,
  refreshQueued: null,
  blocked: false, // waiting for a token
  live: false, // the stream is open
};

// ---- small helpers ----------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function cell(label, ...children) {
  return el("td", { "data-label": label }, ...children);
}

function short(name, prefix) {
  return String(name || "").replace(prefix, "");
}

function num(value) {
  const n = Number(value);
  return Number.isFinite(n) ? n : 0;
}

function seconds(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.round(value / 60)} min`;
}

function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = num(value);
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${n.toFixed(n < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

function when(text) {
  // RFC 3339 with up to 9 fractional digits; Date.parse wants at most 3.
  if (!text) return null;
  const ms = Date.parse(String(text).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isFinite(ms) ? ms / 1000 : null;
}

function clockTime(epochSeconds) {
  if (epochSeconds === null) return "—";
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function percent(value) {
  return `${(value * 100).toFixed(value >= 0.999 || value === 0 ? 0 : 1)} %`;
}

// ---- talking to the queen ---------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const out = { ...extra };
  if (state.token) out.Authorization = `Bearer ${state.token}`;
  return out;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = (body && body.error) || {};
  const failed = new ApiFailure(response.status, error.message || `HTTP ${response.status}`,
    error.code || "");
  if (failed.code === "invalid_api_key" || failed.code === "permission_denied") {
    askForToken(failed.message);
  }
  return failed;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers), cache: "no-store" });
  } catch (err) {
    throw new ApiFailure(0, `the queen cannot be reached (${err.message})`, "unreachable");
  }
  if (!response.ok) throw await failure(response);
  return response.json();
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
}

// ---- the token --------------------------------------------------------------

function askForToken(reason) {
  state.blocked = true;
  $("token-reason").textContent = state.token
    ? `The queen refused this token: ${reason}`
    : `This queen requires an admin token: ${reason}`;
  $("token-panel").hidden = false;
  $("token-change").hidden = true;
  setConnection("token");
  stopStream();
}

function useToken(event) {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-input").value = "";
  $("token-panel").hidden = true;
  state.blocked = false;
  start();
}

// ---- notices and confirmations ---------------------------------------------

function notify(message, ok) {
  const notice = $("notice");
  notice.textContent = message;
  notice.dataset.kind = ok ? "ok" : "error";
  notice.hidden = false;
}

function confirmAction(text, label) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = label;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
  });
}

async function act(text, label, path, body, done) {
  if (!(await confirmAction(text, label))) return;
  notify(`${label}: working…`, true);
  try {
    const answer = await post(path, body);
    notify(done(answer), true);
  } catch (err) {
    notify(`${label} refused: ${err.message}`, false);
  }
  refreshSoon(0);
}

function workerPath(id, verb) {
  return `/api/workers/${encodeURIComponent(id)}/${verb}`;
}

function drainWorker(worker) {
  const undrain = worker.drained;
  const verb = undrain ? "undrain" : "drain";
  const text = undrain
    ? `Resume routing new requests to worker ${worker.id} (${worker.model})?`
    : `Stop routing new requests to worker ${worker.id} (${worker.model})? Requests in flight finish.`;
  act(text, undrain ? "Undrain worker" : "Drain worker", workerPath(worker.id, verb), {},
    (answer) => `Worker ${answer.worker.id} ${answer.worker.drained ? "drained" : "undrained"}.`);
}

function retireWorker(worker, force) {
  const text = force
    ? `Stop worker ${worker.id} (${worker.model}) at once with SIGKILL? Requests in flight fail.`
    : `Stop worker ${worker.id} (${worker.model}) gracefully? Requests in flight finish first.`;
  act(text, force ? "Force-retire worker" : "Retire worker", workerPath(worker.id, "retire"),
    { force }, (answer) => `Worker ${answer.worker.id} retired.`);
}

function drainHive(hive) {
  const undrain = hive.drained;
  const text = undrain
    ? `Resume routing new requests to the workers of hive ${hive.id}?`
    : `Stop routing new requests to every worker of hive ${hive.id}? Requests in flight finish.`;
  act(text, undrain ? "Undrain hive" : "Drain hive",
    `/api/hives/${encodeURIComponent(hive.id)}/${undrain ? "undrain" : "drain"}`, {},
    (answer) => `Hive ${answer.hive.id} ${answer.hive.drained ? "drained" : "undrained"}.`);
}

// ---- the summary ------------------------------------------------------------

function card(title, value, detail, problem) {
  return el("div", { class: problem ? "card problem" : "card" },
    el("h3", { text: title }), el("p", { class: "value", text: value }),
    el("p", { class: "detail", text: detail }));
}

function renderSummary(cluster) {
  const hives = cluster.hives;
  const healthy = hives.filter((h) => h.health === "HIVE_HEALTH_HEALTHY").length;
  const byState = {};
  let slotsTotal = 0;
  let slotsUsed = 0;
  for (const worker of cluster.workers) {
    const name = short(worker.state, "WORKER_STATE_");
    byState[name] = (byState[name] || 0) + 1;
  }
  for (const hive of hives) {
    slotsTotal += num(hive.slots_total);
    slotsUsed += num(hive.slots_in_use);
  }
  const queued = cluster.models.reduce((sum, model) => sum + num(model.queued), 0);
  const queen = cluster.queen;
  const done = num(queen.requests_completed);
  const failed = num(queen.requests_failed);
  const states = ["LOADING", "IDLE", "BUSY", "STOPPING", "FAILED"]
    .filter((name) => byState[name]).map((name) => `${byState[name]} ${name}`).join(", ");
  $("summary").replaceChildren(
    card("Hives", `${healthy} / ${cluster.hives_total} healthy`,
      hives.filter((h) => h.drained).length ? "some drained" : "", healthy < hives.length),
    card("Workers", String(cluster.workers_total), states || "none", Boolean(byState.FAILED)),
    card("Slots in use", `${slotsUsed} / ${slotsTotal}`, "of workers ready to serve"),
    card("Queued", String(queued), "requests waiting for a slot", queued > 0),
    card("Requests", `${done} completed`,
      `${failed} failed, ${num(queen.requests_cancelled)} cancelled, `
      + `${num(queen.requests_refused)} refused`
      + (done + failed ? ` · success ${percent(done / (done + failed))}` : ""), failed > 0),
    card("Queen", queen.degraded ? "DEGRADED" : "OK",
      (queen.problems || []).join("; ") || "no problems", queen.degraded),
  );
}

// ---- hives, workers, models -------------------------------------------------

const HEALTH_MARK = { HEALTHY: "✓", DEGRADED: "!", UNHEALTHY: "✕" };
const STATE_MARK = { IDLE: "○", BUSY: "●", LOADING: "…", STOPPING: "↓", FAILED: "✕" };

function badge(kind, name, text) {
  const mark = (kind === "health" ? HEALTH_MARK : STATE_MARK)[name] || "?";
  return el("span", { class: `badge ${kind}-${name}`, "data-value": name }, `${mark} ${text || name}`);
}

function button(label, title, onClick, danger) {
  return el("button", { type: "button", class: danger ? "small danger" : "small",
    "aria-label": title, title, onclick: onClick }, label);
}

function hiveRow(hive) {
  const health = short(hive.health, "HIVE_HEALTH_");
  const res = hive.resources || {};
  const total = num(res.memory_total_bytes);
  const used = total - num(res.memory_available_bytes);
  const problems = (hive.problems || []).join("; ");
  return el("tr", { "data-hive": hive.id },
    cell("Hive", el("strong", { text: hive.id }), el("div", { class: "sub", text: hive.address })),
    cell("Health", badge("health", health),
      hive.health_reason ? el("div", { class: "sub", text: hive.health_reason }) : null,
      problems ? el("div", { class: "sub problem-text", text: problems }) : null),
    cell("Heartbeat", `${seconds(num(hive.heartbeat_age_seconds))} ago`),
    cell("Load", `${num(res.load_1m).toFixed(2)} (${num(res.cpu_count)} CPUs)`),
    cell("Memory", total ? `${bytes(used)} / ${bytes(total)} used` : "—"),
    cell("Workers", String(num(hive.worker_count))),
    cell("Slots", `${num(hive.slots_in_use)} / ${num(hive.slots_total)}`),
    cell("Routing", hive.drained ? el("span", { class: "badge drained", text: "⏸ DRAINED" }) : "open"),
    cell("Actions",
      button(hive.drained ? "Undrain" : "Drain", `${hive.drained ? "Undrain" : "Drain"} hive ${hive.id}`,
        () => drainHive(hive)),
      button("Spawn…", `Spawn a worker on hive ${hive.id}`, () => spawnOn(hive.id))),
  );
}

function workerState(worker) {
  const name = short(worker.state, "WORKER_STATE_");
  const parts = [];
  if (name === "LOADING") {
    const progress = num(worker.load_progress);
    parts.push(badge("state", name, progress > 0 ? `LOADING ${Math.round(progress * 100)}%` : "LOADING"));
    if (progress > 0) parts.push(el("progress", { max: "1", value: String(progress) }));
  } else {
    parts.push(badge("state", name));
  }
  if (worker.drained) parts.push(el("span", { class: "badge drained", text: "⏸ DRAINED" }));
  const why = worker.failure_reason || (name === "LOADING" ? worker.status_detail : "");
  if (why) parts.push(el("div", { class: "sub", text: why }));
  return parts;
}

function workerRow(worker) {
  const name = short(worker.state, "WORKER_STATE_");
  const ready = name === "IDLE" || name === "BUSY";
  const total = num(worker.slots_total);
  const stats = worker.stats || {};
  const finished = num(worker.requests_completed) + num(worker.requests_failed);
  const open = num(worker.circuit_open_seconds);
  return el("tr", { "data-worker": worker.id, "data-state": name, "data-drained": String(Boolean(worker.drained)) },
    cell("Worker", el("strong", { text: worker.id }), el("div", { class: "sub", text: worker.backend })),
    cell("Hive", worker.hive_id),
    cell("Model", worker.model),
    cell("State", ...workerState(worker)),
    cell("Slots", ready ? `${total - num(worker.slots_available)} / ${total} used` : `– / ${total}`),
    cell("Success", finished ? percent(num(stats.success_rate)) : "—",
      finished ? el("div", { class: "sub", text: `${finished} requests` }) : null),
    cell("p50", num(worker.requests_completed) ? seconds(num(stats.p50_duration_seconds)) : "—"),
    cell("Circuit", open > 0 ? el("span", { class: "badge circuit-open", text: `✕ open ${Math.ceil(open)} s` }) : "closed"),
    cell("Actions",
      button(worker.drained ? "Undrain" : "Drain", `${worker.drained ? "Undrain" : "Drain"} worker ${worker.id}`,
        () => drainWorker(worker)),
      button("Retire", `Retire worker ${worker.id} gracefully`, () => retireWorker(worker, false)),
      button("Kill", `Force-retire worker ${worker.id}`, () => retireWorker(worker, true), true)),
  );
}

function modelRow(model) {
  return el("tr", { "data-model": model.name },
    cell("Model", el("strong", { text: model.name })),
    cell("Idle", String(num(model.idle))),
    cell("Busy", String(num(model.busy))),
    cell("Loading", String(num(model.loading))),
    cell("Failed", String(num(model.failed))),
    cell("Queued", String(num(model.queued))),
    cell("In catalogs of", (model.hives || []).join(", ") || "—"),
  );
}

function fill(table, rows, empty, columns) {
  const body = $(table).tBodies[0];
  if (!rows.length) {
    rows = [el("tr", { class: "empty" }, el("td", { colspan: String(columns), text: empty }))];
  }
  body.replaceChildren(...rows);
}

function countText(shown, total) {
  return shown < total ? `(showing ${shown} of ${total})` : `(${total})`;
}

function renderCluster(cluster) {
  renderSummary(cluster);
  fill("hives", cluster.hives.map(hiveRow), "No hive has joined yet.", 9);
  fill("workers", cluster.workers.map(workerRow), "No workers.", 9);
  fill("models", cluster.models.map(modelRow), "No models yet.", 7);
  $("hives-count").textContent = countText(cluster.hives.length, cluster.hives_total);
  $("workers-count").textContent = countText(cluster.workers.length, cluster.workers_total);
  renderSpawnChoices(cluster);
  renderModelFilter(cluster);
}

// ---- spawning ---------------------------------------------------------------

function setOptions(select, values) {
  const current = select.value;
  const same = select.options.length === values.length
    && values.every(([value, label], i) => select.options[i].value === value && select.options[i].textContent === label);
  if (same) return;
  select.replaceChildren(...values.map(([value, label]) => el("option", { value, text: label })));
  if (values.some(([value]) => value === current)) select.value = current;
}

function renderSpawnChoices(cluster) {
  const hiveSelect = $("spawn-hive");
  setOptions(hiveSelect, cluster.hives.map((h) => [h.id, `${h.id} (${short(h.health, "HIVE_HEALTH_").toLowerCase()})`]));
  const hive = cluster.hives.find((h) => h.id === hiveSelect.value);
  const backends = hive ? hive.backends || [] : [];
  setOptions($("spawn-backend"), [["", "hive's choice for the model"], ...backends.map((b) => [b, b])]);
  const known = cluster.models.map((m) => m.name).sort();
  const list = $("known-models");
  if (list.dataset.names !== known.join("\n")) {
    list.dataset.names = known.join("\n");
    list.replaceChildren(...known.map((name) => el("option", { value: name })));
  }
}

function spawnOn(hiveId) {
  $("spawn-hive").value = hiveId;
  if (state.cluster) renderSpawnChoices(state.cluster);
  $("spawn-model").focus();
  $("spawn-form").scrollIntoView({ block: "center" });
}

function readOptions(text) {
  const options = {};
  for (const line of text.split(/\n|,/)) {
    const item = line.trim();
    if (!item) continue;
    const at = item.indexOf("=");
    if (at <= 0) throw new Error(`option ${JSON.stringify(item)} is not key=value`);
    options[item.slice(0, at).trim()] = item.slice(at + 1).trim();
  }
  return options;
}

function spawn(event) {
  event.preventDefault();
  let body;
  try {
    body = {
      hive_id: $("spawn-hive").value,
      model: $("spawn-model").value.trim(),
      backend: $("spawn-backend").value,
      slots: Number.parseInt($("spawn-slots").value, 10) || 1,
      restart: $("spawn-restart").value,
      tags: $("spawn-tags").value.split(",").map((t) => t.trim()).filter(Boolean),
      options: readOptions($("spawn-options").value),
    };
  } catch (err) {
    notify(`Spawn: ${err.message}`, false);
    return;
  }
  const text = `Spawn a worker of model ${body.model} on hive ${body.hive_id} `
    + `(backend ${body.backend || "chosen by the hive"}, ${body.slots} slot${body.slots === 1 ? "" : "s"})?`;
  act(text, "Spawn worker", "/api/workers", body,
    (answer) => `Worker ${answer.worker.id} spawned on ${answer.worker.hive_id}: `
      + `${short(answer.worker.state, "WORKER_STATE_")}.`);
}

// ---- the chart --------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 320;
const HEIGHT = 130;
const PAD = { left: 38, right: 6, top: 8, bottom: 18 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value, floor) {
  const top = Math.max(value, floor);
  const power = 10 ** Math.floor(Math.log10(top));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= top) return step * power;
  return 10 * power;
}

function segments(points, value) {
  // Runs of consecutive points with a value; a missing value or a gap in time breaks a run.
  const runs = [];
  let run = [];
  let previous = null;
  for (const point of points) {
    const v = value(point);
    const gap = previous !== null && point.time - previous > state.interval * 2.5;
    if (v === null || v === undefined || gap) {
      if (run.length) runs.push(run);
      run = [];
    }
    if (v !== null && v !== undefined) run.push([point.time, v]);
    previous = point.time;
  }
  if (run.length) runs.push(run);
  return runs;
}

function drawLine(chart, css, runs, x, y) {
  for (const run of runs) {
    if (run.length === 1) {
      const [t, v] = run[0];
      chart.append(svg("circle", { class: `dot ${css}`, cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2 }));
      continue;
    }
    const d = run.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    chart.append(svg("path", { class: `line ${css}`, d }));
  }
}

function drawChart(id, title, lines, format, floor) {
  const figure = $(id);
  const now = Date.now() / 1000 + state.clockOffset;
  const from = now - state.span;
  const points = state.points.filter((p) => p.time >= from);
  let top = 0;
  for (const line of lines) for (const p of points) top = Math.max(top, line.value(p) ?? 0);
  top = niceMax(top, floor);
  const x = (t) => PAD.left + ((t - from) / state.span) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);
  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `${title}, last 15 minutes`, "data-points": points.length });
  for (const fraction of [0, 0.5, 1]) {
    chart.append(svg("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(top * fraction), y2: y(top * fraction) }));
    chart.append(svg("text", { class: "axis", x: PAD.left - 4, y: y(top * fraction) + 3, "text-anchor": "end" }, format(top * fraction)));
  }
  for (const [minutes, anchor] of [[15, "start"], [10, "middle"], [5, "middle"], [0, "end"]]) {
    chart.append(svg("text", { class: "axis", x: x(now - minutes * 60), y: HEIGHT - 4, "text-anchor": anchor }, minutes ? `−${minutes} min` : "now"));
  }
  for (const line of lines) drawLine(chart, line.css, segments(points, line.value), x, y);
  const latest = points.length ? points[points.length - 1] : null;
  const caption = figure.querySelector("figcaption");
  caption.replaceChildren(el("strong", { text: title }), " ",
    ...lines.map((line) => el("span", { class: `key ${line.css}`, "data-series": line.css,
      "data-latest": latest && line.value(latest) !== null ? String(line.value(latest)) : "" },
    `${line.label} ${latest && line.value(latest) !== null ? format(line.value(latest)) : "—"}`)));
  figure.querySelector("svg")?.remove();
  figure.append(chart);
}

function renderChart() {
  const ms = (v) => (v === null ? null : v * 1000);
  drawChart("chart-rate", "Requests/s", [
    { label: "all", css: "rate", value: (p) => p.requests_per_second },
    { label: "failed", css: "failed", value: (p) => p.failed_per_second },
  ], (v) => (v >= 10 ? v.toFixed(0) : v.toFixed(1)), 1);
  drawChart("chart-ttft", "Time to first token", [
    { label: "p50", css: "p50", value: (p) => ms(p.ttft_p50) },
    { label: "p90", css: "p90", value: (p) => ms(p.ttft_p90) },
  ], (v) => `${v >= 10 ? v.toFixed(0) : v.toFixed(1)} ms`, 10);
  drawChart("chart-queue", "Queue depth", [
    { label: "deepest", css: "queue", value: (p) => p.queue_depth },
  ], (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)), 1);
  $("chart-hint").textContent = `(a point every ${state.interval} s)`;
}

function addPoint(point) {
  state.points.push(point);
  const from = point.time - state.span;
  while (state.points.length && state.points[0].time < from) state.points.shift();
  renderChart();
}

// ---- events -----------------------------------------------------------------

function eventSubject(event) {
  return [event.hive_id && `hive ${event.hive_id}`, event.worker_id && `worker ${event.worker_id}`,
    event.model && `model ${event.model}`, event.request_id && `request ${event.request_id.slice(0, 12)}`]
    .filter(Boolean).join(" · ");
}

function eventDetail(event) {
  const parts = [];
  const from = short(event.previous_state, "WORKER_STATE_");
  const to = short(event.state, "WORKER_STATE_");
  if (to !== "UNSPECIFIED") parts.push(from !== "UNSPECIFIED" ? `${from} → ${to}` : to);
  const health = short(event.health, "HIVE_HEALTH_");
  if (health !== "UNSPECIFIED") parts.push(health);
  if (num(event.duration_seconds)) parts.push(seconds(num(event.duration_seconds)));
  if (event.detail) parts.push(event.detail);
  return parts.join(" — ");
}

function renderEvents() {
  const withRequests = $("events-requests").checked;
  const shown = state.events.filter((e) => withRequests || !REQUEST_KINDS.has(e.kindName)).slice(0, 100);
  $("events").replaceChildren(...shown.map((event) => el("li", { "data-kind": event.kindName },
    el("time", { text: clockTime(when(event.time)) }), " ",
    el("span", { class: "kind", text: event.kindName.toLowerCase().replaceAll("_", " ") }), " ",
    el("span", { class: "subject", text: eventSubject(event) }), " ",
    el("span", { class: "sub", text: eventDetail(event) }))));
  $("events-empty").hidden = shown.length > 0;
}

function addEvents(batch) {
  for (const event of batch.events) {
    event.kindName = short(event.kind, "EVENT_KIND_");
    state.events.unshift(event);
  }
  if (batch.dropped) {
    state.events.unshift({ kindName: "EVENTS_DROPPED", time: new Date().toISOString(),
      detail: `${batch.dropped} event(s) not shown: this page fell behind` });
  }
  state.events.length = Math.min(state.events.length, MAX_EVENTS);
  renderEvents();
  refreshSoon(250);
}

// ---- request history --------------------------------------------------------

function renderModelFilter(cluster) {
  const select = $("requests-model");
  setOptions(select, [["", "all"], ...cluster.models.map((m) => [m.name, m.name])]);
}

function requestRow(record) {
  const status = short(record.status, "REQUEST_STATUS_");
  const accepted = when(record.accepted_at);
  const finished = when(record.finished_at);
  return el("tr", { "data-request": record.id, "data-status": status },
    cell("Accepted", clockTime(accepted)),
    cell("Request", el("code", { text: record.id.slice(0, 12) }),
      record.client_request_id ? el("div", { class: "sub", text: record.client_request_id }) : null),
    cell("Model", record.model),
    cell("Status", el("span", { class: `badge status-${status}`, text: status.toLowerCase().replaceAll("_", " ") })),
    cell("Worker", record.worker_id || "—"),
    cell("Tokens", String(num(record.completion_tokens))),
    cell("Took", accepted !== null && finished !== null ? seconds(finished - accepted) : "—"),
    cell("Error", record.error || ""),
  );
}

async function refreshRequests() {
  if (state.blocked) return;
  const query = new URLSearchParams({ limit: "50" });
  if ($("requests-status").value) query.set("status", $("requests-status").value);
  if ($("requests-model").value) query.set("model", $("requests-model").value);
  try {
    const answer = await api(`/api/requests?${query}`);
    fill("requests", answer.requests.map(requestRow), "No requests match.", 8);
  } catch (err) {
    if (!state.blocked) fill("requests", [], `Cannot read the history: ${err.message}`, 8);
  }
}

// ---- refreshing and streaming ----------------------------------------------

const CONNECTION = {
  connecting: ["…", "connecting"],
  live: ["●", "live"],
  reconnecting: ["○", "reconnecting"],
  token: ["✕", "admin token needed"],
};

function setConnection(kind, text) {
  const [mark, words] = CONNECTION[kind];
  const node = $("connection");
  node.dataset.state = kind;
  node.textContent = `${mark} ${text || words}`;
}

async function refresh() {
  if (state.blocked) return;
  try {
    state.cluster = await api("/api/cluster");
    renderCluster(state.cluster);
    if (state.live && $("connection").dataset.state !== "live") setConnection("live");
  } catch (err) {
    if (!state.blocked) setConnection("reconnecting", `cannot refresh: ${err.message}`);
  }
}

function refreshSoon(delay) {
  if (state.refreshQueued !== null) return;
  state.refreshQueued = setTimeout(() => {
    state.refreshQueued = null;
    refresh();
  }, delay);
}

async function loadSeries() {
  const answer = await api("/api/series");
  state.interval = answer.interval;
  state.span = answer.span;
  state.clockOffset = answer.now - Date.now() / 1000;
  state.points = answer.points;
  renderChart();
}

function handleMessage(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (kind === "events") addEvents(payload);
  else if (kind === "point") addPoint(payload);
  else if (kind === "bye") setConnection("reconnecting", `${payload.reason}; reconnecting…`);
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function openStream() {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  try {
    const response = await fetch("/api/stream", { headers: headers(), signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw await failure(response);
    await loadSeries();
    setConnection("live");
    state.live = true;
    state.retryMs = 1000;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleMessage(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (err) {
    state.live = false;
    if (controller.signal.aborted || state.blocked) return;
    setConnection("reconnecting", `${err.message}; reconnecting…`);
  }
  state.live = false;
  if (state.stream !== controller || state.blocked) return;
  if ($("connection").dataset.state === "live") setConnection("reconnecting");
  setTimeout(() => { if (state.stream === controller) openStream(); }, state.retryMs);
  state.retryMs = Math.min(state.retryMs * 2, 10000);
}

function start() {
  $("token-change").hidden = !state.token;
  refresh();
  refreshRequests();
  openStream();
}

function init() {
  $("token-form").addEventListener("submit", useToken);
  $("token-change").addEventListener("click", () => askForToken("enter another token"));
  $("spawn-form").addEventListener("submit", spawn);
  $("spawn-hive").addEventListener("change", () => state.cluster && renderSpawnChoices(state.cluster));
  $("requests-status").addEventListener("change", refreshRequests);
  $("requests-model").addEventListener("change", refreshRequests);
  $("events-requests").addEventListener("change", renderEvents);
  $("notice").addEventListener("click", () => { $("notice").hidden = true; });
  setInterval(refresh, REFRESH_MS);
  setInterval(refreshRequests, REQUESTS_MS);
  setInterval(renderChart, 5000); // the time axis moves even when no point comes
  renderChart();
  start();
}

document.addEventListener("DOMContentLoaded", init);
