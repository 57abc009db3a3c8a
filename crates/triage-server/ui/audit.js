// The audit view: a `triage audit --json` (or `--out report.json`) report, read in the
// browser (the file never leaves it), with a band slider over the frontier
// showing the cost against the local tier's accuracy of each band.

import { fill, h, json, pct, registerView } from "./app.js";

const NS = "http://www.w3.org/2000/svg";
let report = null;

function s(tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function frontierPlot(points, chosen) {
  const W = 520;
  const H = 300;
  const P = 44;
  const svg = s("svg", { width: W, height: H, class: "frontier", role: "img", "aria-label": "cost against accuracy" });
  const withAcc = points.filter((p) => p.local_accuracy !== null && p.local_accuracy !== undefined);
  const costs = points.map((p) => p.cost_per_100k_usd);
  const cmin = Math.min(...costs, 0);
  const cmax = Math.max(...costs, 1e-9);
  const amin = Math.min(...withAcc.map((p) => p.local_accuracy), 1);
  const x = (c) => P + ((c - cmin) / (cmax - cmin || 1)) * (W - 2 * P);
  const y = (a) => H - P - ((a - amin) / (1 - amin || 1)) * (H - 2 * P);
  svg.append(s("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#9aa5b1" }));
  svg.append(s("line", { x1: P, y1: P, x2: P, y2: H - P, stroke: "#9aa5b1" }));
  svg.append(s("text", { x: W / 2, y: H - 8, "text-anchor": "middle", "font-size": 11 }, "$ per 100k requests"));
  svg.append(s("text", { x: 12, y: P - 12, "font-size": 11 }, "local accuracy"));
  svg.append(s("text", { x: P, y: H - P + 14, "font-size": 10 }, "$" + cmin.toFixed(2)));
  svg.append(s("text", { x: W - P, y: H - P + 14, "font-size": 10, "text-anchor": "end" }, "$" + cmax.toFixed(2)));
  svg.append(s("text", { x: P - 4, y: y(amin), "font-size": 10, "text-anchor": "end" }, amin.toFixed(2)));
  svg.append(s("text", { x: P - 4, y: y(1), "font-size": 10, "text-anchor": "end" }, "1.00"));
  for (const p of withAcc) {
    svg.append(s("circle", { cx: x(p.cost_per_100k_usd), cy: y(p.local_accuracy), r: 3, fill: "#9aa5b1" }));
  }
  if (chosen && chosen.local_accuracy !== null) {
    svg.append(s("circle", { cx: x(chosen.cost_per_100k_usd), cy: y(chosen.local_accuracy), r: 7, fill: "none", stroke: "#b3261e", "stroke-width": 2, class: "chosen" }));
  }
  return svg;
}

function render(root) {
  const picker = h("input", { type: "file", accept: ".json,application/json", "aria-label": "audit report" });
  picker.addEventListener("change", async () => {
    const f = picker.files && picker.files[0];
    if (!f) return;
    try {
      report = JSON.parse(await f.text());
    } catch (e) {
      report = null;
      fill(root, picker, h("p", { class: "error" }, "Not a JSON report: " + e.message));
      return;
    }
    render(root);
  });
  const head = h("p", { class: "meta" }, "Open a report written by `triage audit ... --out report.json`: ", picker);
  if (!report || !Array.isArray(report.frontier)) {
    fill(root, head);
    return;
  }
  const points = report.frontier.slice().sort((a, b) => a.cost_per_100k_usd - b.cost_per_100k_usd);
  // Start at the configured band (none for a report without one).
  const band = report.band;
  let i = Math.max(0, points.findIndex((p) => band && p.lo === band.lo && p.hi === band.hi));
  const info = h("div", { class: "cards" });
  const plotBox = h("div", {});
  const slider = h("input", { type: "range", min: 0, max: points.length - 1, value: i, class: "band-slider", "aria-label": "band" });
  const update = () => {
    const p = points[i];
    // data-value: the point's own number, for a reader that wants more
    // digits than the card shows (the browser tests compare them).
    const stat = (name, value, text, label) =>
      h("div", { class: "stat", "data-stat": name, "data-value": value === null ? "" : value }, h("div", { class: "v" }, text), h("div", { class: "k" }, label));
    fill(
      info,
      h("div", { class: "stat", "data-stat": "band", "data-lo": p.lo, "data-hi": p.hi }, h("div", { class: "v" }, `${p.lo} – ${p.hi}`), h("div", { class: "k" }, "band (lo – hi)")),
      stat("local_share", p.local_share, pct(p.local_share), "answered locally"),
      stat("local_accuracy", p.local_accuracy, p.local_accuracy === null ? "–" : p.local_accuracy.toFixed(3), "local accuracy"),
      stat("cost_per_100k_usd", p.cost_per_100k_usd, "$" + p.cost_per_100k_usd.toFixed(2), "per 100k requests"),
    );
    fill(plotBox, frontierPlot(points, p));
  };
  slider.addEventListener("input", () => {
    i = Number(slider.value);
    update();
  });
  update();
  fill(
    root,
    head,
    h("h3", {}, `Task ${report.task}: ${report.n} items, ${report.mode}`),
    h(
      "div",
      { class: "cards" },
      h("div", { class: "stat" }, h("div", { class: "v" }, report.accuracy === null ? "–" : report.accuracy.toFixed(3)), h("div", { class: "k" }, "accuracy")),
      h("div", { class: "stat" }, h("div", { class: "v" }, "$" + report.cost_per_100k_usd.toFixed(2)), h("div", { class: "k" }, "per 100k (configured band)")),
      h("div", { class: "stat" }, h("div", { class: "v" }, "$" + report.all_llm_cost_per_100k_usd.toFixed(2)), h("div", { class: "k" }, "per 100k all-LLM")),
      h("div", { class: "stat" }, h("div", { class: "v" }, pct(report.savings_pct === null ? null : report.savings_pct / 100)), h("div", { class: "k" }, "saved")),
    ),
    h("label", {}, "Band on the frontier ", slider),
    info,
    plotBox,
    report.assumptions && report.assumptions.length ? h("ul", { class: "meta" }, report.assumptions.map((a) => h("li", {}, a))) : null,
  );
}

// The report is the user's own file, but the view, like every other, is for
// admins: the config call fails without an admin key and shows the login box.
registerView("audit", "Audit", async (root) => {
  await json("/ui/api/config");
  render(root);
});
