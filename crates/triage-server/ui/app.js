// triage's web UI: plain ES module, no third-party code. Every value from
// the server goes into the page as text (textContent), never as HTML.

const KEY = "triage-admin-key";
const SVG = "http://www.w3.org/2000/svg";

// The key arrives in the fragment (never sent to the server in a request
// line); keep it for this tab only and take it out of the address bar.
function takeKeyFromFragment() {
  const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export class Unauthorized extends Error {}

export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("authorization", "Bearer " + key);
  if (options.body !== undefined && !headers.has("content-type")) {
    headers.set("content-type", "application/json");
  }
  const r = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  if (r.status === 401 || r.status === 403) {
    throw new Unauthorized(await errorMessage(r));
  }
  return r;
}

async function errorMessage(r) {
  try {
    const j = await r.json();
    return (j.error && j.error.message) || r.statusText;
  } catch {
    return r.statusText;
  }
}

export async function json(path, options) {
  const r = await api(path, options);
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const e = new Error((body && body.error && body.error.message) || r.statusText);
    e.status = r.status;
    e.body = body;
    throw e;
  }
  return body;
}

// Replace root's children; arrays are flattened and null/false skipped.
export function fill(root, ...children) {
  root.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

// h("div", {class: "x"}, "text", child) — attributes and text only.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    // Through CSSOM: the policy forbids inline style attributes.
    else if (k === "style") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

export const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
export const usd = (x) => "$" + (x || 0).toFixed(x >= 1 ? 2 : 6);

// ---------------------------------------------------------------- graph

const CARD_W = 184;
const CARD_H = 96;
const COL = 232;
const ROW = 124;

// Columns and rows of each node, by strategy.
function layout(task) {
  const pos = new Map();
  const nodes = task.nodes;
  if (task.strategy === "cascade") {
    const tiers = nodes.filter((n) => n.kind === "tier");
    pos.set("in", [0, 0]);
    tiers.forEach((n, i) => pos.set(n.id, [i + 1, 0]));
    pos.set("out", [Math.max(1, tiers.length) / 2 + 0.5, 1.25]);
  } else if (task.strategy === "router") {
    const routes = nodes.filter((n) => n.kind === "route");
    const mid = Math.max(0, routes.length - 1) / 2;
    let col = 0;
    for (const n of nodes) {
      if (n.kind === "route") continue;
      pos.set(n.id, [col++, mid]);
    }
    routes.forEach((n, i) => pos.set(n.id, [col, i]));
  } else {
    nodes.forEach((n, i) => pos.set(n.id, [i, 0]));
  }
  return pos;
}

function card(node, task, ctx) {
  const lines = [];
  if (node.detail) lines.push(h("div", { class: "detail" }, node.detail));
  if (node.provider || node.model) {
    lines.push(
      h("div", { class: "model" }, [node.provider, node.model].filter(Boolean).join(" / ")),
    );
  }
  if (node.fallback && node.fallback.length) {
    lines.push(h("div", { class: "fallback" }, "fallback " + node.fallback.join(", ")));
  }
  if (node.band) {
    lines.push(h("div", { class: "band" }, `band ${node.band[0]} – ${node.band[1]}`));
  }
  const el = h(
    "div",
    {
      class: "node kind-" + node.kind,
      "data-node": node.id,
      "data-key": node.key,
      title: node.key,
    },
    h("div", { class: "name" }, node.name),
    lines,
    h("div", { class: "problems", role: "alert" }),
  );
  for (const d of decorators) d(el, node, task, ctx);
  return el;
}

export function drawTask(task, ctx) {
  const pos = layout(task);
  let maxC = 0;
  let maxR = 0;
  for (const [c, r] of pos.values()) {
    maxC = Math.max(maxC, c);
    maxR = Math.max(maxR, r);
  }
  const width = maxC * COL + CARD_W + 20;
  const height = maxR * ROW + CARD_H + 20;
  const box = h("div", { class: "graph", style: { width: width + "px", height: height + "px" } });
  const lines = svg("svg", { width, height, class: "edges", "aria-hidden": "true" });
  const defs = svg("defs");
  const marker = svg("marker", {
    id: "arrow",
    viewBox: "0 0 10 10",
    refX: 9,
    refY: 5,
    markerWidth: 7,
    markerHeight: 7,
    orient: "auto-start-reverse",
  });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z" }));
  defs.append(marker);
  lines.append(defs);
  box.append(lines);
  const xy = (id) => {
    const [c, r] = pos.get(id) || [0, 0];
    return [10 + c * COL, 10 + r * ROW];
  };
  for (const e of task.edges) {
    if (!pos.has(e.from) || !pos.has(e.to)) continue;
    const [x1, y1] = xy(e.from);
    const [x2, y2] = xy(e.to);
    let a;
    let b;
    if (y2 > y1 + CARD_H / 2 && Math.abs(x2 - x1) < COL) {
      a = [x1 + CARD_W / 2, y1 + CARD_H];
      b = [x2 + CARD_W / 2, y2];
    } else if (x2 > x1) {
      a = [x1 + CARD_W, y1 + CARD_H / 2];
      b = [x2, y2 + CARD_H / 2];
    } else {
      a = [x1 + CARD_W / 2, y1 + (y2 > y1 ? CARD_H : 0)];
      b = [x2 + CARD_W / 2, y2 + (y2 > y1 ? 0 : CARD_H)];
    }
    const path = svg("path", {
      d: `M ${a[0]} ${a[1]} C ${(a[0] + b[0]) / 2} ${a[1]}, ${(a[0] + b[0]) / 2} ${b[1]}, ${b[0]} ${b[1]}`,
      class: "edge" + (e.count > 0 ? " live" : ""),
      "marker-end": "url(#arrow)",
      "stroke-width": 1.5 + 6 * (e.share || 0),
    });
    lines.append(path);
    const share = e.share === null || e.share === undefined ? "" : ` ${pct(e.share)}`;
    const text = `${e.label ? e.label + " " : ""}${e.count}${share}`;
    const label = h(
      "div",
      {
        class: "edge-label",
        "data-from": e.from,
        "data-to": e.to,
        title: e.label,
        style: { left: (a[0] + b[0]) / 2 - 60 + "px", top: (a[1] + b[1]) / 2 - 10 + "px" },
      },
      text.length > 40 ? text.slice(0, 38) + "…" : text,
    );
    box.append(label);
  }
  for (const n of task.nodes) {
    const [x, y] = xy(n.id);
    const el = card(n, task, ctx);
    el.style.left = x + "px";
    el.style.top = y + "px";
    box.append(el);
  }
  return box;
}

async function graphView(root, ctx) {
  const config = await json("/ui/api/config");
  ctx.config = config;
  fill(
    root,
    toolbars.map((t) => t(ctx)),
    h(
      "p",
      { class: "meta" },
      config.path ? `Config ${config.path}` : "Embedded default config",
      config.editable ? " · editing on" : " · read-only ([server.ui] edit = true turns editing on)",
    ),
    config.warnings.length
      ? h("ul", { class: "warnings" }, config.warnings.map((w) => h("li", {}, w)))
      : null,
    config.tasks.map((t) =>
      h(
        "section",
        { class: "task", "data-task": t.name },
        h(
          "h2",
          {},
          h("span", { class: "task-name" }, t.name),
          h("span", { class: "badge" }, t.strategy),
          h("span", { class: "count" }, `${t.requests} requests since start`),
        ),
        t.description ? h("p", { class: "description" }, t.description) : null,
        h("div", { class: "scroll" }, drawTask(t, ctx)),
        taskDecorators.map((d) => d(t, ctx)),
      ),
    ),
  );
}

// ---------------------------------------------------------------- shell

// Further views, each a module that calls registerView.
const EXTRA_VIEWS = ["dashboard.js", "explorer.js", "designer.js", "audit.js"];

// Functions (element, node, task, ctx) that add controls to a graph's nodes.
export const decorators = [];
// Functions (task, ctx) that return an element (or null) for the foot of a
// task's section.
export const taskDecorators = [];
// Functions (ctx) that return an element for the top of the graph view.
const toolbars = [];
export function registerToolbar(f) {
  toolbars.push(f);
}

const views = { graph: { title: "Graph", render: graphView } };

export function registerView(name, title, render) {
  views[name] = { title, render };
}

function showLogin(message) {
  document.getElementById("app").hidden = true;
  document.getElementById("app").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("nav").replaceChildren();
  document.getElementById("logout").hidden = true;
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-key").focus();
}

async function show(name) {
  const app = document.getElementById("app");
  const view = views[name] || views.graph;
  const ctx = { show };
  try {
    const root = h("div", { class: "view", "data-view": name });
    await view.render(root, ctx);
    app.replaceChildren(root);
    document.getElementById("login").hidden = true;
    app.hidden = false;
    document.getElementById("logout").hidden = false;
    const nav = document.getElementById("nav");
    nav.replaceChildren(
      ...Object.entries(views).map(([n, v]) =>
        h(
          "a",
          {
            href: "#view=" + n,
            class: n === name ? "active" : null,
            "data-view": n,
          },
          v.title,
        ),
      ),
    );
    nav.hidden = false;
  } catch (e) {
    if (e instanceof Unauthorized) {
      const hadKey = sessionStorage.getItem(KEY) !== null;
      showLogin(hadKey ? e.message : "");
    } else {
      app.hidden = false;
      app.replaceChildren(h("p", { class: "error", role: "alert" }, String(e.message || e)));
    }
  }
}

function current() {
  const m = /view=([a-z]+)/.exec(location.hash);
  return m ? m[1] : "graph";
}

async function start() {
  takeKeyFromFragment();
  // In order, so the navigation keeps one order.
  for (const f of EXTRA_VIEWS) {
    try {
      await import("./" + f);
    } catch (e) {
      console.error("cannot load " + f, e);
    }
  }
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("login-key").value);
    document.getElementById("login-key").value = "";
    show(current());
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("");
  });
  window.addEventListener("hashchange", () => {
    takeKeyFromFragment();
    show(current());
  });
  await show(current());
  document.body.dataset.ready = "1";
}

start();
