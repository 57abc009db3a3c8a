// The live dashboard: counters since the server started (the numbers
// /metrics has) and the last hour and day from the ledger's per-minute
// totals. Refreshes every 5 s while shown.

import { fill, h, json, pct, registerView, usd } from "./app.js";

const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(1) + " ms" : Math.round(x) + " ms");

function stat(label, value, id) {
  return h("div", { class: "stat", "data-stat": id }, h("div", { class: "v" }, value), h("div", { class: "k" }, label));
}

function sinceStart(counts) {
  const rows = [];
  for (const [task, c] of Object.entries(counts)) {
    const tiers = Object.entries(c.tiers);
    if (!tiers.length) {
      rows.push(h("tr", { "data-task": task, "data-tier": "" }, h("td", {}, task), h("td", {}, "–"), h("td", {}, String(c.ok)), h("td", {}, String(c.error)), h("td", {}, "0"), h("td", {}, "0"), h("td", {}, "0"), h("td", {}, "0"), h("td", {}, usd(0))));
    }
    for (const [tier, t] of tiers) {
      rows.push(
        h(
          "tr",
          { "data-task": task, "data-tier": tier },
          h("td", {}, task),
          h("td", {}, tier),
          h("td", { "data-col": "ok" }, String(c.ok)),
          h("td", { "data-col": "error" }, String(c.error)),
          h("td", { "data-col": "answered" }, String(t.answered)),
          h("td", { "data-col": "uncertain" }, String(t.uncertain)),
          h("td", { "data-col": "error-escalations" }, String(t.error)),
          h("td", { "data-col": "timeout" }, String(t.timeout)),
          h("td", { "data-col": "cost" }, usd(t.cost_usd)),
        ),
      );
    }
  }
  return h(
    "table",
    { class: "since-start" },
    h(
      "tr",
      {},
      ["task", "tier", "requests ok", "requests failed", "answered", "escalated: uncertain", "escalated: error", "escalated: timeout", "$ spent"].map((c) => h("th", {}, c)),
    ),
    rows,
  );
}

function sparkline(points, seconds) {
  const W = 480;
  const H = 60;
  const NS = "http://www.w3.org/2000/svg";
  const el = document.createElementNS(NS, "svg");
  el.setAttribute("width", W);
  el.setAttribute("height", H);
  el.setAttribute("class", "spark");
  if (!points.length) return el;
  const last = points[points.length - 1].minute;
  const first = last - Math.round(seconds / 60) + 1;
  const max = Math.max(...points.map((p) => p.requests), 1);
  const xs = (m) => ((m - first) / Math.max(1, last - first)) * (W - 4) + 2;
  const ys = (v) => H - 2 - (v / max) * (H - 4);
  const poly = document.createElementNS(NS, "polyline");
  poly.setAttribute("points", points.map((p) => `${xs(p.minute)},${ys(p.requests)}`).join(" "));
  poly.setAttribute("fill", "none");
  poly.setAttribute("stroke", "#2f6fb0");
  poly.setAttribute("stroke-width", "1.5");
  el.append(poly);
  return el;
}

function windowView(w) {
  return h(
    "section",
    { class: "window", "data-window": w.name },
    h("h3", {}, `Last ${w.name} (ledger)`),
    h(
      "div",
      { class: "cards" },
      stat("requests", String(w.requests), "requests"),
      stat("requests/s", w.requests_per_s.toFixed(3), "rps"),
      stat("spent", usd(w.cost_usd), "cost"),
      stat("all-LLM path", usd(w.all_llm_cost_usd), "all-llm"),
      stat("saved", `${usd(w.saved_usd)} (${pct(w.saved_pct)})`, "saved"),
    ),
    sparkline(w.per_minute, w.seconds),
    h(
      "table",
      { class: "tiers" },
      h(
        "tr",
        {},
        ["task", "tier", "runs", "failed runs", "answered", "escalation rate", "$", "p50", "p95", "p99"].map((c) => h("th", {}, c)),
      ),
      w.tasks.flatMap((t) => [
        h(
          "tr",
          { class: "task-row" },
          h("td", {}, t.task),
          h("td", {}, "(all)"),
          h("td", {}, String(t.requests)),
          h("td", {}, String(t.failed)),
          h("td", {}, ""),
          h("td", {}, ""),
          h("td", {}, usd(t.cost_usd)),
          h("td", {}, ms(t.p50_ms)),
          h("td", {}, ms(t.p95_ms)),
          h("td", {}, ms(t.p99_ms)),
        ),
        ...t.tiers
          .filter((x) => x.tier)
          .map((x) =>
            h(
              "tr",
              {},
              h("td", {}, ""),
              h("td", {}, x.tier),
              h("td", {}, String(x.attempts)),
              h("td", {}, String(x.failed_attempts)),
              h("td", {}, String(x.answered)),
              h("td", {}, pct(x.escalation_rate)),
              h("td", {}, usd(x.cost_usd)),
              h("td", {}, ms(x.p50_ms)),
              h("td", {}, ms(x.p95_ms)),
              h("td", {}, ms(x.p99_ms)),
            ),
          ),
      ]),
    ),
  );
}

let timer = null;

async function dashboardView(root, ctx) {
  const d = await json("/ui/api/dashboard");
  const total = Object.values(d.since_start).reduce((a, c) => a + c.ok + c.error, 0);
  const spent = Object.values(d.since_start).reduce(
    (a, c) => a + Object.values(c.tiers).reduce((b, t) => b + t.cost_usd, 0),
    0,
  );
  fill(
    root,
    h("h3", {}, "Since the server started (/metrics)"),
    h("div", { class: "cards" }, stat("requests", String(total), "since-start-requests"), stat("spent", usd(spent), "since-start-cost")),
    sinceStart(d.since_start),
    d.backfill_before_ms
      ? h(
          "p",
          { class: "warnings", "data-backfill": d.backfill_before_ms },
          `Ledger rows from before ${new Date(d.backfill_before_ms).toLocaleString()} are still being summed into the per-minute totals (newest first); the windows below are short of them until then.`,
        )
      : null,
    d.windows ? d.windows.map(windowView) : h("p", { class: "meta" }, "No ledger: only the counters since start."),
    d.budgets.length
      ? h(
          "section",
          {},
          h("h3", {}, "Budgets"),
          h(
            "table",
            {},
            h("tr", {}, ["budget", "period", "spent", "reserved", "left", "limit", "burn"].map((c) => h("th", {}, c))),
            d.budgets.map((b) =>
              h(
                "tr",
                { "data-budget": b.name },
                h("td", {}, b.name),
                h("td", {}, b.period),
                h("td", {}, usd(b.spent_usd)),
                h("td", {}, usd(b.reserved_usd)),
                h("td", {}, usd(b.left_usd)),
                h("td", {}, usd(b.usd)),
                h("td", {}, pct(b.usd > 0 ? (b.spent_usd + b.reserved_usd) / b.usd : null)),
              ),
            ),
          ),
        )
      : null,
  );
  clearTimeout(timer);
  timer = setTimeout(() => {
    if (document.querySelector('.view[data-view="dashboard"]')) ctx.show("dashboard");
  }, 5000);
}

registerView("dashboard", "Dashboard", dashboardView);
