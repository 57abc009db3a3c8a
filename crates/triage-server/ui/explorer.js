// The request explorer: recent requests from the ledger with their traces,
// filtered by task, answering tier and outcome.

import { fill, h, json, registerView, usd } from "./app.js";

const state = { task: "", tier: "", outcome: "" };

function traceTable(tiers) {
  if (!Array.isArray(tiers) || !tiers.length) return h("span", { class: "meta" }, "no trace");
  return h(
    "table",
    { class: "trace" },
    h("tr", {}, ["tier", "model", "decision", "reason", "score", "latency", "$"].map((c) => h("th", {}, c))),
    tiers.map((t) =>
      h(
        "tr",
        {},
        h("td", {}, t.tier),
        h("td", {}, t.model),
        h("td", {}, t.decision),
        h("td", {}, t.reason),
        h("td", {}, t.score === null || t.score === undefined ? "–" : t.score.toFixed(3)),
        h("td", {}, (t.latency_ms || 0).toFixed(1) + " ms"),
        h("td", {}, usd(t.cost_usd)),
      ),
    ),
  );
}

async function explorerView(root, ctx) {
  const q = new URLSearchParams({ limit: "50" });
  for (const [k, v] of Object.entries(state)) if (v) q.set(k, v);
  let data;
  try {
    data = await json("/ui/api/requests?" + q);
  } catch (e) {
    if (e.status === 404) {
      fill(root, h("p", { class: "meta" }, e.message));
      return;
    }
    throw e;
  }
  // Every task of the config, not only those on this (filtered) page, so a
  // filter can go from one task to another.
  if (!ctx.config) ctx.config = await json("/ui/api/config");
  const tasks = ctx.config.tasks.map((t) => t.name);
  const input = (name, placeholder) =>
    h("input", {
      name,
      placeholder,
      value: state[name],
      "aria-label": name,
      onchange: (ev) => {
        state[name] = ev.target.value;
        ctx.show("requests");
      },
    });
  const taskSelect = h(
    "select",
    {
      name: "task",
      "aria-label": "task",
      onchange: (ev) => {
        state.task = ev.target.value;
        ctx.show("requests");
      },
    },
    h("option", { value: "" }, "every task"),
    [...new Set([...tasks, ...data.requests.map((r) => r.task)])].map((t) =>
      h("option", { value: t, selected: t === state.task }, t),
    ),
  );
  const outcome = h(
    "select",
    {
      name: "outcome",
      "aria-label": "outcome",
      onchange: (ev) => {
        state.outcome = ev.target.value;
        ctx.show("requests");
      },
    },
    ["", "answered", "refused", "failed"].map((o) => h("option", { value: o, selected: o === state.outcome }, o || "every outcome")),
  );
  // Enter in the tier box applies it (change) and would submit the form.
  const filters = h("form", { class: "filters", onsubmit: (ev) => ev.preventDefault() }, "Filter: ", taskSelect, input("tier", "answering tier"), outcome);
  fill(
    root,
    filters,
    data.store_text ? null : h("p", { class: "meta" }, "Request texts are not stored ([ledger] store_text = false)."),
    h(
      "table",
      { class: "requests" },
      h("tr", {}, ["time", "task", "answered by", "outcome", "latency", "$", "all-LLM $", "trace"].map((c) => h("th", {}, c))),
      data.requests.map((r) =>
        h(
          "tr",
          { "data-request": r.request_id },
          h("td", { title: r.request_id }, new Date(r.ts_ms).toLocaleTimeString()),
          h("td", { "data-col": "task" }, r.task),
          h("td", { "data-col": "answered_by" }, r.answered_by || "–"),
          h("td", { "data-col": "outcome" }, r.outcome),
          h("td", {}, r.latency_ms.toFixed(1) + " ms"),
          h("td", {}, usd(r.cost_usd)),
          h("td", {}, usd(r.all_llm_cost_usd)),
          h("td", {}, h("details", {}, h("summary", {}, "trace"), r.text ? h("p", { class: "text" }, r.text) : null, traceTable(r.tiers))),
        ),
      ),
    ),
    data.requests.length ? null : h("p", { class: "meta" }, "No requests match."),
  );
}

registerView("requests", "Requests", explorerView);
