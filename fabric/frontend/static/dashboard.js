// The live cluster page of a KV Fabric frontend: polls /v1/fabric/cluster and renders it.
// No framework and no build step; every value goes into the page as text (textContent), never
// as markup. With an API key the JSON answers 401: the page asks for the key, keeps it in this
// tab's sessionStorage and sends it as a bearer token.
"use strict";

const CLUSTER_URL = "/v1/fabric/cluster";
const POLL_MS = 2000;
const KEY_STORAGE = "kv-fabric-api-key";
const SVG_NS = "http://www.w3.org/2000/svg";

const byId = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function count(value) {
  return value == null ? "—" : Math.round(value).toLocaleString("en-US");
}

function millis(value) {
  if (value == null) return "—";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(1)} ms`;
}

function bytes(value) {
  if (value == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function rate(value) {
  return value == null ? "—" : `${bytes(value)}/s`;
}

function percent(value) {
  return value == null ? "—" : `${(100 * value).toFixed(1)}%`;
}

function setText(id, text) {
  byId(id).textContent = text;
}

function kindClass(kind) {
  return ["local", "prefill", "peer_hit", "node"].includes(kind) ? `kind-${kind}` : "kind-other";
}

function renderFrontend(front) {
  setText("requests", count(front.requests));
  setText("in-flight", count(front.in_flight));
  setText("queued", count(front.queued));
  setText("errors", count(front.errors));
  setText("ttft", millis(front.ttft_ms));
  setText("itl", millis(front.itl_ms));
  const hit = front.prefix_blocks.hit || 0;
  const miss = front.prefix_blocks.miss || 0;
  setText("prefix-hit-rate", hit + miss ? percent(hit / (hit + miss)) : "—");
  setText("kv-transfers", count(front.kv_transfers));
  setText("kv-transfer-ms", millis(front.kv_transfer_ms));
  setText("kv-bandwidth", rate(front.kv_transfer_bytes_per_s));
}

function renderRoutes(history, totals, now) {
  const svg = byId("routes-chart");
  svg.replaceChildren();
  const width = 600;
  const height = 120;
  const slots = Math.round(history.horizon_s / history.bucket_s);
  const slotWidth = width / slots;
  const peak = Math.max(1, ...history.buckets.map(
    (b) => history.kinds.reduce((sum, kind) => sum + (b.counts[kind] || 0), 0)));
  for (const bucket of history.buckets) {
    const age = Math.floor((now - bucket.start) / history.bucket_s);
    const x = width - (age + 1) * slotWidth;
    let y = height;
    for (const kind of history.kinds) {
      const n = bucket.counts[kind] || 0;
      if (!n) continue;
      const h = (n / peak) * (height - 4);
      y -= h;
      const rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("x", x + 1);
      rect.setAttribute("y", y);
      rect.setAttribute("width", Math.max(1, slotWidth - 2));
      rect.setAttribute("height", h);
      rect.setAttribute("class", kindClass(kind));
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `${kind}: ${n}`;
      rect.append(title);
      svg.append(rect);
    }
  }
  setText("routes-window",
    `(last ${Math.round(history.horizon_s / 60)} min, per ${history.bucket_s} s; peak ${peak})`);
  const legend = byId("routes-legend");
  legend.replaceChildren(...history.kinds.map((kind) => el("li", {"data-route": kind},
    el("span", {class: `swatch ${kindClass(kind)}`}), `${kind}`,
    el("b", {"data-field": "total"}, count(totals[kind])))));
}

function tierRow(tier) {
  const bar = el("div", {class: "bar"});
  const inUse = el("div", {class: "in-use"});
  const cached = el("div", {class: "cached"});
  const cap = tier.capacity || 1;
  inUse.style.width = `${(100 * tier.in_use) / cap}%`;
  cached.style.left = `${(100 * tier.in_use) / cap}%`;
  cached.style.width = `${(100 * tier.cached) / cap}%`;
  bar.append(inUse, cached);
  return el("div", {class: "tier", "data-tier": tier.tier},
    el("span", {title: tier.name}, tier.tier),
    bar,
    el("span", {},
      el("span", {"data-field": "tier-usage"},
        `${count(tier.used)} / ${count(tier.capacity)} blocks`), "; ",
      el("span", {"data-field": "tier-hits"},
        `${count(tier.hits)} of ${count(tier.hits + tier.misses)} hit (${percent(tier.hit_rate)})`)));
}

function workerRow(worker) {
  const tiers = el("td", {"data-field": "tiers"}, ...worker.tiers.map(tierRow));
  if (worker.shared) {
    const shared = worker.shared;
    tiers.append(el("div", {class: "tier", "data-tier": shared.tier},
      el("span", {title: "shared disk store"}, shared.tier), el("span"),
      el("span", {},
        el("span", {"data-field": "tier-usage"}, `${count(shared.blocks)} blocks indexed`), "; ",
        el("span", {"data-field": "tier-hits"},
          `${count(shared.hits)} of ${count(shared.hits + shared.misses)} hit` +
          ` (${percent(shared.hit_rate)})`))));
  }
  if (!worker.tiers.length && !worker.shared) tiers.append(worker.error || "—");
  const waiting = worker.active == null ? "—" : `${count(worker.active)} / ${count(worker.waiting)}`;
  const kvRead = worker.transferred_bytes == null
    ? "—" : `${bytes(worker.transferred_bytes)} (${rate(worker.kv_read_bytes_per_s)})`;
  return el("tr", {"data-worker": worker.id, title: worker.error || ""},
    el("td", {"data-field": "id"}, el("b", {}, worker.id)),
    el("td", {"data-field": "role"}, worker.role),
    el("td", {"data-field": "state", class: `state-${worker.state}`}, worker.state),
    el("td", {"data-field": "in-flight"}, count(worker.in_flight)),
    el("td", {"data-field": "active-waiting"}, waiting),
    tiers,
    el("td", {"data-field": "kv-read"}, kvRead),
    el("td", {"data-field": "tokens-per-s"},
      worker.tokens_per_s == null ? "—" : worker.tokens_per_s.toFixed(1)),
    el("td", {"data-field": "requests"}, count(worker.requests)));
}

function nodeCacheRow(cache) {
  const own = cache.used != null;  // its own metrics answered
  const leases = own
    ? `${count(cache.live_pins)} pins, ${count(cache.live_reservations)} reservations; ` +
      `${count(cache.expired_leases)} reclaimed`
    : "—";
  return el("tr", {"data-node-cache": cache.id, title: cache.error || ""},
    el("td", {"data-field": "id"}, el("b", {}, cache.id)),
    el("td", {"data-field": "node"}, cache.node || "—"),
    el("td", {"data-field": "state", class: `state-${cache.state}`}, cache.state),
    el("td", {"data-field": "usage"},
      cache.capacity == null ? "—" : `${own ? count(cache.used) : "—"} / ${count(cache.capacity)} blocks`),
    el("td", {"data-field": "hits"}, own
      ? `${count(cache.hits)} of ${count(cache.hits + cache.misses)} hit (${percent(cache.hit_rate)})`
      : "—"),
    el("td", {"data-field": "leases"}, leases),
    el("td", {"data-field": "clients"}, own ? count(cache.attached_clients) : "—"),
    el("td", {"data-field": "workers"}, cache.workers.join(", ") || "none"),
    el("td", {"data-field": "stored"}, count(cache.stored_blocks)),
    el("td", {"data-field": "loaded"}, count(cache.loaded_blocks)));
}

function render(data) {
  setText("model", data.model);
  renderFrontend(data.frontend);
  renderRoutes(data.routes_history, data.frontend.routes, data.generated_at);
  byId("workers").tBodies[0].replaceChildren(...data.workers.map(workerRow));
  setText("workers-count", `(${data.workers.length})`);
  const caches = data.node_caches || [];
  byId("node-caches-section").hidden = caches.length === 0;
  byId("node-caches").tBodies[0].replaceChildren(...caches.map(nodeCacheRow));
  setText("node-caches-count", `(${caches.length})`);
  const status = byId("status");
  status.className = "status";
  status.textContent = `updated ${new Date(data.generated_at * 1000).toLocaleTimeString()}`;
}

function showError(message) {
  const status = byId("status");
  status.className = "status error";
  status.textContent = message;
}

let timer = null;

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = key ? {Authorization: `Bearer ${key}`} : {};
  try {
    const response = await fetch(CLUSTER_URL, {headers, cache: "no-store"});
    if (response.status === 401) {
      byId("key-form").hidden = false;
      showError(key ? "the API key was refused" : "API key required");
      return;  // resumes when a key is given
    }
    if (!response.ok) throw new Error(`${CLUSTER_URL}: HTTP ${response.status}`);
    byId("key-form").hidden = true;
    render(await response.json());
  } catch (error) {
    showError(`no answer from the frontend (${error.message}); retrying`);
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, byId("key-input").value.trim());
    byId("key-input").value = "";
    poll();
  });
  poll();
});
