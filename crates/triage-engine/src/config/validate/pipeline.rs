//! `strategy = "pipeline"`: stages in order, each checked against what the
//! stage before it gives (audio, text, transcript).

use indexmap::IndexMap;
use triage_cloud::gateway::ProviderSettings;

use super::super::raw::RawPipeline;
use super::super::types::{LocalKind, LocalSpec, Pipeline, Stage, StageKind, Value};
use super::Validator;

impl Validator {
    pub(super) fn pipeline(
        &mut self,
        key: &str,
        p: &RawPipeline,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Pipeline> {
        let input = match p.stages.first().map(|s| s.kind.as_str()) {
            Some("transcribe") => Value::Audio,
            Some(_) => Value::Text,
            None => {
                self.problem(
                    format!("{key}.stages"),
                    "a pipeline needs stages",
                    "add [[tasks.NAME.stages]] tables",
                );
                return None;
            }
        };
        let mut stages = Vec::new();
        let mut have = input;
        for (i, s) in p.stages.iter().enumerate() {
            let sk = format!("{key}.stages[{i}]");
            let (kind, needs) = match s.kind.as_str() {
                "transcribe" => {
                    let Some(l) = &s.local else {
                        self.problem(
                            format!("{sk}.local"),
                            "a transcribe stage needs a Whisper specialist",
                            "add local = \"whisper\"",
                        );
                        continue;
                    };
                    self.specialist(&format!("{sk}.local"), l, LocalKind::Whisper, local);
                    (
                        StageKind::Transcribe {
                            specialist: l.clone(),
                        },
                        Value::Audio,
                    )
                }
                "summarize" => {
                    let mut targets = Vec::new();
                    for t in &s.tiers {
                        targets.extend(self.targets(
                            &format!("{sk}.tiers"),
                            Some(&t.provider),
                            Some(&t.model),
                            &[],
                            providers,
                        ));
                    }
                    if s.tiers.is_empty() {
                        self.problem(
                            format!("{sk}.tiers"),
                            "a summarize stage needs at least one model",
                            "add tiers = [{ provider = \"...\", model = \"...\" }], cheapest first",
                        );
                    }
                    (
                        StageKind::Summarize {
                            targets,
                            min_transcript_confidence: s.min_transcript_confidence,
                            system_prompt: s.system_prompt.clone(),
                            max_tokens: s.max_tokens,
                        },
                        Value::Text,
                    )
                }
                "entities" => {
                    let Some(l) = &s.local else {
                        self.problem(
                            format!("{sk}.local"),
                            "an entities stage needs a NER specialist",
                            "add local = \"ner\"",
                        );
                        continue;
                    };
                    self.specialist(&format!("{sk}.local"), l, LocalKind::Tagger, local);
                    let types = if s.entities.is_empty() {
                        vec!["PER".into(), "ORG".into()]
                    } else {
                        s.entities.clone()
                    };
                    (
                        StageKind::Entities {
                            specialist: l.clone(),
                            types,
                        },
                        Value::Text,
                    )
                }
                "action_items" => (StageKind::ActionItems, Value::Text),
                other => {
                    self.problem(
                        format!("{sk}.kind"),
                        format!("unknown stage kind `{other}`"),
                        "use transcribe, summarize, entities or action_items",
                    );
                    continue;
                }
            };
            // A transcript is text as well; audio is only good for transcribe.
            let fits = matches!(
                (needs, have),
                (Value::Audio, Value::Audio) | (Value::Text, Value::Text | Value::Transcript)
            );
            if !fits {
                self.problem(
                    &sk,
                    format!(
                        "`{}` needs {needs:?} input but the stage before gives {have:?}",
                        s.kind
                    ),
                    "put a transcribe stage first for audio, and nothing before it",
                );
            }
            if needs == Value::Audio {
                have = Value::Transcript;
            }
            stages.push(Stage {
                name: s.name.clone(),
                kind,
            });
        }
        Some(Pipeline { input, stages })
    }
}
