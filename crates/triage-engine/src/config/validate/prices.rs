//! The price table: `prices_file`, inline `[[price]]` entries and
//! `[compute]`, merged and handed to the cloud crate's parser.

use triage_cloud::prices::PriceTable;

use super::super::raw::RawConfig;
use super::Validator;

impl Validator {
    pub(super) fn prices(&mut self, raw: &RawConfig) -> Option<PriceTable> {
        let mut doc = toml::Table::new();
        let mut entries: Vec<toml::Value> = Vec::new();
        if let Some(file) = &raw.prices_file {
            let path = self.base_dir.join(file);
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
            {
                Ok(mut t) => {
                    if let Some(toml::Value::Array(a)) = t.remove("price") {
                        entries.extend(a);
                    }
                    if let Some(c) = t.remove("compute") {
                        doc.insert("compute".into(), c);
                    }
                }
                Err(e) => self.problem(
                    "prices_file",
                    format!("cannot read {}: {e}", path.display()),
                    "point prices_file at a price-table TOML file (relative to this config)",
                ),
            }
        }
        entries.extend(raw.price.iter().cloned().map(toml::Value::Table));
        if let Some(c) = &raw.compute {
            doc.insert("compute".into(), toml::Value::Table(c.clone()));
        }
        doc.insert("price".into(), toml::Value::Array(entries));
        let text = toml::to_string(&doc).unwrap_or_default();
        match PriceTable::from_toml_str(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(
                    "price",
                    e.to_string(),
                    "fix the [[price]] entry named above",
                );
                None
            }
        }
    }
}
