//! Dollars per call: a price table read from TOML, with prices that change on
//! known dates, and the arithmetic that turns reported usage into a cost.
//!
//! ```toml
//! [[price]]
//! provider = "openai"            # optional; matches any provider when absent
//! model = "gpt-4o-mini"
//! effective = "2024-07-18"       # the newest entry whose date <= the call's date wins
//! input_per_mtok = 0.15
//! output_per_mtok = 0.60
//! cached_input_per_mtok = 0.075  # optional, defaults to the input price
//! per_audio_minute = 0.006       # optional
//! per_request = 0.0              # optional
//!
//! [compute]
//! cpu_hour_usd = 0.05
//! gpu_hour_usd = 1.20
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Deserialize;
use triage_core::llm::Usage;

/// Why a price table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("cannot read the price table {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the price table{} is not valid TOML for prices", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse {
        path: Option<PathBuf>,
        #[source]
        source: toml::de::Error,
    },
    /// A value parsed but makes no sense; `key` names it (`price[2].effective`).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(default)]
    price: Vec<RawPrice>,
    #[serde(default)]
    compute: Option<RawCompute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    provider: Option<String>,
    model: String,
    effective: String,
    input_per_mtok: Option<f64>,
    output_per_mtok: Option<f64>,
    cached_input_per_mtok: Option<f64>,
    per_audio_minute: Option<f64>,
    per_request: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompute {
    #[serde(default)]
    cpu_hour_usd: f64,
    #[serde(default)]
    gpu_hour_usd: f64,
}

/// One model's prices from one date on, in US dollars.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// `None` matches any provider (the same model served by several).
    pub provider: Option<String>,
    pub model: String,
    /// `YYYY-MM-DD`, validated, so it orders as a string.
    pub effective: String,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cached_input_per_mtok: f64,
    pub per_audio_minute: f64,
    pub per_request: f64,
}

impl Price {
    /// The cost of one call. Cached input tokens are a subset of the input
    /// tokens billed at the cached rate; reasoning tokens are already part of
    /// the output tokens (the providers report them that way, or fold them in).
    pub fn cost(&self, usage: &Usage, audio_seconds: f64) -> f64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        let tokens = uncached as f64 * self.input_per_mtok
            + cached as f64 * self.cached_input_per_mtok
            + usage.output_tokens as f64 * self.output_per_mtok;
        tokens / 1_000_000.0
            + audio_seconds.max(0.0) / 60.0 * self.per_audio_minute
            + self.per_request
    }
}

/// What local compute costs, for comparing a local answer with a hosted one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ComputePrices {
    pub cpu_hour_usd: f64,
    pub gpu_hour_usd: f64,
}

/// Every price, validated.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: Vec<Price>,
    compute: ComputePrices,
}

impl PriceTable {
    pub fn from_toml_str(text: &str) -> Result<Self, PriceError> {
        let raw: RawTable =
            toml::from_str(text).map_err(|source| PriceError::Parse { path: None, source })?;
        Self::validate(raw)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self, PriceError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
            path: path.to_owned(),
            source,
        })?;
        let raw: RawTable = toml::from_str(&text).map_err(|source| PriceError::Parse {
            path: Some(path.to_owned()),
            source,
        })?;
        Self::validate(raw)
    }

    fn validate(raw: RawTable) -> Result<Self, PriceError> {
        let mut prices = Vec::with_capacity(raw.price.len());
        for (i, p) in raw.price.into_iter().enumerate() {
            let key = |field: &str| format!("price[{i}].{field}");
            let invalid = |field: &str, message: String| PriceError::Invalid {
                key: key(field),
                message,
            };
            if p.model.trim().is_empty() {
                return Err(invalid("model", "is empty; name the model as the provider spells it, e.g. model = \"gpt-4o-mini\"".into()));
            }
            if p.provider.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(invalid("provider", "is empty; name a configured provider or leave the key out to match any provider".into()));
            }
            if !is_date(&p.effective) {
                return Err(invalid(
                    "effective",
                    format!(
                        "{:?} is not a date; write it as YYYY-MM-DD, e.g. effective = \"2024-07-18\"",
                        p.effective
                    ),
                ));
            }
            let fields = [
                ("input_per_mtok", p.input_per_mtok),
                ("output_per_mtok", p.output_per_mtok),
                ("cached_input_per_mtok", p.cached_input_per_mtok),
                ("per_audio_minute", p.per_audio_minute),
                ("per_request", p.per_request),
            ];
            for (field, value) in fields {
                if let Some(v) = value
                    && !(v.is_finite() && v >= 0.0)
                {
                    return Err(invalid(
                        field,
                        format!("is {v}; prices are dollars and must be 0 or more"),
                    ));
                }
            }
            if fields.iter().all(|(_, v)| v.is_none()) {
                return Err(invalid(
                    "model",
                    format!(
                        "the entry for {:?} has no price; set input_per_mtok and output_per_mtok, per_audio_minute or per_request (0.0 for a free model)",
                        p.model
                    ),
                ));
            }
            let input = p.input_per_mtok.unwrap_or(0.0);
            let price = Price {
                provider: p.provider,
                model: p.model,
                effective: p.effective,
                input_per_mtok: input,
                output_per_mtok: p.output_per_mtok.unwrap_or(0.0),
                cached_input_per_mtok: p.cached_input_per_mtok.unwrap_or(input),
                per_audio_minute: p.per_audio_minute.unwrap_or(0.0),
                per_request: p.per_request.unwrap_or(0.0),
            };
            if let Some(j) = prices.iter().position(|q: &Price| {
                q.provider == price.provider
                    && q.model == price.model
                    && q.effective == price.effective
            }) {
                return Err(invalid(
                    "effective",
                    format!(
                        "price[{j}] already prices {:?} from {}; remove one of them or change its date",
                        price.model, price.effective
                    ),
                ));
            }
            prices.push(price);
        }
        let compute = match raw.compute {
            None => ComputePrices::default(),
            Some(c) => {
                for (field, v) in [
                    ("cpu_hour_usd", c.cpu_hour_usd),
                    ("gpu_hour_usd", c.gpu_hour_usd),
                ] {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(PriceError::Invalid {
                            key: format!("compute.{field}"),
                            message: format!("is {v}; an hourly price must be 0 or more"),
                        });
                    }
                }
                ComputePrices {
                    cpu_hour_usd: c.cpu_hour_usd,
                    gpu_hour_usd: c.gpu_hour_usd,
                }
            }
        };
        Ok(Self { prices, compute })
    }

    /// The price in force on `date` (`YYYY-MM-DD`): the newest entry for the
    /// model dated on or before it; on the same date an entry naming the
    /// provider beats one that matches any provider.
    pub fn price(&self, provider: &str, model: &str, date: &str) -> Option<&Price> {
        self.prices
            .iter()
            .filter(|p| p.model == model && p.effective.as_str() <= date)
            .filter(|p| p.provider.as_deref().is_none_or(|name| name == provider))
            .max_by(|a, b| {
                (a.effective.as_str(), a.provider.is_some())
                    .cmp(&(b.effective.as_str(), b.provider.is_some()))
            })
    }

    /// The dollar cost of one call, `None` when the table has no price for it.
    pub fn cost(
        &self,
        provider: &str,
        model: &str,
        usage: &Usage,
        audio_seconds: f64,
        date: &str,
    ) -> Option<f64> {
        self.price(provider, model, date)
            .map(|p| p.cost(usage, audio_seconds))
    }

    /// The cost of a call whose model has no price: at the dearest price in
    /// force on `date` among the entries naming `provider`, else among all
    /// entries. `None` only when the table has no price in force at all.
    pub fn dearest_cost(
        &self,
        provider: &str,
        usage: &Usage,
        audio_seconds: f64,
        date: &str,
    ) -> Option<f64> {
        let in_force = |named: bool| {
            self.prices
                .iter()
                .filter(|p| p.effective.as_str() <= date)
                .filter(move |p| !named || p.provider.as_deref() == Some(provider))
                .filter_map(|p| {
                    let owner = p.provider.as_deref().unwrap_or(provider);
                    self.price(owner, &p.model, date)
                })
                .map(|p| p.cost(usage, audio_seconds))
                .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.max(c))))
        };
        in_force(true).or_else(|| in_force(false))
    }

    /// What running locally for `duration` costs.
    pub fn compute_cost(&self, duration: Duration, gpu: bool) -> f64 {
        let rate = if gpu {
            self.compute.gpu_hour_usd
        } else {
            self.compute.cpu_hour_usd
        };
        duration.as_secs_f64() / 3600.0 * rate
    }

    pub fn compute(&self) -> ComputePrices {
        self.compute
    }

    pub fn prices(&self) -> &[Price] {
        &self.prices
    }

    /// Today's date in UTC as `YYYY-MM-DD`.
    pub fn today() -> String {
        utc_date(Timestamp::now())
    }
}

/// `YYYY-MM-DD`: the UTC date of `at`.
fn utc_date(at: Timestamp) -> String {
    at.to_zoned_datetime(TimeZone::UTC).date().to_string()
}

/// A real date written as `YYYY-MM-DD` (so that it orders as a string).
fn is_date(s: &str) -> bool {
    s.parse::<Date>().is_ok_and(|d| d.to_string() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
        [[price]]
        provider = "openai"
        model = "gpt-4o-mini"
        effective = "2024-07-18"
        input_per_mtok = 0.15
        output_per_mtok = 0.60
        cached_input_per_mtok = 0.075

        [[price]]
        provider = "openai"
        model = "gpt-4o-mini"
        effective = "2025-01-01"
        input_per_mtok = 0.10
        output_per_mtok = 0.40

        [[price]]
        model = "llama-3.1-8b"
        effective = "2024-01-01"
        input_per_mtok = 0.05
        output_per_mtok = 0.08

        [[price]]
        provider = "groq"
        model = "llama-3.1-8b"
        effective = "2024-01-01"
        input_per_mtok = 0.06
        output_per_mtok = 0.09

        [[price]]
        provider = "openai"
        model = "whisper-1"
        effective = "2023-03-01"
        per_audio_minute = 0.006

        [[price]]
        model = "omni-moderation-latest"
        effective = "2024-09-26"
        per_request = 0.0

        [compute]
        cpu_hour_usd = 0.05
        gpu_hour_usd = 1.20
    "#;

    fn table() -> PriceTable {
        PriceTable::from_toml_str(TABLE).unwrap()
    }

    fn err(text: &str) -> String {
        PriceTable::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn the_newest_entry_on_or_before_the_date_wins() {
        let t = table();
        assert_eq!(t.price("openai", "gpt-4o-mini", "2024-07-17"), None);
        assert_eq!(
            t.price("openai", "gpt-4o-mini", "2024-07-18")
                .unwrap()
                .input_per_mtok,
            0.15
        );
        assert_eq!(
            t.price("openai", "gpt-4o-mini", "2024-12-31")
                .unwrap()
                .input_per_mtok,
            0.15
        );
        assert_eq!(
            t.price("openai", "gpt-4o-mini", "2025-01-01")
                .unwrap()
                .input_per_mtok,
            0.10
        );
        assert_eq!(
            t.price("openai", "gpt-4o-mini", "2030-06-01")
                .unwrap()
                .input_per_mtok,
            0.10
        );
        // Another provider does not get OpenAI's price.
        assert_eq!(t.price("azure", "gpt-4o-mini", "2025-01-01"), None);
        assert_eq!(t.price("openai", "gpt-4o", "2025-01-01"), None);
    }

    #[test]
    fn an_entry_without_provider_matches_any_and_a_named_one_beats_it() {
        let t = table();
        assert_eq!(
            t.price("together", "llama-3.1-8b", "2024-06-01")
                .unwrap()
                .input_per_mtok,
            0.05
        );
        assert_eq!(
            t.price("groq", "llama-3.1-8b", "2024-06-01")
                .unwrap()
                .input_per_mtok,
            0.06
        );
    }

    #[test]
    fn cached_input_defaults_to_the_input_price() {
        let t = table();
        let p = t.price("openai", "gpt-4o-mini", "2025-02-01").unwrap();
        assert_eq!(p.cached_input_per_mtok, 0.10);
        assert_eq!(p.per_request, 0.0);
        assert_eq!(p.per_audio_minute, 0.0);
    }

    #[test]
    fn cost_bills_cached_tokens_as_a_subset_of_input_at_the_cached_rate() {
        let t = table();
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 500_000,
            cached_input_tokens: 400_000,
            reasoning_tokens: 100_000,
        };
        let cost = t
            .cost("openai", "gpt-4o-mini", &usage, 0.0, "2024-08-01")
            .unwrap();
        // 600k uncached * 0.15 + 400k cached * 0.075 + 500k out * 0.60 (reasoning inside)
        let expected = 0.6 * 0.15 + 0.4 * 0.075 + 0.5 * 0.60;
        assert!((cost - expected).abs() < 1e-12, "{cost} != {expected}");
        // More cached than input (a provider bug) never yields a negative count.
        let odd = Usage {
            input_tokens: 10,
            cached_input_tokens: 20,
            ..Usage::default()
        };
        let c = t
            .cost("openai", "gpt-4o-mini", &odd, 0.0, "2024-08-01")
            .unwrap();
        assert!((c - 10.0 * 0.075 / 1e6).abs() < 1e-15);
    }

    #[test]
    fn an_unpriced_model_costs_the_providers_dearest_price_in_force() {
        let t = table();
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            ..Usage::default()
        };
        // openai's entries in force in 2025: gpt-4o-mini at 0.10 + 0.40 (its
        // older 0.15 + 0.60 is superseded), whisper-1 with no token price.
        let c = t.dearest_cost("openai", &usage, 0.0, "2025-06-01").unwrap();
        assert!((c - 0.50).abs() < 1e-9, "{c}");
        // In 2024 the older, dearer price was in force.
        let c = t.dearest_cost("openai", &usage, 0.0, "2024-08-01").unwrap();
        assert!((c - 0.75).abs() < 1e-9, "{c}");
        // A provider the table never names: the dearest of every entry.
        let c = t
            .dearest_cost("mystery", &usage, 0.0, "2025-06-01")
            .unwrap();
        assert!((c - 0.50).abs() < 1e-9, "{c}");
        assert_eq!(
            PriceTable::default().dearest_cost("openai", &usage, 0.0, "2025-06-01"),
            None
        );
    }

    #[test]
    fn cost_bills_audio_by_the_minute_and_requests_flat() {
        let t = table();
        let c = t
            .cost("openai", "whisper-1", &Usage::default(), 90.0, "2025-01-01")
            .unwrap();
        assert!((c - 1.5 * 0.006).abs() < 1e-12);
        let flat = PriceTable::from_toml_str(
            "[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\nper_request = 0.002\ninput_per_mtok = 1.0\n",
        )
        .unwrap();
        let usage = Usage {
            input_tokens: 1000,
            ..Usage::default()
        };
        let c = flat.cost("any", "m", &usage, 0.0, "2024-01-01").unwrap();
        assert!((c - (0.002 + 0.001)).abs() < 1e-12);
        assert_eq!(t.cost("x", "unknown", &usage, 0.0, "2025-01-01"), None);
    }

    #[test]
    fn compute_cost_is_hours_times_rate() {
        let t = table();
        assert!((t.compute_cost(Duration::from_secs(1800), true) - 0.6).abs() < 1e-12);
        assert!((t.compute_cost(Duration::from_secs(36), false) - 0.0005).abs() < 1e-12);
        assert_eq!(
            PriceTable::default().compute_cost(Duration::from_secs(3600), true),
            0.0
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = PriceTable::from_toml_str(
            "[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\ninput_per_mtok = 1.0\noutput_per_mtoken = 2.0\n",
        )
        .unwrap_err();
        assert!(matches!(e, PriceError::Parse { .. }));
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("output_per_mtoken"), "{source}");
        assert!(matches!(
            PriceTable::from_toml_str("[compute]\ntpu_hour_usd = 3.0\n"),
            Err(PriceError::Parse { .. })
        ));
    }

    #[test]
    fn validation_names_the_entry_and_the_fix() {
        let e = err(
            "[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\ninput_per_mtok = 1.0\n[[price]]\nmodel = \"m\"\neffective = \"2024-13-01\"\ninput_per_mtok = 1.0\n",
        );
        assert!(e.starts_with("price[1].effective:"), "{e}");
        assert!(e.contains("YYYY-MM-DD"), "{e}");
        for bad in [
            "2024-02-30",
            "2023-02-29",
            "2024-1-01",
            "24-01-01",
            "2024/01/01",
            "2024-01-00",
            "",
        ] {
            let e = err(&format!(
                "[[price]]\nmodel = \"m\"\neffective = \"{bad}\"\nper_request = 0.0\n"
            ));
            assert!(e.starts_with("price[0].effective:"), "{bad}: {e}");
        }
        assert!(is_date("2024-02-29") && is_date("2000-02-29") && !is_date("1900-02-29"));

        let e =
            err("[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\ninput_per_mtok = -1.0\n");
        assert!(
            e.starts_with("price[0].input_per_mtok:") && e.contains("0 or more"),
            "{e}"
        );
        let e = err("[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\ninput_per_mtok = nan\n");
        assert!(e.starts_with("price[0].input_per_mtok:"), "{e}");
        let e = err("[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\n");
        assert!(
            e.starts_with("price[0].model:") && e.contains("no price"),
            "{e}"
        );
        let e = err("[[price]]\nmodel = \" \"\neffective = \"2024-01-01\"\nper_request = 0.0\n");
        assert!(e.starts_with("price[0].model:"), "{e}");
        let e = err(
            "[[price]]\nprovider = \"\"\nmodel = \"m\"\neffective = \"2024-01-01\"\nper_request = 0.0\n",
        );
        assert!(e.starts_with("price[0].provider:"), "{e}");
        let e = err("[compute]\ngpu_hour_usd = -2.0\n");
        assert!(e.starts_with("compute.gpu_hour_usd:"), "{e}");
        let dup = "[[price]]\nmodel = \"m\"\neffective = \"2024-01-01\"\nper_request = 0.0\n";
        let e = err(&format!("{dup}{dup}"));
        assert!(
            e.starts_with("price[1].effective:") && e.contains("price[0]"),
            "{e}"
        );
    }

    #[test]
    fn load_reports_the_path() {
        let e = PriceTable::load("/nonexistent/prices.toml").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/prices.toml"), "{e}");
        let dir = std::env::temp_dir().join(format!("triage-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prices.toml");
        std::fs::write(&path, TABLE).unwrap();
        assert_eq!(PriceTable::load(&path).unwrap().prices().len(), 6);
        std::fs::write(&path, "[[price]]\nmodel = 3\n").unwrap();
        let e = PriceTable::load(&path).unwrap_err();
        assert!(e.to_string().contains("prices.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn civil_dates_from_unix_days() {
        let date_from_unix_days =
            |days: i64| utc_date(Timestamp::from_second(days * 86_400).unwrap());
        assert_eq!(date_from_unix_days(0), "1970-01-01");
        assert_eq!(date_from_unix_days(-1), "1969-12-31");
        assert_eq!(date_from_unix_days(59), "1970-03-01");
        assert_eq!(date_from_unix_days(11_016), "2000-02-29");
        assert_eq!(date_from_unix_days(19_722), "2023-12-31");
        assert_eq!(date_from_unix_days(19_782), "2024-02-29");
        assert_eq!(date_from_unix_days(20_089), "2025-01-01");
        let today = PriceTable::today();
        assert!(is_date(&today) && today.as_str() >= "2024-01-01", "{today}");
    }
}
