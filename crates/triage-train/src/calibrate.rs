//! Temperature scaling (Guo et al., 2017): one scalar T dividing the logits,
//! fitted to minimise the validation negative log-likelihood. It changes
//! confidences, never the argmax, so accuracy is untouched.

use serde::Serialize;

/// The fitted temperature and what it did on the validation set.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Calibration {
    pub temperature: f32,
    pub nll_before: f32,
    pub nll_after: f32,
    /// Expected calibration error (15 equal-width confidence bins).
    pub ece_before: f32,
    pub ece_after: f32,
    pub n: usize,
}

fn log_softmax(z: &[f32], t: f32) -> Vec<f32> {
    let scaled: Vec<f32> = z.iter().map(|v| v / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + scaled.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    scaled.iter().map(|v| v - lse).collect()
}

fn nll(logits: &[Vec<f32>], gold: &[usize], t: f32) -> f32 {
    let total: f64 = logits
        .iter()
        .zip(gold)
        .map(|(z, &g)| -f64::from(log_softmax(z, t)[g]))
        .sum();
    (total / logits.len().max(1) as f64) as f32
}

/// Expected calibration error of (confidence, correct) pairs, 15 bins.
pub fn ece(pairs: &[(f32, bool)]) -> f32 {
    let correct: Vec<bool> = pairs.iter().map(|p| p.1).collect();
    let confidence: Vec<f64> = pairs.iter().map(|p| f64::from(p.0)).collect();
    crate::metrics::expected_calibration_error(&correct, &confidence, 15) as f32
}

fn confidence_pairs(logits: &[Vec<f32>], gold: &[usize], t: f32) -> Vec<(f32, bool)> {
    logits
        .iter()
        .zip(gold)
        .map(|(z, &g)| {
            let lp = log_softmax(z, t);
            let (arg, best) = lp
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            (best.exp(), arg == g)
        })
        .collect()
}

/// Fit T by golden-section search on log T in [1/20, 20].
pub fn fit_temperature(logits: &[Vec<f32>], gold: &[usize]) -> Calibration {
    let f = |log_t: f64| f64::from(nll(logits, gold, log_t.exp() as f32));
    let (mut a, mut b) = ((1.0f64 / 20.0).ln(), 20f64.ln());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - phi * (b - a), a + phi * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + phi * (b - a);
            fd = f(d);
        }
    }
    let t = (((a + b) / 2.0).exp()) as f32;
    Calibration {
        temperature: t,
        nll_before: nll(logits, gold, 1.0),
        nll_after: nll(logits, gold, t),
        ece_before: ece(&confidence_pairs(logits, gold, 1.0)),
        ece_after: ece(&confidence_pairs(logits, gold, t)),
        n: logits.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overconfident_logits_get_a_temperature_above_one() {
        // Logits that say 99.99% but are right only 3 times in 4.
        let logits: Vec<Vec<f32>> = (0..400).map(|_| vec![10.0, 0.0]).collect();
        let gold: Vec<usize> = (0..400).map(|i| usize::from(i % 4 == 0)).collect();
        let c = fit_temperature(&logits, &gold);
        // The NLL optimum puts p(class 0) at 0.75: 10 / T = ln 3.
        assert!((c.temperature - 10.0 / 3f32.ln()).abs() < 0.05, "{c:?}");
        assert!(c.nll_after < c.nll_before);
        assert!(c.ece_after < 0.01 && c.ece_before > 0.2, "{c:?}");
    }

    #[test]
    fn ece_of_a_perfectly_calibrated_set_is_zero() {
        let pairs: Vec<(f32, bool)> = (0..100).map(|i| (0.8, i % 5 != 0)).collect();
        assert!(ece(&pairs) < 1e-6);
    }
}
