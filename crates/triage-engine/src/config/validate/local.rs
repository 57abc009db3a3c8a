//! `[local.NAME]` specialists, and the check that a step names one of the
//! kind it needs.

use indexmap::IndexMap;

use super::super::raw::RawLocal;
use super::super::types::{LocalKind, LocalSpec};
use super::Validator;

impl Validator {
    pub(super) fn locals(
        &mut self,
        raw: &IndexMap<String, RawLocal>,
    ) -> IndexMap<String, LocalSpec> {
        let mut out = IndexMap::new();
        for (name, l) in raw {
            let key = format!("local.{name}");
            let kind = match l.kind.as_deref() {
                Some("classifier") => LocalKind::Classifier,
                Some("tagger") => LocalKind::Tagger,
                Some("whisper") => LocalKind::Whisper,
                None => match l.model.as_str() {
                    "ner" => LocalKind::Tagger,
                    m if m.contains("whisper") || m.ends_with(".bin") => LocalKind::Whisper,
                    _ => LocalKind::Classifier,
                },
                Some(other) => {
                    self.problem(
                        format!("{key}.kind"),
                        format!("unknown kind `{other}`"),
                        "use classifier, tagger or whisper",
                    );
                    continue;
                }
            };
            let device = match l
                .device
                .as_deref()
                .unwrap_or("cpu")
                .parse::<triage_local::DeviceSpec>()
            {
                Ok(d) => d,
                Err(e) => {
                    self.problem(
                        format!("{key}.device"),
                        e.to_string(),
                        "use cpu, cuda, cuda:N or metal",
                    );
                    continue;
                }
            };
            if l.model.trim().is_empty() {
                self.problem(
                    format!("{key}.model"),
                    "is empty",
                    "name a specialist (toxicity, ner), an org/name hub id or a folder",
                );
            }
            // Relative folders are relative to the config file.
            let model = if l.model.starts_with("./") || l.model.starts_with("../") {
                self.base_dir.join(&l.model).display().to_string()
            } else {
                l.model.clone()
            };
            let defaults = triage_local::BatchConfig::for_device(!matches!(
                device,
                triage_local::DeviceSpec::Cpu
            ));
            let mut positive = |field: &str, v: Option<usize>, default: usize| match v {
                Some(0) => {
                    self.problem(format!("{key}.{field}"), "is 0", "use a positive number");
                    default
                }
                Some(n) => n,
                None => default,
            };
            let batch = triage_local::BatchConfig {
                queue_capacity: positive(
                    "queue_capacity",
                    l.queue_capacity,
                    defaults.queue_capacity,
                ),
                max_batch_size: positive(
                    "max_batch_size",
                    l.max_batch_size,
                    defaults.max_batch_size,
                ),
                max_batch_tokens: positive(
                    "max_batch_tokens",
                    l.max_batch_tokens,
                    defaults.max_batch_tokens,
                ),
                max_input_tokens: positive(
                    "max_input_tokens",
                    l.max_input_tokens,
                    defaults.max_input_tokens,
                ),
                max_pass_tokens: positive(
                    "max_pass_tokens",
                    l.max_pass_tokens,
                    defaults.max_pass_tokens,
                ),
                max_wait: l
                    .max_wait_ms
                    .map_or(defaults.max_wait, std::time::Duration::from_millis),
                cache_entries: l.cache_entries.unwrap_or(defaults.cache_entries),
                int8: l.int8.unwrap_or(
                    defaults.int8
                        || triage_local::int8_by_default(
                            &l.model,
                            matches!(device, triage_local::DeviceSpec::Cpu),
                        ),
                ),
            };
            if batch.int8 && !matches!(device, triage_local::DeviceSpec::Cpu) {
                self.problem(
                    format!("{key}.int8"),
                    "int8 weights run on the CPU only",
                    "remove `int8` or set `device = \"cpu\"`",
                );
            }
            if l.speaker_model.is_some() && kind != LocalKind::Whisper {
                self.problem(
                    format!("{key}.speaker_model"),
                    "only a Whisper specialist labels speakers",
                    "remove `speaker_model` or set `kind = \"whisper\"`",
                );
            }
            let in_config_dir = |v: &String| {
                if v.starts_with("./") || v.starts_with("../") {
                    self.base_dir.join(v).display().to_string()
                } else {
                    v.clone()
                }
            };
            out.insert(
                name.clone(),
                LocalSpec {
                    model,
                    kind,
                    device,
                    positive_labels: l.positive_labels.clone(),
                    threads: l.threads,
                    vad_model: l.vad_model.as_ref().map(in_config_dir),
                    speaker_model: l.speaker_model.as_ref().map(in_config_dir),
                    batch,
                },
            );
        }
        out
    }

    pub(super) fn specialist(
        &mut self,
        key: &str,
        name: &str,
        want: LocalKind,
        local: &IndexMap<String, LocalSpec>,
    ) -> bool {
        match local.get(name) {
            None => {
                let known: Vec<&str> = local.keys().map(String::as_str).collect();
                self.problem(
                    key,
                    format!("unknown local specialist `{name}`"),
                    format!(
                        "declare [local.{name}] or use one of: {}",
                        if known.is_empty() {
                            "(none declared)".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                false
            }
            Some(spec) if spec.kind != want => {
                self.problem(
                    key,
                    format!("`{name}` is a {:?}, this step needs a {want:?}", spec.kind),
                    format!("set [local.{name}].kind or use another specialist"),
                );
                false
            }
            Some(_) => true,
        }
    }
}
