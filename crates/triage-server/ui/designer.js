// The designer: edit a cascade tier's band, provider and model, move or
// remove tiers, add a task from a template; every change is checked by the
// server's validator (the one `triage config check` uses) and its problems
// are shown beside the node they name (a tier not drawn yet: beside the
// form that adds it). Plus the history view: every kept
// version, its diff, and rollback.

import { decorators, fill, h, json, registerView, registerToolbar, taskDecorators } from "./app.js";

function tierIndex(node) {
  const m = /\.tiers\[(\d+)\]$/.exec(node.key);
  return m ? Number(m[1]) : null;
}

// A tier being added at `at` of `task`: the validator numbers the tiers of
// the edited file, so its key names the new tier and those after it are one
// place further on than the ones drawn.
function placeNewTier(p, added) {
  const prefix = `tasks.${added.task}.tiers[`;
  if (!p.key.startsWith(prefix)) return { key: p.key };
  const m = /^(\d+)\](.*)$/s.exec(p.key.slice(prefix.length));
  if (!m) return { key: p.key };
  const j = Number(m[1]);
  if (j === added.at) return { key: p.key, own: true };
  return { key: j > added.at ? `${prefix}${j - 1}]${m[2]}` : p.key };
}

// Problems from a refused edit, each beside the node whose key it starts with.
function showProblems(root, problems, fallbackEl, added) {
  for (const el of root.querySelectorAll(".node, .add-tier")) {
    el.classList.remove("invalid");
    el.querySelector(".problems").textContent = "";
  }
  const nodes = [...root.querySelectorAll(".node")];
  for (const raw of problems) {
    const placed = added ? placeNewTier(raw, added) : { key: raw.key };
    if (placed.own) {
      added.el.classList.add("invalid");
      added.el.querySelector(".problems").append(h("div", { class: "problem" }, `${raw.key}: ${raw.message}${raw.fix ? " (" + raw.fix + ")" : ""}`));
      continue;
    }
    const p = { ...raw, key: placed.key };
    const owner =
      nodes
        .filter((n) => p.key === n.dataset.key || p.key.startsWith(n.dataset.key + "."))
        .sort((a, b) => b.dataset.key.length - a.dataset.key.length)[0] ||
      nodes.find((n) => p.key.startsWith(n.dataset.key));
    // The message names the key of the edited file, as `triage config check` would.
    const text = `${raw.key}: ${p.message}${p.fix ? " (" + p.fix + ")" : ""}`;
    if (owner) {
      owner.classList.add("invalid");
      owner.querySelector(".problems").append(h("div", { class: "problem" }, text));
    } else if (fallbackEl) {
      fallbackEl.append(h("div", { class: "problem error" }, text));
    }
  }
}

// Send edits: check only, or save and reload. Returns true when saved.
// `added`: {task, at, el} when the edits add a tier (see placeNewTier).
async function submit(ctx, edits, save, status, added) {
  const root = document.querySelector('.view[data-view="graph"]') || document;
  status.textContent = save ? "Saving…" : "Checking…";
  status.className = "status";
  try {
    const r = await json("/ui/api/config/edit", {
      method: "POST",
      body: JSON.stringify({ version: ctx.config.version, edits, save }),
    });
    showProblems(root, [], null);
    if (save) {
      status.textContent = `Saved as version ${r.number}; the engine reloaded.`;
      status.className = "status ok";
      setTimeout(() => ctx.show("graph"), 600);
      return true;
    }
    status.textContent = "Valid.";
    status.className = "status ok";
  } catch (e) {
    status.className = "status error";
    if (e.status === 409) {
      status.textContent =
        "The config file changed since this page read it (edited by hand or saved elsewhere). Reload the page to see it; nothing was overwritten.";
    } else {
      status.textContent = e.message;
      if (e.body && e.body.problems) showProblems(root, e.body.problems, status, added);
    }
  }
  return false;
}

function bandForm(el, node, task, ctx) {
  const i = tierIndex(node);
  if (i === null) return;
  const status = h("div", { class: "status", role: "status" });
  const lo = h("input", {
    type: "number",
    step: "0.01",
    name: "lo",
    value: node.band ? node.band[0] : "",
    "aria-label": `lo of ${node.name}`,
  });
  const hi = h("input", {
    type: "number",
    step: "0.01",
    name: "hi",
    value: node.band ? node.band[1] : "",
    "aria-label": `hi of ${node.name}`,
  });
  const edits = () => [
    { op: "set_band", task: task.name, tier: i, lo: Number(lo.value), hi: Number(hi.value) },
  ];
  const form = h(
    "form",
    { class: "band-form", "data-tier": i },
    lo,
    hi,
    h("button", { type: "button", class: "check", onclick: () => submit(ctx, edits(), false, status) }, "Check"),
    h("button", { type: "submit", class: "save" }, "Save"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit(ctx, edits(), true, status);
  });
  const model = h("input", { name: "model", value: node.model || "", "aria-label": `model of ${node.name}` });
  const provider = h("input", {
    name: "provider",
    value: node.provider || "",
    "aria-label": `provider of ${node.name}`,
  });
  const targetForm = h(
    "form",
    { class: "target-form" },
    provider,
    model,
    h("button", { type: "submit" }, "Set"),
  );
  targetForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const local = provider.value === "local";
    submit(
      ctx,
      [
        {
          op: "set_target",
          task: task.name,
          node: String(i),
          provider: local ? null : provider.value,
          model: local ? null : model.value,
          local: local ? model.value : null,
        },
      ],
      true,
      status,
    );
  });
  const tiers = task.nodes.filter((n) => n.kind === "tier").length;
  const moves = h(
    "div",
    { class: "moves" },
    i > 0
      ? h("button", { type: "button", onclick: () => submit(ctx, [{ op: "move_tier", task: task.name, from: i, to: i - 1 }], true, status) }, "◀ earlier")
      : null,
    i < tiers - 1
      ? h("button", { type: "button", onclick: () => submit(ctx, [{ op: "move_tier", task: task.name, from: i, to: i + 1 }], true, status) }, "later ▶")
      : null,
    h("button", { type: "button", onclick: () => submit(ctx, [{ op: "remove_tier", task: task.name, tier: i }], true, status) }, "remove"),
  );
  el.append(h("details", { class: "edit" }, h("summary", {}, "edit"), form, targetForm, moves, status));
}

decorators.push((el, node, task, ctx) => {
  if (!ctx.config || !ctx.config.editable) return;
  if (task.strategy === "cascade" && node.kind === "tier") bandForm(el, node, task, ctx);
});

// Below each cascade: a new tier's name, target, band and place (before
// the last tier by default: the last always answers).
function addTierForm(task, ctx) {
  const tiers = task.nodes.filter((n) => n.kind === "tier");
  const status = h("span", { class: "status", role: "status" });
  const field = (name, label, attrs = {}) => h("input", { name, placeholder: label, "aria-label": label, ...attrs });
  const name = field("tier-name", "tier name", { required: true });
  const provider = field("provider", "provider (or local)");
  const model = field("model", "model (or specialist)");
  const lo = field("lo", "lo", { type: "number", step: "0.01", min: "0", max: "1" });
  const hi = field("hi", "hi", { type: "number", step: "0.01", min: "0", max: "1" });
  const at = h(
    "select",
    { name: "at", "aria-label": "place" },
    tiers.map((t, i) => h("option", { value: i, selected: i === tiers.length - 1 }, "before " + t.name)),
    h("option", { value: tiers.length, selected: tiers.length === 0 }, "at the end"),
  );
  const num = (el) => (el.value === "" ? null : Number(el.value));
  const edits = () => {
    const local = provider.value === "local";
    return [
      {
        op: "add_tier",
        task: task.name,
        name: name.value,
        provider: local ? null : provider.value || null,
        model: local ? null : model.value || null,
        local: local ? model.value : null,
        lo: num(lo),
        hi: num(hi),
        at: Number(at.value),
      },
    ];
  };
  const form = h(
    "form",
    { class: "add-tier", "data-task": task.name },
    "Add a tier: ",
    name,
    provider,
    model,
    lo,
    hi,
    at,
    h("button", { type: "button", class: "check", onclick: () => form.reportValidity() && submit(ctx, edits(), false, status, { task: task.name, at: Number(at.value), el: form }) }, "Check"),
    h("button", { type: "submit", class: "save" }, "Add"),
    status,
    h("div", { class: "problems", role: "alert" }),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit(ctx, edits(), true, status, { task: task.name, at: Number(at.value), el: form });
  });
  return form;
}

taskDecorators.push((task, ctx) => {
  if (!ctx.config || !ctx.config.editable || task.strategy !== "cascade") return null;
  return addTierForm(task, ctx);
});

registerToolbar((ctx) => {
  if (!ctx.config || !ctx.config.editable) return null;
  const status = h("span", { class: "status", role: "status" });
  const name = h("input", { name: "task-name", placeholder: "new task name", "aria-label": "new task name" });
  const template = h(
    "select",
    { name: "template", "aria-label": "template" },
    ["cascade", "router", "pipeline"].map((t) => h("option", { value: t }, t)),
  );
  const form = h("form", { class: "add-task" }, "Add a task: ", name, template, h("button", { type: "submit" }, "Add"), status);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit(ctx, [{ op: "add_task", name: name.value, template: template.value }], true, status);
  });
  return form;
});

async function historyView(root, ctx) {
  const hist = await json("/ui/api/history");
  const out = h("div", { class: "diff-out" });
  const status = h("p", { class: "status", role: "status" });
  const rows = hist.versions
    .slice()
    .reverse()
    .map((v) =>
      h(
        "tr",
        { "data-number": v.number },
        h("td", {}, String(v.number)),
        h("td", {}, new Date(v.saved_ms).toLocaleString()),
        h("td", { class: "mono" }, v.version.slice(0, 12), v.version === hist.version ? " (current)" : ""),
        h(
          "td",
          {},
          h(
            "button",
            {
              type: "button",
              class: "show-diff",
              onclick: async () => {
                const d = await json("/ui/api/history/" + v.number);
                fill(
                  out,
                  h("h3", {}, `Version ${v.number} against ${v.number - 1}`),
                  h(
                    "pre",
                    { class: "diff" },
                    d.diff.map((l) =>
                      h("div", { class: l.op === "+" ? "add" : l.op === "-" ? "del" : "same" }, l.op + " " + l.line),
                    ),
                  ),
                );
              },
            },
            "diff",
          ),
          " ",
          hist.editable && v.version !== hist.version
            ? h(
                "button",
                {
                  type: "button",
                  class: "rollback",
                  onclick: async () => {
                    try {
                      const r = await json("/ui/api/config/rollback", {
                        method: "POST",
                        body: JSON.stringify({ version: hist.version, number: v.number }),
                      });
                      status.textContent = `Rolled back to version ${v.number} (kept as ${r.number}); the engine reloaded.`;
                      status.className = "status ok";
                      setTimeout(() => ctx.show("history"), 600);
                    } catch (e) {
                      status.textContent = e.status === 409 ? "The config file changed since this page read it; reload." : e.message;
                      status.className = "status error";
                    }
                  },
                },
                "roll back",
              )
            : null,
        ),
      ),
    );
  fill(
    root,
    h("p", { class: "meta" }, `History of ${hist.path} (kept in ${hist.path}.history/)`),
    status,
    hist.versions.length
      ? h("table", { class: "history" }, h("tr", {}, h("th", {}, "#"), h("th", {}, "kept"), h("th", {}, "version"), h("th", {}, "")), rows)
      : h("p", {}, "No saved versions yet: the first save keeps the file as it is now as version 1."),
    h("h3", {}, "Changes"),
    (hist.changes || []).length
      ? h(
          "table",
          { class: "changes" },
          h("tr", {}, ["when", "what", "who", "from", "version", "lines"].map((c) => h("th", {}, c))),
          hist.changes
            .slice()
            .reverse()
            .map((c) =>
              h(
                "tr",
                { "data-action": c.action },
                h("td", {}, new Date(c.at_ms).toLocaleString()),
                h("td", {}, c.action),
                h("td", {}, c.who),
                h("td", {}, c.from),
                h("td", { class: "mono" }, c.number != null ? `#${c.number} ` : "", c.version.slice(0, 12)),
                h("td", { title: c.diff.join("\n") }, String(c.diff.length)),
              ),
            ),
        )
      : h("p", {}, "No changes recorded yet: saves, rollbacks and reloads are kept here with who made them."),
    out,
  );
}

registerView("history", "History", historyView);
