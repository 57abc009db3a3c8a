//! Reports as files: the audit report (HTML, PNG, JSON) and the
//! selective-accuracy curve of `triage eval`, drawn as SVG and rasterised
//! with DejaVu Sans compiled in, so that they render on machines without fonts.

pub mod report;
pub mod selective;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("--out {}: give a file name ending in .html, .png or .json", .0.display())]
    UnknownFormat(PathBuf),
    #[error("--out {}: the folder {} does not exist", .path.display(), .dir.display())]
    NoFolder { path: PathBuf, dir: PathBuf },
    #[error(
        "--out {}: a PNG holds the frontier, and task `{task}` has no setting to re-score; use .html or .json",
        .path.display()
    )]
    NothingToPlot { path: PathBuf, task: String },
    #[error("drawing the curve")]
    Svg(#[source] resvg::usvg::Error),
    #[error("allocating the PNG canvas")]
    Canvas,
    #[error("encoding the PNG")]
    Png(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("serialising the report")]
    Json(#[source] serde_json::Error),
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Rasterise `svg` at twice its size, with DejaVu Sans compiled in so the
/// labels render on machines without fonts.
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>, RenderError> {
    use resvg::{tiny_skia, usvg};
    let mut fonts = usvg::fontdb::Database::new();
    fonts.load_font_data(dejavu::sans::regular().to_vec());
    fonts.set_sans_serif_family("DejaVu Sans");
    let options = usvg::Options {
        font_family: "DejaVu Sans".into(),
        fontdb: std::sync::Arc::new(fonts),
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &options).map_err(RenderError::Svg)?;
    let scale = 2.0;
    let size = tree.size();
    let mut pixmap = tiny_skia::Pixmap::new(
        (size.width() * scale).ceil() as u32,
        (size.height() * scale).ceil() as u32,
    )
    .ok_or(RenderError::Canvas)?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .encode_png()
        .map_err(|e| RenderError::Png(Box::new(e)))
}
