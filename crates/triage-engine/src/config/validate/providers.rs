//! `[providers.NAME]`, `[retry]`, and the provider/model/fallback targets
//! that tiers, intents, routes and stages name.

use indexmap::IndexMap;
use std::time::Duration;
use triage_cloud::breaker::BreakerConfig;
use triage_cloud::gateway::{ProviderSettings, Target};
use triage_cloud::ratelimit::RateLimits;
use triage_cloud::retry::RetryPolicy;
use triage_cloud::{ProviderConfig, ProviderKind, SecretString};

use super::super::raw::{RawProvider, RawRetry, RawTarget};
use super::Validator;

/// The environment variable that overrides provider `name`'s `base_url`
/// (`TRIAGE_PROVIDER_OPENAI_BASE_URL` for `openai`), so a deployment or a test
/// can point a shipped config at a proxy or a local server.
pub fn base_url_override_var(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TRIAGE_PROVIDER_{up}_BASE_URL")
}

impl Validator {
    pub(super) fn retry(&mut self, raw: &RawRetry) -> RetryPolicy {
        let mut p = RetryPolicy::default();
        if let Some(n) = raw.max_attempts {
            if n == 0 {
                self.problem(
                    "retry.max_attempts",
                    "must be at least 1",
                    "set it to 1 for no retries",
                );
            } else {
                p.max_attempts = n;
            }
        }
        if let Some(ms) = raw.base_delay_ms {
            p.base_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = raw.max_delay_ms {
            p.max_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = raw.deadline_ms {
            p.deadline = Duration::from_millis(ms);
        }
        p
    }

    pub(super) fn providers(
        &mut self,
        raw: &IndexMap<String, RawProvider>,
    ) -> IndexMap<String, ProviderSettings> {
        let mut out = IndexMap::new();
        for (name, p) in raw {
            let key = format!("providers.{name}");
            let override_var = base_url_override_var(name);
            let base_url = std::env::var(&override_var)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| p.base_url.clone())
                .or_else(|| p.kind.default_base_url().map(str::to_owned));
            let Some(base_url) = base_url else {
                self.problem(
                    format!("{key}.base_url"),
                    "an openai_compatible provider needs a base_url",
                    format!("set base_url = \"http://host:port/v1\" (or the {override_var} environment variable)"),
                );
                continue;
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                self.problem(
                    format!("{key}.base_url"),
                    format!("`{base_url}` is not an http(s) URL"),
                    "write it as https://host/v1",
                );
                continue;
            }
            let api_key = match &p.api_key_env {
                Some(var) => {
                    let key_value = SecretString::from_env(var);
                    if key_value.is_none() {
                        self.warnings.push(format!(
                            "{key}.api_key_env: {var} is not set; tiers that use `{name}` will fail with a missing-key error until it is"
                        ));
                    }
                    key_value
                }
                None => {
                    if matches!(
                        p.kind,
                        ProviderKind::Openai
                            | ProviderKind::Anthropic
                            | ProviderKind::Gemini
                            | ProviderKind::Perspective
                    ) {
                        self.problem(
                            format!("{key}.api_key_env"),
                            format!("{:?} needs an API key", p.kind),
                            "name the environment variable that holds it, e.g. api_key_env = \"OPENAI_API_KEY\"",
                        );
                        continue;
                    }
                    None
                }
            };
            let defaults = BreakerConfig::default();
            out.insert(
                name.clone(),
                ProviderSettings {
                    config: ProviderConfig {
                        name: name.clone(),
                        kind: p.kind,
                        base_url: base_url.trim_end_matches('/').to_owned(),
                        api_key,
                        api_key_env: p.api_key_env.clone(),
                        timeout: Duration::from_millis(p.timeout_ms.unwrap_or(60_000)),
                    },
                    limits: RateLimits {
                        requests_per_minute: p.requests_per_minute,
                        tokens_per_minute: p.tokens_per_minute,
                    },
                    breaker: BreakerConfig {
                        failure_threshold: p.breaker_failures.unwrap_or(defaults.failure_threshold),
                        open_for: p
                            .breaker_open_ms
                            .map(Duration::from_millis)
                            .unwrap_or(defaults.open_for),
                    },
                },
            );
        }
        out
    }

    pub(super) fn targets(
        &mut self,
        key: &str,
        provider: Option<&str>,
        model: Option<&str>,
        fallback: &[RawTarget],
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Vec<Target> {
        let mut out = Vec::new();
        let first = match (provider, model) {
            (Some(p), Some(m)) => Some(RawTarget {
                provider: p.into(),
                model: m.into(),
            }),
            (Some(_), None) => {
                self.problem(
                    format!("{key}.model"),
                    "a provider tier needs a model",
                    "add model = \"...\" (the provider's model name)",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    format!("{key}.provider"),
                    "a model needs its provider",
                    "add provider = \"NAME\" naming a [providers.NAME] table",
                );
                None
            }
            (None, None) => None,
        };
        for (i, t) in first.iter().chain(fallback.iter()).enumerate() {
            let k = if i == 0 {
                format!("{key}.provider")
            } else {
                format!("{key}.fallback[{}].provider", i - 1)
            };
            if !providers.contains_key(&t.provider) {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                self.problem(
                    k,
                    format!("unknown provider `{}`", t.provider),
                    format!(
                        "declare [providers.{}] or use one of: {}",
                        t.provider,
                        if known.is_empty() {
                            "(none declared)".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                continue;
            }
            out.push(Target {
                provider: t.provider.clone(),
                model: t.model.clone(),
            });
        }
        out
    }
}
