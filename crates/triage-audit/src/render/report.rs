//! `triage audit --out`: the report as one self-contained HTML file (inline
//! SVG and CSS, nothing fetched), a PNG of the frontier plot (rasterised like
//! `triage eval --out`), or the JSON object.

use super::{RenderError, svg_to_png, xml_escape};
use crate::audit::{AuditReport, Frontier};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Html,
    Png,
    Json,
}

fn format_of(path: &Path) -> Option<Format> {
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("html" | "htm") => Some(Format::Html),
        Some("png") => Some(Format::Png),
        Some("json") => Some(Format::Json),
        _ => None,
    }
}

/// Refuse a report name we cannot write before any work is done.
pub fn check_out(path: &Path) -> Result<(), RenderError> {
    if format_of(path).is_none() {
        return Err(RenderError::UnknownFormat(path.to_owned()));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir
        && !d.is_dir()
    {
        return Err(RenderError::NoFolder {
            path: path.to_owned(),
            dir: d.to_owned(),
        });
    }
    Ok(())
}

/// Write `report` to `path` in the format its extension names.
pub fn write(path: &Path, report: &AuditReport) -> Result<(), RenderError> {
    let bytes = match format_of(path) {
        Some(Format::Html) => html(report).into_bytes(),
        Some(Format::Png) if report.frontier.is_empty() => {
            return Err(RenderError::NothingToPlot {
                path: path.to_owned(),
                task: report.task.clone(),
            });
        }
        Some(Format::Png) => svg_to_png(&frontier_svg(report))?,
        Some(Format::Json) => serde_json::to_vec_pretty(report).map_err(RenderError::Json)?,
        None => return Err(RenderError::UnknownFormat(path.to_owned())),
    };
    std::fs::write(path, bytes).map_err(|source| RenderError::Write {
        path: path.to_owned(),
        source,
    })
}

/// One point of the plot: a band of a moderation cascade's local tier, or a
/// setting of a router's or pipeline's knob.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    cost: f64,
    accuracy: Option<f64>,
    share: f64,
    /// `lo 0.2 hi 0.8`, `min_score 0.7`.
    setting: String,
}

/// The frontier as plot points, the configured one, and what the y axis and
/// the share are.
fn points(r: &AuditReport) -> (Vec<Point>, Option<Point>, &'static str, &'static str) {
    match &r.frontier {
        Frontier::Bands(v) => {
            let band = |p: &crate::audit::BandPoint| Point {
                cost: p.cost_per_100k_usd,
                accuracy: p.local_accuracy,
                share: p.local_share,
                setting: format!("band {}–{}", p.lo, p.hi),
            };
            (
                v.iter().map(band).collect(),
                r.band.as_ref().map(band),
                "local accuracy",
                "local",
            )
        }
        Frontier::Knob(v) => {
            let knob = |p: &crate::audit::KnobPoint| Point {
                cost: p.cost_per_100k_usd,
                accuracy: p.accuracy,
                share: p.share,
                setting: format!("{} {}", p.knob, p.value),
            };
            let share = match v.first().map(|p| p.knob) {
                Some("min_score") => "without a model",
                _ => "at the first model",
            };
            (
                v.iter().map(knob).collect(),
                r.setting.as_ref().map(knob),
                r.metric.unwrap_or("accuracy"),
                share,
            )
        }
    }
}

/// Points no other point beats on both cost and accuracy, by cost.
fn pareto(points: &[Point]) -> Vec<Point> {
    let mut v: Vec<Point> = points
        .iter()
        .filter(|p| p.accuracy.is_some())
        .cloned()
        .collect();
    v.sort_by(|a, b| {
        a.cost.total_cmp(&b.cost).then(
            b.accuracy
                .unwrap_or(0.0)
                .total_cmp(&a.accuracy.unwrap_or(0.0)),
        )
    });
    let mut out: Vec<Point> = Vec::new();
    for p in v {
        let acc = p.accuracy.unwrap_or(0.0);
        if out.last().is_none_or(|q| acc > q.accuracy.unwrap_or(0.0)) {
            out.push(p);
        }
    }
    out
}

/// Cost per 100k requests (x) against accuracy (y) for every point of the
/// frontier; the Pareto front as a line and the configured setting marked.
pub fn frontier_svg(report: &AuditReport) -> String {
    const W: f64 = 720.0;
    const H: f64 = 460.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 30.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 60.0;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let (all, chosen, y_title, share_is) = points(report);
    let points: Vec<&Point> = all.iter().filter(|p| p.accuracy.is_some()).collect();
    let max_cost = points
        .iter()
        .map(|p| p.cost)
        .chain(chosen.as_ref().map(|b| b.cost))
        .chain([report.all_llm_cost_per_100k_usd])
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let min_acc = points
        .iter()
        .filter_map(|p| p.accuracy)
        .fold(1.0_f64, f64::min);
    let y0 = ((min_acc * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let x = |c: f64| LEFT + (c / max_cost).clamp(0.0, 1.0) * pw;
    let y = |a: f64| TOP + (1.0 - ((a - y0) / (1.0 - y0)).clamp(0.0, 1.0)) * ph;
    let title = format!(
        "{}: cost against {y_title} over {} settings (n = {})",
        report.task,
        report.frontier.len(),
        report.n
    );
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"28\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        xml_escape(&title)
    );
    for i in 0..=5 {
        let c = max_cost * f64::from(i) / 5.0;
        let px = x(c);
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#eeeeee\"/>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{c:.2}</text>\n",
            TOP + ph,
            TOP + ph + 20.0,
        ));
    }
    for i in 0..=5 {
        let a = y0 + (1.0 - y0) * f64::from(i) / 5.0;
        let py = y(a);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#dddddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{a:.2}</text>\n",
            LEFT + pw,
            LEFT - 8.0,
            py + 4.0,
        ));
    }
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">$ per 100k requests (all-LLM: {:.2})</text>\n\
         <text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">{}</text>\n",
        TOP + ph,
        TOP + ph,
        LEFT + pw,
        TOP + ph,
        LEFT + pw / 2.0,
        H - 15.0,
        report.all_llm_cost_per_100k_usd,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        xml_escape(y_title),
    ));
    for p in &points {
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#9ecae1\">\
             <title>{}: share {share_is} {:.3}, accuracy {:.4}, ${:.4} per 100k</title></circle>\n",
            x(p.cost),
            y(p.accuracy.unwrap_or(0.0)),
            xml_escape(&p.setting),
            p.share,
            p.accuracy.unwrap_or(0.0),
            p.cost
        ));
    }
    let front: Vec<String> = pareto(&all)
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.cost), y(p.accuracy.unwrap_or(0.0))))
        .collect();
    s.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        front.join(" ")
    ));
    if let Some(b) = &chosen
        && let Some(a) = b.accuracy
    {
        let (bx, by) = (x(b.cost), y(a));
        // The label goes on the side of the marker with room for it.
        let (lx, anchor) = if bx > LEFT + 0.6 * pw {
            (bx - 10.0, "end")
        } else {
            (bx + 10.0, "start")
        };
        s.push_str(&format!(
            "<circle cx=\"{bx:.1}\" cy=\"{by:.1}\" r=\"7\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"3\" class=\"chosen\"/>\n\
             <text x=\"{lx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#d62728\">{}: {:.0}% {share_is} at {:.3}</text>\n",
            by - 12.0,
            xml_escape(&b.setting),
            b.share * 100.0,
            a
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The whole report as one HTML file with no external resources.
pub fn html(r: &AuditReport) -> String {
    let mut rows = String::new();
    for t in &r.tiers {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.1}%</td><td>{}</td><td>{:.6}</td><td>{}</td><td>{}</td></tr>\n",
            xml_escape(&t.tier),
            xml_escape(&t.model),
            t.share * 100.0,
            opt(t.accuracy, 4),
            t.cost_usd,
            opt(t.latency_ms_p50, 1),
            opt(t.latency_ms_p99, 1),
        ));
    }
    let assumptions: String = r
        .assumptions
        .iter()
        .map(|a| format!("<li>{}</li>\n", xml_escape(a)))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>triage audit: {task}</title>\n<style>\
         body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}\
         td:first-child,td:nth-child(2),th{{text-align:left}}</style></head><body>\n\
         <h1>Audit of <code>{task}</code> ({mode}, n = {n})</h1>\n\
         <p>The task: <b>${cost:.2}</b> per 100k requests against <b>${all:.2}</b> for the all-LLM path \
         ({savings} saved); overall {metric} {acc}.{band}</p>\n{svg}\
         <h2>Tiers</h2>\n<table><tr><th>tier</th><th>model</th><th>share</th><th>accuracy</th>\
         <th>cost $</th><th>p50 ms</th><th>p99 ms</th></tr>\n{rows}</table>\n\
         <h2>Assumptions</h2>\n<ul>\n{assumptions}</ul>\n</body></html>\n",
        task = xml_escape(&r.task),
        mode = r.mode,
        n = r.n,
        cost = r.cost_per_100k_usd,
        all = r.all_llm_cost_per_100k_usd,
        savings = r.savings_pct.map_or("–".into(), |s| format!("{s:.1}%")),
        acc = opt(r.accuracy, 4),
        metric = r.metric.unwrap_or("accuracy"),
        band = match (&r.band, &r.setting) {
            (Some(b), _) => format!(
                " Local band lo = {}, hi = {}: the local tier answers {:.1}% at accuracy {}.",
                b.lo,
                b.hi,
                b.local_share * 100.0,
                opt(b.local_accuracy, 4)
            ),
            (None, Some(k)) => format!(
                " Configured {} = {}: share {:.1}%, ${:.2} per 100k.",
                k.knob,
                k.value,
                k.share * 100.0,
                k.cost_per_100k_usd
            ),
            (None, None) => String::new(),
        },
        svg = if !r.frontier.is_empty() {
            format!("<h2>Cost against accuracy</h2>\n{}\n", frontier_svg(r))
        } else {
            String::new()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(lo: f64, hi: f64, share: f64, acc: f64, cost: f64) -> Point {
        Point {
            cost,
            accuracy: Some(acc),
            share,
            setting: format!("{lo} {hi}"),
        }
    }

    #[test]
    fn pareto_keeps_only_undominated_bands() {
        let pts = [
            point(0.5, 0.5, 1.0, 0.80, 0.1),
            point(0.3, 0.7, 0.6, 0.90, 1.0),
            point(0.2, 0.8, 0.5, 0.85, 1.5),
            point(0.1, 0.9, 0.3, 0.95, 2.0),
        ];
        let front = pareto(&pts);
        let his: Vec<&str> = front.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(his, vec!["0.5 0.5", "0.3 0.7", "0.1 0.9"]);
    }
}
