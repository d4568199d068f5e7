//! Horizontal grouped bar charts: one band per experiment (named on the left,
//! first at the top), one bar per series in each band, the value written after
//! each bar, and optional marks (such as a p95) with a whisker from the bar end.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::ticks::FixedTicks;
use super::{Figure, text, text_size};

/// How a series is coloured.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// One colour for the whole series (shown in the key).
    Fixed(RGBColor),
    /// Each band in its experiment's colour.
    PerBand,
}

/// One bar per band.
#[derive(Clone, Debug)]
pub struct BarSeries {
    /// Name in the key (series with `Fill::PerBand` are not keyed).
    pub name: String,
    pub fill: Fill,
    /// Bar length per band; `None` leaves the band's bar out.
    pub values: Vec<Option<f64>>,
    /// A mark per band (drawn as a tick with a whisker from the bar end).
    pub marks: Vec<Option<f64>>,
    /// Text after each bar.
    pub texts: Vec<Option<String>>,
}

/// A horizontal bar chart.
#[derive(Clone, Debug)]
pub struct BarChart {
    pub title: String,
    /// Caption of the value axis.
    pub x_desc: String,
    /// Band names and colours, top to bottom.
    pub bands: Vec<(String, RGBColor)>,
    pub series: Vec<BarSeries>,
    /// Name of the marks in the key, when any series has marks.
    pub mark_name: Option<String>,
}

const WIDTH: u32 = 1100;
const MARGIN: i32 = 20;
const TOP: i32 = 90;
const BOTTOM: i32 = 70;
const LABEL_SIZE: f64 = 17.0;

impl BarChart {
    fn bar_height(&self) -> i32 {
        22
    }

    fn band_height(&self) -> i32 {
        self.series.len() as i32 * self.bar_height() + 18
    }

    /// Largest bar end or mark.
    fn max_value(&self) -> f64 {
        self.series
            .iter()
            .flat_map(|s| s.values.iter().chain(&s.marks))
            .flatten()
            .fold(0.0f64, |a, &b| a.max(b))
    }
}

impl Figure for BarChart {
    fn size(&self) -> (u32, u32) {
        let h = TOP + BOTTOM + self.bands.len() as i32 * self.band_height();
        (WIDTH, h.max(260) as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let label_style = text(LABEL_SIZE);
        let mut label_w = 0;
        for (name, _) in &self.bands {
            label_w = label_w.max(text_size(root, name, &label_style)?.0);
        }
        let left = label_w + 24;
        // Leave room after the longest bar for its text.
        let plot_w = (WIDTH as i32 - 2 * MARGIN - left).max(100) as f64;
        let mut x_hi = self.max_value().max(f64::MIN_POSITIVE);
        for s in &self.series {
            for (v, t) in s.values.iter().zip(&s.texts) {
                let (Some(v), Some(t)) = (v, t) else { continue };
                let end = s.marks.iter().flatten().fold(*v, |a, &b| a.max(b));
                let tw = text_size(root, t, &text(15.0))?.0 as f64 + 12.0;
                if tw < plot_w {
                    x_hi = x_hi.max(end * plot_w / (plot_w - tw));
                }
            }
        }
        x_hi *= 1.02;
        let n = self.bands.len();
        let centers: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
        let names: Vec<&str> = self.bands.iter().map(|(s, _)| s.as_str()).collect();
        let band_of = |y: f64| n - 1 - (y.floor().max(0.0) as usize).min(n - 1);
        let y_fmt = |y: &f64| names[band_of(*y)].to_string();
        let mut chart = ChartBuilder::on(root)
            .margin(MARGIN)
            .margin_top(MARGIN + TOP - 40)
            .caption(&self.title, text(24.0))
            .x_label_area_size(BOTTOM - 10)
            .y_label_area_size(left)
            .build_cartesian_2d(0.0..x_hi, FixedTicks::new(0.0, n as f64, centers))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_desc(self.x_desc.as_str())
            .axis_desc_style(text(18.0))
            .label_style(text(LABEL_SIZE))
            .y_label_formatter(&y_fmt)
            .x_label_formatter(&|x| short_number(*x))
            .draw()?;

        let ns = self.series.len().max(1) as f64;
        let bar = 0.7 / ns;
        for (k, s) in self.series.iter().enumerate() {
            for (i, v) in s.values.iter().enumerate() {
                let Some(v) = *v else { continue };
                let c = (n - 1 - i) as f64;
                let top = c + 0.85 - k as f64 * bar;
                let bottom = top - bar;
                let color = match s.fill {
                    Fill::Fixed(c) => c,
                    Fill::PerBand => self.bands[i].1,
                };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, bottom), (v, top)],
                    color.filled(),
                )))?;
                let mut end = v;
                if let Some(m) = s.marks.get(i).copied().flatten() {
                    let mid = (top + bottom) / 2.0;
                    let style = BLACK.stroke_width(2);
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(v, mid), (m, mid)],
                        style,
                    )))?;
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(m, bottom + 0.1 * bar), (m, top - 0.1 * bar)],
                        style,
                    )))?;
                    end = end.max(m);
                }
                if let Some(t) = s.texts.get(i).cloned().flatten() {
                    let (px, py) = chart.backend_coord(&(end, (top + bottom) / 2.0));
                    let style = text(15.0).pos(Pos::new(HPos::Left, VPos::Center));
                    root.draw(&Text::new(t, (px + 8, py), style))?;
                }
            }
        }
        self.draw_key(root)?;
        Ok(())
    }
}

impl BarChart {
    /// The key in the top-right corner: fixed-colour series and the mark.
    fn draw_key<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let style = text(16.0).pos(Pos::new(HPos::Left, VPos::Center));
        let mut items: Vec<(Option<RGBColor>, &str)> = self
            .series
            .iter()
            .filter_map(|s| match s.fill {
                Fill::Fixed(c) => Some((Some(c), s.name.as_str())),
                Fill::PerBand => None,
            })
            .collect();
        if let Some(m) = &self.mark_name {
            items.push((None, m.as_str()));
        }
        let y = TOP - 28;
        let mut x = WIDTH as i32 - MARGIN;
        for (color, name) in items.iter().rev() {
            let w = text_size(root, name, &style)?.0;
            x -= w;
            root.draw(&Text::new(name.to_string(), (x, y), style.clone()))?;
            x -= 24;
            match color {
                Some(c) => root.draw(&Rectangle::new([(x, y - 7), (x + 18, y + 7)], c.filled()))?,
                None => {
                    let s = BLACK.stroke_width(2);
                    root.draw(&PathElement::new(vec![(x, y), (x + 16, y)], s))?;
                    root.draw(&PathElement::new(vec![(x + 16, y - 8), (x + 16, y + 8)], s))?;
                }
            }
            x -= 22;
        }
        Ok(())
    }
}

/// Axis number without trailing zeros: `1500`, `0.25`, `12.5`.
pub fn short_number(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short_number(1500.0), "1500");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(12.5), "12.5");
        assert_eq!(short_number(-0.0001), "0");
    }
}
