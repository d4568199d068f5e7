//! Report figures, each drawn once into an SVG string and once into a PNG
//! with the bundled DejaVu Sans font, so PNGs look the same on every machine.

pub mod accuracy;
pub mod bars;
pub mod latency;
pub mod memory;
pub mod throughput;
pub mod ticks;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::runner::result::ExperimentResult;

/// DejaVu Sans, embedded (license: assets/fonts/LICENSE-DejaVu.txt).
static DEJAVU_SANS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/DejaVuSans.ttf"
));

/// Font family name every figure uses; registered by [`register_fonts`].
pub const FONT: &str = "sans-serif";

/// Registers the bundled font with plotters (once per process).
pub fn register_fonts() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
            .map_err(|_| "the bundled DejaVu Sans font could not be parsed".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Distinct colours for experiments, reused cyclically.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 100, 180),
    RGBColor(230, 120, 20),
    RGBColor(40, 150, 60),
    RGBColor(200, 40, 45),
    RGBColor(130, 90, 180),
    RGBColor(140, 85, 70),
    RGBColor(220, 100, 180),
    RGBColor(100, 100, 100),
    RGBColor(170, 170, 30),
    RGBColor(20, 170, 190),
];

/// Colour of the `i`-th experiment.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Colour of the Pareto frontier and of emphasis marks.
pub const ACCENT: RGBColor = RGBColor(170, 20, 30);

/// Text style of the given size in the bundled font.
pub fn text(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

/// One experiment as the figures see it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub result: &'a ExperimentResult,
}

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    /// Pixel size.
    fn size(&self) -> (u32, u32);

    /// Draws the whole figure on `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// A written figure.
#[derive(Clone, Debug)]
pub struct PlotFile {
    /// File name without extension (`<stem>.png`, `<stem>.svg`).
    pub stem: String,
    pub title: String,
    /// The SVG document, for inlining.
    pub svg: String,
    /// What the figure leaves out or how to read it.
    pub notes: Vec<String>,
}

/// Writes `fig` as `<dir>/<stem>.svg` and `<dir>/<stem>.png`.
pub fn write(
    fig: &impl Figure,
    dir: &Path,
    stem: &str,
    title: &str,
    notes: Vec<String>,
) -> Result<PlotFile> {
    register_fonts()?;
    let size = fig.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        fig.draw(&root)
            .with_context(|| format!("drawing {stem}.svg"))?;
        root.present()
            .with_context(|| format!("drawing {stem}.svg"))?;
    }
    let svg_path = dir.join(format!("{stem}.svg"));
    std::fs::write(&svg_path, &svg)
        .with_context(|| format!("{}: cannot write", svg_path.display()))?;
    let png_path = dir.join(format!("{stem}.png"));
    {
        let root = BitMapBackend::new(&png_path, size).into_drawing_area();
        fig.draw(&root)
            .with_context(|| format!("drawing {}", png_path.display()))?;
        root.present()
            .with_context(|| format!("{}: cannot write", png_path.display()))?;
    }
    Ok(PlotFile {
        stem: stem.to_string(),
        title: title.to_string(),
        svg,
        notes,
    })
}

/// Pixel size of `s` in `style` on `area`.
pub fn text_size<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    style: &TextStyle,
) -> Result<(i32, i32)>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.estimate_text_size(s, style)?;
    Ok((w as i32, h as i32))
}

/// A padded axis range around `lo..hi`: `pad` of the span on each side, or
/// ±`min_half` around a single value.
pub fn padded(lo: f64, hi: f64, pad: f64, min_half: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= 0.0 || !span.is_finite() {
        (lo - min_half, hi + min_half)
    } else {
        (lo - pad * span, hi + pad * span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_ranges() {
        assert_eq!(padded(4.0, 16.0, 0.1, 1.0), (2.8, 17.2));
        assert_eq!(padded(5.0, 5.0, 0.1, 1.0), (4.0, 6.0));
    }

    #[test]
    fn bundled_font_registers() {
        register_fonts().unwrap();
        register_fonts().unwrap();
    }
}
