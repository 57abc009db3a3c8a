//! The config as graphs for the web UI: one per task, nodes for cascade
//! tiers (with their bands), router intent, extractors, retrieval and
//! routes, pipeline stages, each with its provider and model, and edges
//! labelled with the traffic they carried since the server started.

use crate::metrics::TaskCounts;
use serde::Serialize;
use std::collections::BTreeMap;
use triage_engine::config::{
    Cascade, Extractor, Handler, Intent, Pipeline, Router, StageKind, Strategy, Task, TierKind,
};

/// `GET /ui/api/config`.
#[derive(Debug, Serialize)]
pub struct ConfigView {
    /// The file the engine runs, if it came from one.
    pub path: Option<String>,
    /// The file's version token (see `designer`), for a save to name.
    pub version: Option<String>,
    /// `[server.ui] edit`: whether the designer may save.
    pub editable: bool,
    pub warnings: Vec<String>,
    pub tasks: Vec<TaskView>,
}

#[derive(Debug, Serialize)]
pub struct TaskView {
    pub name: String,
    pub description: Option<String>,
    /// `cascade`, `router` or `pipeline`.
    pub strategy: &'static str,
    /// Requests since the server started (ok + error).
    pub requests: u64,
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    /// `tier`, `intent`, `extract`, `retrieve`, `route`, `stage`, `answer`.
    pub kind: &'static str,
    pub name: String,
    /// The TOML key this node is written under (validation messages name it).
    pub key: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Fallback targets, `provider/model`.
    pub fallback: Vec<String>,
    /// A cascade tier's band: it answers when every score is ≤ lo or ≥ hi.
    pub band: Option<[f64; 2]>,
    /// One line more: a route's handler, a stage's kind, an intent's rules.
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EdgeView {
    pub from: String,
    pub to: String,
    /// What the edge means (`uncertain`, `answer`, a rule).
    pub label: String,
    /// Requests that took this edge since the server started.
    pub count: u64,
    /// `count` over the task's requests; `None` before any request.
    pub share: Option<f64>,
}

/// The graphs of every task in `tasks`, with traffic from `counts`.
pub fn tasks<'a>(
    tasks: impl IntoIterator<Item = &'a Task>,
    counts: &BTreeMap<String, TaskCounts>,
) -> Vec<TaskView> {
    tasks
        .into_iter()
        .map(|t| {
            let c = counts.get(&t.name).cloned().unwrap_or_default();
            let total = c.ok + c.error;
            let mut g = Graph {
                task: &t.name,
                nodes: Vec::new(),
                edges: Vec::new(),
                counts: c,
                total,
            };
            let strategy = match &t.strategy {
                Strategy::Cascade(c) => {
                    g.cascade(c);
                    "cascade"
                }
                Strategy::Router(r) => {
                    g.router(r);
                    "router"
                }
                Strategy::Pipeline(p) => {
                    g.pipeline(p);
                    "pipeline"
                }
            };
            TaskView {
                name: t.name.clone(),
                description: t.description.clone(),
                strategy,
                requests: total,
                nodes: g.nodes,
                edges: g.edges,
            }
        })
        .collect()
}

struct Graph<'a> {
    task: &'a str,
    nodes: Vec<NodeView>,
    edges: Vec<EdgeView>,
    counts: TaskCounts,
    total: u64,
}

fn node(kind: &'static str, id: String, name: &str, key: String) -> NodeView {
    NodeView {
        id,
        kind,
        name: name.to_owned(),
        key,
        provider: None,
        model: None,
        fallback: Vec::new(),
        band: None,
        detail: None,
    }
}

impl Graph<'_> {
    fn edge(&mut self, from: &str, to: &str, label: impl Into<String>, count: u64) {
        let share = (self.total > 0).then(|| count as f64 / self.total as f64);
        self.edges.push(EdgeView {
            from: from.to_owned(),
            to: to.to_owned(),
            label: label.into(),
            count,
            share,
        });
    }

    fn tier_counts(&self, tier: &str) -> crate::metrics::TierCounts {
        self.counts.tiers.get(tier).cloned().unwrap_or_default()
    }

    fn cascade(&mut self, c: &Cascade) {
        let task = self.task;
        self.nodes.push(node(
            "input",
            "in".into(),
            "request",
            format!("tasks.{task}"),
        ));
        self.nodes.push(node(
            "answer",
            "out".into(),
            "answer",
            format!("tasks.{task}"),
        ));
        let mut prev = "in".to_owned();
        let mut into = self.total;
        for (i, tier) in c.tiers.iter().enumerate() {
            let id = format!("tier{i}");
            let mut n = node(
                "tier",
                id.clone(),
                &tier.name,
                format!("tasks.{task}.tiers[{i}]"),
            );
            let (targets, detail) = match &tier.kind {
                TierKind::Local { specialist } => {
                    n.provider = Some("local".into());
                    n.model = Some(specialist.clone());
                    (None, "local specialist")
                }
                TierKind::Moderation { targets } => (Some(targets), "hosted moderation"),
                TierKind::Llm { targets } => (Some(targets), "LLM"),
            };
            if let Some(targets) = targets {
                let mut it = targets.iter();
                if let Some(first) = it.next() {
                    n.provider = Some(first.provider.clone());
                    n.model = Some(first.model.clone());
                }
                n.fallback = it.map(|t| format!("{}/{}", t.provider, t.model)).collect();
            }
            n.band = tier.band.map(|(lo, hi)| [lo, hi]);
            n.detail = Some(detail.into());
            self.nodes.push(n);
            let label = if i == 0 { "request" } else { "escalated" };
            self.edge(&prev, &id, label, into);
            let tc = self.tier_counts(&tier.name);
            self.edge(&id, "out", "answered", tc.answered);
            into = tc.uncertain + tc.error + tc.timeout;
            prev = id;
        }
    }

    fn router(&mut self, r: &Router) {
        let task = self.task;
        let key = format!("tasks.{task}");
        self.nodes
            .push(node("input", "in".into(), "request", key.clone()));
        let mut prev = "in".to_owned();
        for (i, x) in r.extract.iter().enumerate() {
            let id = format!("extract{i}");
            let (field, detail, model) = match x {
                Extractor::Regex { field, regex } => {
                    (field, format!("regex {}", regex.as_str()), None)
                }
                Extractor::Ner {
                    field,
                    specialist,
                    entity,
                } => (
                    field,
                    format!("NER entity {entity}"),
                    Some(specialist.clone()),
                ),
            };
            let mut n = node("extract", id.clone(), field, format!("{key}.extract[{i}]"));
            n.detail = Some(detail);
            if let Some(m) = model {
                n.provider = Some("local".into());
                n.model = Some(m);
            }
            self.nodes.push(n);
            self.edge(&prev, &id, "", self.total);
            prev = id;
        }
        if let Some(ret) = &r.retrieve {
            let mut n = node(
                "retrieve",
                "retrieve".into(),
                "retrieve",
                format!("{key}.retrieve"),
            );
            n.detail = Some(format!("{} ({})", ret.query, redact_url(&ret.database)));
            self.nodes.push(n);
            self.edge(&prev, "retrieve", "", self.total);
            prev = "retrieve".into();
        }
        let mut intent = node("intent", "intent".into(), "intent", format!("{key}.intent"));
        let mut rule_of: BTreeMap<String, String> = BTreeMap::new();
        let default = match &r.intent {
            Intent::Rules { rules, default } => {
                intent.detail = Some(format!("rules ({})", rules.len()));
                for (route, re) in rules {
                    rule_of
                        .entry(route.clone())
                        .or_insert_with(|| re.as_str().to_owned());
                }
                default
            }
            Intent::Local {
                specialist,
                default,
                min_score,
            } => {
                intent.provider = Some("local".into());
                intent.model = Some(specialist.clone());
                intent.detail = Some(format!("classifier, min score {min_score}"));
                default
            }
            Intent::Llm { targets, default } => {
                if let Some(t) = targets.first() {
                    intent.provider = Some(t.provider.clone());
                    intent.model = Some(t.model.clone());
                }
                intent.detail = Some("LLM".into());
                default
            }
        };
        self.nodes.push(intent);
        self.edge(&prev, "intent", "", self.total);
        for (name, route) in &r.routes {
            let id = format!("route:{name}");
            let mut n = node("route", id.clone(), name, format!("{key}.routes.{name}"));
            match &route.handler {
                Handler::Template { requires, .. } => {
                    n.detail = Some(if requires.is_empty() {
                        "template".into()
                    } else {
                        format!("template (needs {})", requires.join(", "))
                    });
                }
                Handler::Model { targets, .. } => {
                    let mut it = targets.iter();
                    if let Some(first) = it.next() {
                        n.provider = Some(first.provider.clone());
                        n.model = Some(first.model.clone());
                    }
                    n.fallback = it.map(|t| format!("{}/{}", t.provider, t.model)).collect();
                    n.detail = Some("model".into());
                }
            }
            self.nodes.push(n);
            let label = match rule_of.get(name) {
                Some(re) => re.clone(),
                None if name == default => "default".into(),
                None => String::new(),
            };
            let tc = self.tier_counts(&id);
            let count = tc.answered + tc.error + tc.timeout;
            self.edge("intent", &id, label, count);
        }
        for (name, route) in &r.routes {
            if let Some(other) = &route.otherwise {
                self.edge(
                    &format!("route:{name}"),
                    &format!("route:{other}"),
                    "otherwise",
                    0,
                );
            }
        }
    }

    fn pipeline(&mut self, p: &Pipeline) {
        let task = self.task;
        self.nodes.push(node(
            "input",
            "in".into(),
            "request",
            format!("tasks.{task}"),
        ));
        let mut prev = "in".to_owned();
        for (i, s) in p.stages.iter().enumerate() {
            let id = format!("stage{i}");
            let mut n = node(
                "stage",
                id.clone(),
                &s.name,
                format!("tasks.{task}.stages[{i}]"),
            );
            let kind = match &s.kind {
                StageKind::Transcribe { specialist } => {
                    n.provider = Some("local".into());
                    n.model = Some(specialist.clone());
                    "transcribe"
                }
                StageKind::Summarize { targets, .. } => {
                    let mut it = targets.iter();
                    if let Some(first) = it.next() {
                        n.provider = Some(first.provider.clone());
                        n.model = Some(first.model.clone());
                    }
                    n.fallback = it.map(|t| format!("{}/{}", t.provider, t.model)).collect();
                    "summarize"
                }
                StageKind::Entities { specialist, types } => {
                    n.provider = Some("local".into());
                    n.model = Some(specialist.clone());
                    n.detail = Some(types.join(", "));
                    "entities"
                }
                StageKind::ActionItems => "action_items",
            };
            n.detail = Some(match n.detail.take() {
                Some(d) => format!("{kind}: {d}"),
                None => kind.into(),
            });
            self.nodes.push(n);
            self.edge(&prev, &id, "", self.total);
            prev = id;
        }
    }
}

/// A database URL without its password.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_passwords_are_not_shown() {
        assert_eq!(
            redact_url("postgres://u:secret@db/x"),
            "postgres://u:***@db/x"
        );
        assert_eq!(redact_url("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }
}
