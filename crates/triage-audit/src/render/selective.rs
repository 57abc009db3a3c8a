//! The selective-accuracy curve of `triage eval --out`: how accurate a
//! specialist is on the most confident fraction of its answers.

use super::xml_escape;

/// One point of the curve: the accuracy on the `coverage` most confident
/// fraction of the items.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub coverage: f64,
    pub accuracy: f64,
}

/// The selective-accuracy curve as a stand-alone SVG: coverage 0.5–1.0 on
/// x, accuracy 0–1 on y, with axes, ticks, grid and labels.
pub fn selective_svg(points: &[CurvePoint], title: &str) -> String {
    const W: f64 = 640.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 30.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 60.0;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |c: f64| LEFT + (c.clamp(0.5, 1.0) - 0.5) / 0.5 * pw;
    let y = |a: f64| TOP + (1.0 - a.clamp(0.0, 1.0)) * ph;

    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"28\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        xml_escape(title)
    );
    for i in 0..=5 {
        let c = 0.5 + f64::from(i) * 0.1;
        let px = x(c);
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{c:.1}</text>\n",
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 20.0,
        ));
    }
    for i in 0..=5 {
        let a = f64::from(i) * 0.2;
        let py = y(a);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#dddddd\"/>\n\
             <line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{LEFT}\" y2=\"{py:.1}\" stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{a:.1}</text>\n",
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            py + 4.0,
        ));
    }
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">coverage (most confident fraction)</text>\n\
         <text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">accuracy</text>\n",
        TOP + ph,
        TOP + ph,
        LEFT + pw,
        TOP + ph,
        LEFT + pw / 2.0,
        H - 15.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
    ));
    let path: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.coverage), y(p.accuracy)))
        .collect();
    s.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        path.join(" ")
    ));
    for p in points {
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#1f77b4\">\
             <title>coverage {:.1}: accuracy {:.4}</title></circle>\n",
            x(p.coverage),
            y(p.accuracy),
            p.coverage,
            p.accuracy
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_axes_ticks_and_one_marker_per_point() {
        let points: Vec<CurvePoint> = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
            .iter()
            .map(|&coverage| CurvePoint {
                coverage,
                accuracy: 0.75,
            })
            .collect();
        let svg = selective_svg(&points, "a <b> & c");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains(">0.5</text>") && svg.contains(">1.0</text>"));
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains("coverage") && svg.contains("accuracy"));
    }
}
