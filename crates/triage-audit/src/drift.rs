//! Drift of a cascade's tiers on live traffic: how often each tier agreed
//! with the shadow checks the ledger holds, against the accuracy that
//! `triage calibrate --write` promised (`triage audit --from-ledger`).

use serde::Serialize;
use triage_engine::config::Cascade;
use triage_engine::ledger::ShadowAgreement;

/// One (tier, shadow tier) line of `triage audit --from-ledger`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowLine {
    pub tier: String,
    pub shadow_tier: String,
    pub checked: i64,
    pub agreed: i64,
    /// Agreement with the next tier: the estimate of local accuracy on traffic.
    pub agreement: Option<f64>,
    /// Wilson 95% interval of the agreement.
    pub ci95: Option<[f64; 2]>,
    /// What `triage calibrate --write` promised (`calibrated_accuracy`).
    pub calibrated_accuracy: Option<f64>,
    /// Set when the agreement is below the promise.
    pub warning: Option<String>,
}

/// The Wilson 95% interval of `agreed` successes in `n` checks.
pub fn wilson(agreed: i64, n: i64) -> Option<[f64; 2]> {
    if n <= 0 {
        return None;
    }
    let (n, p, z) = (n as f64, agreed as f64 / n as f64, 1.96_f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

/// Each row's agreement, interval and promise, with a warning where the
/// agreement fell below what calibration promised.
pub fn shadow_lines(cascade: &Cascade, rows: Vec<ShadowAgreement>) -> Vec<ShadowLine> {
    rows.into_iter()
        .map(|r| {
            let promised = cascade
                .tiers
                .iter()
                .find(|t| t.name == r.tier)
                .and_then(|t| t.calibrated_accuracy);
            let agreement = (r.checked > 0).then(|| r.agreed as f64 / r.checked as f64);
            let ci95 = wilson(r.agreed, r.checked);
            let warning = match (agreement, promised, ci95) {
                (Some(a), Some(p), Some([_, upper])) if a < p => {
                    let sure = if upper < p {
                        "significantly (the 95% interval lies below it)"
                    } else {
                        "though within noise so far"
                    };
                    Some(format!(
                        "tier `{}`: agreement with `{}` is {a:.3} on {} shadow check(s), below the calibrated accuracy {p} {sure}; recalibrate with triage calibrate",
                        r.tier, r.shadow_tier, r.checked
                    ))
                }
                _ => None,
            };
            ShadowLine {
                tier: r.tier,
                shadow_tier: r.shadow_tier,
                checked: r.checked,
                agreed: r.agreed,
                agreement,
                ci95,
                calibrated_accuracy: promised,
                warning,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_brackets_the_rate_and_stays_in_bounds() {
        assert_eq!(wilson(0, 0), None);
        let [lo, hi] = wilson(90, 100).unwrap_or([0.0, 0.0]);
        assert!(lo < 0.9 && 0.9 < hi, "{lo} {hi}");
        assert!(
            (lo - 0.825).abs() < 0.01 && (hi - 0.945).abs() < 0.01,
            "{lo} {hi}"
        );
        let [lo, hi] = wilson(10, 10).unwrap_or([0.0, 0.0]);
        assert!(lo > 0.6 && hi > 0.99 && hi <= 1.0, "{lo} {hi}");
    }
}
