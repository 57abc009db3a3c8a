//! `strategy = "cascade"`: tiers cheapest first, each with the acceptance
//! band that lets it answer; the last tier always answers.

use indexmap::IndexMap;
use std::time::Duration;
use triage_cloud::gateway::ProviderSettings;

use super::super::raw::RawCascade;
use super::super::types::{Cascade, CascadeKind, LocalKind, LocalSpec, Tier, TierKind};
use super::{Validator, band_ok};

impl Validator {
    pub(super) fn cascade(
        &mut self,
        key: &str,
        c: &RawCascade,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Cascade> {
        let kind = match c.kind.as_str() {
            "moderation" => CascadeKind::Moderation,
            "chat" => CascadeKind::Chat,
            other => {
                self.problem(
                    format!("{key}.kind"),
                    format!("unknown cascade kind `{other}`"),
                    "use moderation or chat",
                );
                return None;
            }
        };
        if kind == CascadeKind::Moderation && c.labels.is_empty() {
            self.problem(
                format!("{key}.labels"),
                "a moderation cascade needs its labels",
                "add labels = [\"toxic\"]",
            );
        }
        if c.tiers.is_empty() {
            self.problem(
                format!("{key}.tiers"),
                "a cascade needs at least one tier",
                "add [[tasks.NAME.tiers]] tables, cheapest first",
            );
            return None;
        }
        let shadow = c.shadow.unwrap_or(0.0);
        if !band_ok(shadow) {
            self.problem(
                format!("{key}.shadow"),
                "must be a fraction between 0 and 1",
                "e.g. shadow = 0.05",
            );
        }
        let threshold = c.threshold.unwrap_or(0.5);
        if !band_ok(threshold) {
            self.problem(
                format!("{key}.threshold"),
                "must be a score between 0 and 1",
                "e.g. threshold = 0.5",
            );
        }
        let mut tiers = Vec::new();
        let last = c.tiers.len() - 1;
        for (i, t) in c.tiers.iter().enumerate() {
            let tk = format!("{key}.tiers[{i}]");
            let tier_kind = match (&t.local, &t.provider) {
                (Some(l), None) => {
                    if kind == CascadeKind::Chat {
                        self.problem(
                            format!("{tk}.local"),
                            "a chat cascade's tiers are LLMs",
                            "use provider = \"...\" and model = \"...\"",
                        );
                        continue;
                    }
                    if !self.specialist(&format!("{tk}.local"), l, LocalKind::Classifier, local) {
                        continue;
                    }
                    TierKind::Local {
                        specialist: l.clone(),
                    }
                }
                (None, Some(_)) => {
                    let targets = self.targets(
                        &tk,
                        t.provider.as_deref(),
                        t.model.as_deref(),
                        &t.fallback,
                        providers,
                    );
                    if targets.is_empty() {
                        continue;
                    }
                    match t.operation.as_deref().unwrap_or("chat") {
                        "chat" => TierKind::Llm { targets },
                        "moderation" if kind == CascadeKind::Moderation => {
                            TierKind::Moderation { targets }
                        }
                        other => {
                            self.problem(
                                format!("{tk}.operation"),
                                format!("`{other}` is not a tier operation here"),
                                "use chat, or moderation in a moderation cascade",
                            );
                            continue;
                        }
                    }
                }
                (Some(_), Some(_)) => {
                    self.problem(
                        &tk,
                        "a tier is either local or a provider, not both",
                        "split it into two tiers",
                    );
                    continue;
                }
                (None, None) => {
                    self.problem(
                        &tk,
                        "a tier needs local = \"NAME\" or provider = \"NAME\"",
                        "name a [local.NAME] specialist or a [providers.NAME] model",
                    );
                    continue;
                }
            };
            let mut label_bands = IndexMap::new();
            for (label, b) in &t.bands {
                let bk = format!("{tk}.bands.{label}");
                if kind != CascadeKind::Moderation {
                    self.problem(
                        &bk,
                        "per-label bands apply to moderation cascades",
                        "use hi on a chat tier",
                    );
                    continue;
                }
                if !c.labels.contains(label) {
                    self.problem(
                        &bk,
                        format!("`{label}` is not one of the task's labels"),
                        format!("use one of: {}", c.labels.join(", ")),
                    );
                    continue;
                }
                let (lo, hi) = (b.lo.unwrap_or(0.0), b.hi.unwrap_or(1.0));
                if !band_ok(hi) || !band_ok(lo) || lo > hi {
                    self.problem(
                        &bk,
                        format!("band lo = {lo}, hi = {hi} is not 0 ≤ lo ≤ hi ≤ 1"),
                        format!("e.g. {label} = {{ lo = 0.1, hi = 0.9 }}"),
                    );
                    continue;
                }
                label_bands.insert(label.clone(), (lo, hi));
            }
            // Bands for every label stand in for the tier's own lo/hi.
            let every_label =
                !c.labels.is_empty() && c.labels.iter().all(|l| t.bands.contains_key(l));
            let band = match (t.hi, t.lo) {
                (None, None) if i == last => None,
                (None, None) if every_label => Some((0.0, 1.0)),
                (None, None) if kind == CascadeKind::Chat => {
                    self.problem(
                        &tk,
                        "a chat tier before the last needs hi",
                        "add hi = 0.8 (accept when the answer's mean token probability is ≥ hi)",
                    );
                    None
                }
                (None, None) => {
                    self.problem(
                        &tk,
                        "a tier before the last needs an acceptance band",
                        "add hi = 0.9 and lo = 0.1 (accept when every label is ≥ hi or ≤ lo), or bands for every label",
                    );
                    None
                }
                (hi, lo) => {
                    let hi = hi.unwrap_or(1.0);
                    let lo = lo.unwrap_or(0.0);
                    if !band_ok(hi) || !band_ok(lo) || lo > hi {
                        self.problem(
                            &tk,
                            format!("band lo = {lo}, hi = {hi} is not 0 ≤ lo ≤ hi ≤ 1"),
                            "e.g. lo = 0.1, hi = 0.9",
                        );
                    }
                    if i == last {
                        self.warnings.push(format!(
                            "{tk}: the last tier always answers; its hi/lo are ignored"
                        ));
                        None
                    } else {
                        Some((lo, hi))
                    }
                }
            };
            if let Some(a) = t.calibrated_accuracy
                && !band_ok(a)
            {
                self.problem(
                    format!("{tk}.calibrated_accuracy"),
                    format!("{a} is not an accuracy between 0 and 1"),
                    "remove it, or rerun triage calibrate --write",
                );
            }
            for label in t.map.values() {
                if kind == CascadeKind::Moderation && !c.labels.contains(label) {
                    self.problem(
                        format!("{tk}.map"),
                        format!("maps onto `{label}`, which is not one of the task's labels"),
                        format!("use one of: {}", c.labels.join(", ")),
                    );
                }
            }
            if i == last && !t.bands.is_empty() {
                self.warnings.push(format!(
                    "{tk}: the last tier always answers; its bands are ignored"
                ));
                label_bands.clear();
            }
            tiers.push(Tier {
                name: t.name.clone(),
                kind: tier_kind,
                band,
                label_bands,
                calibrated_accuracy: t.calibrated_accuracy,
                map: t.map.clone(),
                timeout: t.timeout_ms.map(Duration::from_millis),
                max_tokens: t.max_tokens,
            });
        }
        Some(Cascade {
            kind,
            labels: c.labels.clone(),
            label_descriptions: c.label_descriptions.clone(),
            threshold,
            shadow,
            system_prompt: c.system_prompt.clone(),
            tiers,
        })
    }
}
