// homicro's dashboard: renders the registry's records and events from the
// server-sent events of /ui/stream (a `snapshot` of every record, then each
// `event` as it happens and a heartbeat's new countdown as a `ttl`), and
// reconnects by itself when serve restarts.
"use strict";

const MAX_EVENTS = 200;
// The only schemes made into links: any other (an OS protocol handler's)
// is shown as text, whatever a record says.
const LINKED_SCHEMES = new Set(["http", "https"]);

const $ = (id) => document.getElementById(id);
let board = { registry: {}, records: [] };
// name → the record shown, and its ttl cell (for the countdown).
let byName = new Map();
let ttlCells = new Map();
let source = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function roleOf(r) {
  return (r.record && typeof r.record.role === "string") ? r.record.role : r.name;
}

// "host:port" (IPv6 in brackets), and a URL when the record names a scheme.
function endpoint(rec) {
  let host = typeof rec.host === "string" ? rec.host : "";
  if (host.includes(":")) host = `[${host}]`;
  const where = Number.isInteger(rec.port) ? `${host}:${rec.port}` : host;
  const scheme = typeof rec.scheme === "string" ? rec.scheme.toLowerCase() : null;
  if (!scheme || !LINKED_SCHEMES.has(scheme)) {
    return scheme ? `${scheme}://${where}` : where;
  }
  const url = `${scheme}://${where}/`;
  return el("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, url);
}

function duration(ms) {
  let s = Math.max(0, Math.ceil(ms / 1000));
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  s %= 60;
  return h > 0 ? `${h} h ${m} m` : `${m} m ${s} s`;
}

function ttlText(r) {
  if (r.ttl_left_ms === null || r.ttl_left_ms === undefined) return "—";
  const left = r.ttl_left_ms - (performance.now() - r.at);
  return left <= 0 ? "expiring…" : duration(left);
}

function healthCell(r) {
  const h = r.health;
  if (!h) return el("td", { class: "c-health", "data-label": "health" }, "—");
  const label = h.failures > 0 ? `${h.status} ${h.failures}/${h.of}` : h.status;
  const td = el("td", { class: "c-health", "data-label": "health", title: h.check },
    el("span", { class: `pill ${h.status}` }, label));
  if (h.status !== "passing" || h.failures > 0) {
    td.append(el("span", { class: "detail" }, h.detail));
  }
  return td;
}

function row(r) {
  const rec = r.record || {};
  const ttl = el("td", { class: "c-ttl", "data-label": "ttl" }, ttlText(r));
  ttlCells.set(r.name, ttl);
  return el("tr", { "data-name": r.name },
    el("td", { class: "c-name", "data-label": "name" }, r.name),
    el("td", { class: "c-endpoint", "data-label": "endpoint" }, endpoint(rec)),
    el("td", { class: "c-role", "data-label": "role" }, roleOf(r)),
    el("td", { class: "c-version", "data-label": "version" },
      typeof rec.version === "string" ? rec.version : "—"),
    ttl,
    healthCell(r),
    el("td", { class: "c-owner", "data-label": "owner" }, r.owner || "—"));
}

function matches(r, words) {
  if (words.length === 0) return true;
  const rec = r.record || {};
  const text = [r.name, roleOf(r), rec.host, rec.port, rec.version, rec.scheme, r.owner]
    .filter((x) => x !== undefined && x !== null).join(" ").toLowerCase();
  return words.every((w) => text.includes(w));
}

function render() {
  const reg = board.registry || {};
  const state = $("registry-state");
  state.textContent = reg.state === "off" ? "no registry" : `registry ${reg.state || "?"}`;
  state.className = `pill ${reg.state || ""}`;
  $("version").textContent = reg.version ? `v${reg.version}` : "";

  // The role list: every role there is, keeping the one chosen.
  const select = $("role");
  const chosen = select.value;
  const roles = [...new Set(board.records.map(roleOf))].sort();
  if (chosen && !roles.includes(chosen)) roles.push(chosen);
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join("\n") !== roles.join("\n")) {
    select.replaceChildren(el("option", { value: "" }, "all roles"),
      ...roles.map((r) => el("option", { value: r }, r)));
    select.value = chosen;
  }

  const words = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = board.records.filter((r) => (!chosen || roleOf(r) === chosen) && matches(r, words));
  const body = document.querySelector("#records tbody");
  const rows = [];
  ttlCells = new Map();
  if ($("group").checked) {
    const byRole = new Map();
    for (const r of shown) {
      if (!byRole.has(roleOf(r))) byRole.set(roleOf(r), []);
      byRole.get(roleOf(r)).push(r);
    }
    for (const role of [...byRole.keys()].sort()) {
      const members = byRole.get(role);
      rows.push(el("tr", { class: "group", "data-role": role },
        el("td", { colspan: "7" }, `${role} (${members.length})`)));
      rows.push(...members.map(row));
    }
  } else {
    rows.push(...shown.map(row));
  }
  body.replaceChildren(...rows);

  const total = reg.total ?? board.records.length;
  $("count").textContent = shown.length === total ? `(${total})` : `(${shown.length} of ${total})`;
  $("empty").hidden = total !== 0;
  const cut = $("truncated");
  cut.hidden = total <= board.records.length;
  cut.textContent = `Showing the first ${board.records.length} of ${total} records by name.`;
}

function tick() {
  for (const [name, cell] of ttlCells) {
    const r = byName.get(name);
    if (r) cell.textContent = ttlText(r);
  }
}

function describe(e) {
  if (e.event === "rejected") return [e.error, e.endpoint && `from ${e.endpoint}`].filter(Boolean).join(" ");
  if (e.event === "unhealthy") return e.detail || "";
  if (e.event === "updated" && e.changed === false) return "refreshed";
  if (e.event === "deregistered" && e.will) return `by its will: ${e.endpoint || ""} was lost`;
  return e.endpoint || "";
}

function addEvent(e) {
  const now = new Date();
  const li = el("li", { "data-event": e.event, "data-name": e.name },
    el("time", { datetime: now.toISOString() }, now.toLocaleTimeString()),
    el("span", { class: `kind ${e.event}` }, e.event),
    el("strong", {}, e.name), " ",
    el("span", { class: "why" }, describe(e)));
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function connection(state) {
  const c = $("conn");
  c.textContent = state;
  c.className = `pill ${state === "live" ? "live" : state === "connecting" ? "connecting" : "lost"}`;
}

function connect() {
  source = new EventSource("/ui/stream");
  source.onopen = () => connection("live");
  source.addEventListener("snapshot", (m) => {
    board = JSON.parse(m.data);
    const at = performance.now();
    for (const r of board.records) r.at = at;
    byName = new Map(board.records.map((r) => [r.name, r]));
    connection("live");
    render();
  });
  source.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
  source.addEventListener("ttl", (m) => {
    const t = JSON.parse(m.data);
    const r = byName.get(t.name);
    if (r) {
      r.ttl_left_ms = t.ttl_left_ms;
      r.at = performance.now();
      tick();
    }
  });
  source.onerror = () => {
    connection("reconnecting");
    // The browser retries a dropped stream by itself; an answer that is
    // not a stream (a restart's 503) ends it, so try again here.
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(connect, 2000);
    }
  };
}

// `/#NAME` (Home Assistant's link to a service) starts the search as NAME.
function searchFromHash() {
  let wanted = location.hash.slice(1);
  try {
    wanted = decodeURIComponent(wanted);
  } catch (e) {
    // not percent-encoding: taken as it is
  }
  if (wanted) {
    $("search").value = wanted;
    render();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  setInterval(tick, 1000);
  for (const id of ["search", "role", "group"]) $(id).addEventListener("input", render);
  window.addEventListener("hashchange", searchFromHash);
  searchFromHash();
});
