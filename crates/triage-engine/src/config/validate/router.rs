//! `strategy = "router"`: an intent step (rules, a local classifier or an
//! LLM), extractors, an optional database lookup, and the routes.

use indexmap::IndexMap;
use regex::Regex;
use triage_cloud::gateway::ProviderSettings;

use super::super::raw::RawRouter;
use super::super::types::{
    Extractor, Handler, Intent, LocalKind, LocalSpec, Retrieve, Route, Router,
};
use super::Validator;

impl Validator {
    pub(super) fn router(
        &mut self,
        key: &str,
        r: &RawRouter,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Router> {
        let ik = format!("{key}.intent");
        if !r.routes.contains_key(&r.intent.default) {
            self.problem(
                format!("{ik}.default"),
                format!("`{}` is not a route", r.intent.default),
                "name one of the [tasks.NAME.routes.*] tables",
            );
        }
        let intent = match r.intent.kind.as_str() {
            "rules" => {
                let mut rules = Vec::new();
                for (i, rule) in r.intent.rules.iter().enumerate() {
                    let rk = format!("{ik}.rules[{i}]");
                    if !r.routes.contains_key(&rule.route) {
                        self.problem(
                            format!("{rk}.route"),
                            format!("`{}` is not a route", rule.route),
                            "name one of the routes",
                        );
                    }
                    let pattern = match (&rule.regex, rule.any.is_empty()) {
                        (Some(re), true) => re.clone(),
                        (None, false) => format!(
                            "(?i)\\b(?:{})\\b",
                            rule.any
                                .iter()
                                .map(|w| regex::escape(w))
                                .collect::<Vec<_>>()
                                .join("|")
                        ),
                        _ => {
                            self.problem(
                                &rk,
                                "a rule needs either any = [...] or regex = \"...\"",
                                "give one of them",
                            );
                            continue;
                        }
                    };
                    match Regex::new(&pattern) {
                        Ok(re) => rules.push((rule.route.clone(), re)),
                        Err(e) => self.problem(
                            format!("{rk}.regex"),
                            e.to_string(),
                            "fix the regular expression",
                        ),
                    }
                }
                Intent::Rules {
                    rules,
                    default: r.intent.default.clone(),
                }
            }
            "local" => {
                let Some(l) = &r.intent.local else {
                    self.problem(
                        format!("{ik}.local"),
                        "a local intent step needs its classifier",
                        "add local = \"NAME\"",
                    );
                    return None;
                };
                self.specialist(&format!("{ik}.local"), l, LocalKind::Classifier, local);
                Intent::Local {
                    specialist: l.clone(),
                    default: r.intent.default.clone(),
                    min_score: r.intent.min_score.unwrap_or(0.5),
                }
            }
            "llm" => {
                let targets = self.targets(
                    &ik,
                    r.intent.provider.as_deref(),
                    r.intent.model.as_deref(),
                    &[],
                    providers,
                );
                if targets.is_empty() {
                    self.problem(
                        &ik,
                        "an llm intent step needs provider and model",
                        "add provider = \"...\" and model = \"...\"",
                    );
                }
                Intent::Llm {
                    targets,
                    default: r.intent.default.clone(),
                }
            }
            other => {
                self.problem(
                    format!("{ik}.kind"),
                    format!("unknown intent kind `{other}`"),
                    "use rules, local or llm",
                );
                return None;
            }
        };
        let mut extract = Vec::new();
        for (i, e) in r.extract.iter().enumerate() {
            let ek = format!("{key}.extract[{i}]");
            match (&e.regex, &e.ner) {
                (Some(re), None) => match Regex::new(re) {
                    Ok(regex) => extract.push(Extractor::Regex {
                        field: e.field.clone(),
                        regex,
                    }),
                    Err(err) => self.problem(
                        format!("{ek}.regex"),
                        err.to_string(),
                        "fix the regular expression",
                    ),
                },
                (None, Some(n)) => {
                    if self.specialist(&format!("{ek}.ner"), n, LocalKind::Tagger, local) {
                        extract.push(Extractor::Ner {
                            field: e.field.clone(),
                            specialist: n.clone(),
                            entity: e.entity.clone().unwrap_or_else(|| "PER".into()),
                        });
                    }
                }
                _ => self.problem(
                    &ek,
                    "an extractor needs either regex or ner",
                    "give one of them",
                ),
            }
        }
        let retrieve = r.retrieve.as_ref().map(|q| {
            let database = self.database_url(&format!("{key}.retrieve.database"), &q.database);
            let (query, params) = bind_named(&q.query);
            for p in &params {
                if !extract.iter().any(|e| match e {
                    Extractor::Regex { field, .. } | Extractor::Ner { field, .. } => field == p,
                }) {
                    self.problem(
                        format!("{key}.retrieve.query"),
                        format!("parameter `:{p}` is not an extracted field"),
                        "add an [[extract]] with that field, or fix the name",
                    );
                }
            }
            Retrieve {
                database,
                query,
                params,
            }
        });
        let mut routes = IndexMap::new();
        for (name, route) in &r.routes {
            let rk = format!("{key}.routes.{name}");
            let handler = match route.handler.as_str() {
                "template" => {
                    let Some(template) = &route.template else {
                        self.problem(
                            format!("{rk}.template"),
                            "a template handler needs its template",
                            "add template = \"Order {order_id} is {status}.\"",
                        );
                        continue;
                    };
                    Handler::Template {
                        template: template.clone(),
                        requires: route.requires.clone(),
                    }
                }
                "model" => {
                    let targets = self.targets(
                        &rk,
                        route.provider.as_deref(),
                        route.model.as_deref(),
                        &route.fallback,
                        providers,
                    );
                    if targets.is_empty() {
                        self.problem(
                            &rk,
                            "a model handler needs provider and model",
                            "add provider = \"...\" and model = \"...\"",
                        );
                        continue;
                    }
                    Handler::Model {
                        targets,
                        system_prompt: route.system_prompt.clone(),
                        max_tokens: route.max_tokens,
                    }
                }
                other => {
                    self.problem(
                        format!("{rk}.handler"),
                        format!("unknown handler `{other}`"),
                        "use template or model",
                    );
                    continue;
                }
            };
            if let Some(o) = &route.otherwise
                && !r.routes.contains_key(o)
            {
                self.problem(
                    format!("{rk}.otherwise"),
                    format!("`{o}` is not a route"),
                    "name another route",
                );
            }
            routes.insert(
                name.clone(),
                Route {
                    handler,
                    otherwise: route.otherwise.clone(),
                },
            );
        }
        Some(Router {
            intent,
            extract,
            retrieve,
            routes,
        })
    }
}

/// Replace `:name` parameters by `$1..$n` (both SQLite and PostgreSQL accept
/// `$n`), returning the names in order. `::` (a PostgreSQL cast) is left alone.
pub fn bind_named(query: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(query.len());
    let mut names: Vec<String> = Vec::new();
    let chars: Vec<char> = query.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == ':' && i + 1 < chars.len() && chars[i + 1] == ':' {
            out.push_str("::");
            i += 2;
            continue;
        }
        if c == ':'
            && i + 1 < chars.len()
            && (chars[i + 1].is_ascii_alphabetic() || chars[i + 1] == '_')
        {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            let n = match names.iter().position(|x| *x == name) {
                Some(p) => p + 1,
                None => {
                    names.push(name);
                    names.len()
                }
            };
            out.push_str(&format!("${n}"));
            i = end;
            continue;
        }
        out.push(c);
        i += 1;
    }
    (out, names)
}
