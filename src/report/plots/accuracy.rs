//! Accuracy against bits per parameter: one labelled point per experiment,
//! the Pareto frontier as a connected line, CoQA F1 standard errors as error
//! bars, and (on the quantized-layers axis) unquantized baselines as dashed
//! reference lines.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::bars::short_number;
use super::{ACCENT, Entry, Figure, padded, text, text_size};
use crate::report::axis::{AccuracyMetric, BitsAxis};
use crate::report::labels::{self, Rect};
use crate::report::pareto;

/// One experiment's point.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub label: String,
    pub color: RGBColor,
    pub bits: f64,
    /// The metric's value (not the score).
    pub value: f64,
    /// Standard error of the value, when known.
    pub stderr: Option<f64>,
}

/// An experiment without a position on the x axis (nothing quantized), shown
/// as a horizontal line at its accuracy.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub label: String,
    pub color: RGBColor,
    pub value: f64,
}

/// The accuracy figure.
#[derive(Clone, Debug)]
pub struct AccuracyChart {
    pub axis: BitsAxis,
    pub metric: AccuracyMetric,
    pub points: Vec<Point>,
    pub references: Vec<Reference>,
    /// Indices into `points` of the Pareto frontier, by increasing bits.
    pub frontier: Vec<usize>,
}

/// The accuracy chart of `entries` on `axis` with `metric`, and notes on what
/// it leaves out and which experiments form the frontier. `None` when no entry
/// has both a position and a value.
pub fn figure(
    entries: &[Entry],
    axis: BitsAxis,
    metric: AccuracyMetric,
) -> Option<(AccuracyChart, Vec<String>)> {
    let (mut points, mut references, mut notes) = (vec![], vec![], vec![]);
    for e in entries {
        let Some(value) = metric.value(&e.result.accuracy) else {
            notes.push(format!(
                "{}: no {} recorded, not plotted",
                e.label,
                metric.name()
            ));
            continue;
        };
        let Some(storage) = &e.result.storage else {
            notes.push(format!("{}: no storage metrics, not plotted", e.label));
            continue;
        };
        let stderr = match metric {
            AccuracyMetric::CoqaF1 => e.result.accuracy.coqa_f1_stderr.filter(|s| s.is_finite()),
            _ => None,
        };
        match axis.value(storage) {
            Some(bits) => points.push(Point {
                label: e.label.to_string(),
                color: e.color,
                bits,
                value,
                stderr,
            }),
            None => references.push(Reference {
                label: e.label.to_string(),
                color: e.color,
                value,
            }),
        }
    }
    if points.is_empty() {
        return None;
    }
    let scored: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.bits, metric.score(p.value)))
        .collect();
    let frontier = pareto::frontier(&scored);
    let path: Vec<String> = frontier
        .iter()
        .map(|&i| {
            format!(
                "{} ({:.3} bits, {})",
                points[i].label,
                points[i].bits,
                format_value(metric, points[i].value)
            )
        })
        .collect();
    notes.insert(
        0,
        format!(
            "Pareto frontier (fewest bits, best {}): {}.",
            metric.name(),
            path.join(" → ")
        ),
    );
    if !references.is_empty() {
        let names: Vec<&str> = references.iter().map(|r| r.label.as_str()).collect();
        notes.push(format!(
            "Dashed lines: experiments with no quantized layers ({}), at their {}.",
            names.join(", "),
            metric.name()
        ));
    }
    Some((
        AccuracyChart {
            axis,
            metric,
            points,
            references,
            frontier,
        },
        notes,
    ))
}

/// A metric value as the report prints it.
pub fn format_value(metric: AccuracyMetric, v: f64) -> String {
    match metric {
        AccuracyMetric::CoqaF1 => format!("F1 {v:.3}"),
        AccuracyMetric::Top1Agreement => format!("top-1 {:.1}%", 100.0 * v),
        AccuracyMetric::KlDivergence => format!("KL {v:.4}"),
        AccuracyMetric::Perplexity => format!("ppl {v:.2}"),
    }
}

const LABEL_SIZE: f64 = 16.0;

impl AccuracyChart {
    /// Lowest and highest score drawn (points with error bars, references).
    fn score_range(&self) -> (f64, f64) {
        let m = self.metric;
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for p in &self.points {
            let s = m.score(p.value);
            let e = p.stderr.unwrap_or(0.0);
            lo = lo.min(s - e);
            hi = hi.max(s + e);
        }
        for r in &self.references {
            lo = lo.min(m.score(r.value));
            hi = hi.max(m.score(r.value));
        }
        (lo, hi)
    }

    /// The key above the plot, right-aligned: frontier line with ring, and
    /// the error bar when any point has one.
    fn draw_key<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        right: i32,
        y: i32,
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let style = text(16.0).pos(Pos::new(HPos::Left, VPos::Center));
        let mut x = right;
        if self.points.iter().any(|p| p.stderr.is_some()) {
            let t = "±1 standard error";
            x -= text_size(root, t, &style)?.0;
            root.draw(&Text::new(t, (x, y), style.clone()))?;
            x -= 16;
            let s = BLACK.stroke_width(1);
            root.draw(&PathElement::new(vec![(x, y - 9), (x, y + 9)], s))?;
            root.draw(&PathElement::new(vec![(x - 4, y - 9), (x + 4, y - 9)], s))?;
            root.draw(&PathElement::new(vec![(x - 4, y + 9), (x + 4, y + 9)], s))?;
            x -= 30;
        }
        let t = "Pareto frontier";
        x -= text_size(root, t, &style)?.0;
        root.draw(&Text::new(t, (x, y), style))?;
        x -= 40;
        root.draw(&PathElement::new(
            vec![(x, y), (x + 32, y)],
            ACCENT.stroke_width(2),
        ))?;
        root.draw(&Circle::new((x + 16, y), 9, ACCENT.stroke_width(2)))?;
        Ok(())
    }
}

impl Figure for AccuracyChart {
    fn size(&self) -> (u32, u32) {
        (1100, 720)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let m = self.metric;
        let bits: Vec<f64> = self.points.iter().map(|p| p.bits).collect();
        let (b_lo, b_hi) = bits
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let (x_lo, x_hi) = padded(b_lo, b_hi, 0.08, 0.5);
        let (s_lo, s_hi) = self.score_range();
        let (y_lo, y_hi) = padded(s_lo, s_hi, 0.12, (0.05 * s_hi.abs()).max(1e-3));
        let title = format!("{} vs bits per parameter", capitalized(m.name()));
        let y_fmt = |s: &f64| short_number(m.value_of_score(*s));
        let mut chart = ChartBuilder::on(root)
            .margin(20)
            .margin_top(20)
            .caption(title, text(24.0))
            .x_label_area_size(60)
            .y_label_area_size(90)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_desc(self.axis.axis_label())
            .y_desc(m.axis_label())
            .axis_desc_style(text(18.0))
            .label_style(text(17.0))
            .x_label_formatter(&|x| short_number(*x))
            .y_label_formatter(&y_fmt)
            .draw()?;

        let (px, py) = chart.plotting_area().get_pixel_range();
        let bounds = Rect {
            x0: px.start,
            y0: py.start,
            x1: px.end,
            y1: py.end,
        };
        self.draw_key(root, px.end, py.start - 14)?;

        // Reference lines, labelled at their right end above the line.
        let mut obstacles = vec![];
        let ref_style = text(15.0).pos(Pos::new(HPos::Right, VPos::Bottom));
        for r in &self.references {
            let y = m.score(r.value);
            let style = ShapeStyle::from(&r.color).stroke_width(2);
            chart.draw_series(DashedLineSeries::new([(x_lo, y), (x_hi, y)], 10, 6, style))?;
            let t = format!("{} (nothing quantized)", r.label);
            let (w, h) = text_size(root, &t, &ref_style)?;
            let (_, ly) = chart.backend_coord(&(x_hi, y));
            let (tx, ty) = (px.end - 8, ly - 4);
            root.draw(&Text::new(t, (tx, ty), ref_style.clone()))?;
            obstacles.push(Rect::at(tx - w, ty - h, w, h));
        }

        let at = |p: &Point| (p.bits, m.score(p.value));
        let line: Vec<(f64, f64)> = self.frontier.iter().map(|&i| at(&self.points[i])).collect();
        chart.draw_series(LineSeries::new(line, ACCENT.stroke_width(2)))?;
        for p in &self.points {
            if let Some(e) = p.stderr {
                let (x, y) = at(p);
                let s = p.color.stroke_width(1);
                chart.draw_series([PathElement::new(vec![(x, y - e), (x, y + e)], s)])?;
                for yy in [y - e, y + e] {
                    let (cx, cy) = chart.backend_coord(&(x, yy));
                    root.draw(&PathElement::new(vec![(cx - 4, cy), (cx + 4, cy)], s))?;
                }
            }
        }
        for &i in &self.frontier {
            chart.draw_series([Circle::new(at(&self.points[i]), 10, ACCENT.stroke_width(2))])?;
        }
        chart.draw_series(
            self.points
                .iter()
                .map(|p| Circle::new(at(p), 6, p.color.filled())),
        )?;

        // Labels: frontier points first, then the rest, each where it
        // overlaps least.
        let label_style = text(LABEL_SIZE).pos(Pos::new(HPos::Left, VPos::Top));
        let mut order: Vec<usize> = self.frontier.clone();
        order.extend((0..self.points.len()).filter(|i| !self.frontier.contains(i)));
        let mut anchors = vec![];
        let mut sizes = vec![];
        for &i in &order {
            anchors.push(chart.backend_coord(&at(&self.points[i])));
            sizes.push(text_size(root, &self.points[i].label, &label_style)?);
        }
        let placed = labels::place(&anchors, &sizes, &obstacles, 11, 6, bounds);
        for ((&i, p), &a) in order.iter().zip(&placed).zip(&anchors) {
            if p.leader {
                let end = p.rect.nearest(a);
                root.draw(&PathElement::new(
                    vec![a, end],
                    RGBColor(120, 120, 120).stroke_width(1),
                ))?;
            }
            let color = darker(self.points[i].color);
            let style = label_style.clone().color(&color);
            root.draw(&Text::new(
                self.points[i].label.clone(),
                (p.rect.x0, p.rect.y0),
                style,
            ))?;
        }
        Ok(())
    }
}

/// `s` with its first letter in upper case.
fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A darker shade of `c` for text on white.
fn darker(c: RGBColor) -> RGBColor {
    RGBColor(
        (c.0 as f64 * 0.75) as u8,
        (c.1 as f64 * 0.75) as u8,
        (c.2 as f64 * 0.75) as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(capitalized("top-1 agreement"), "Top-1 agreement");
        assert_eq!(capitalized("CoQA F1"), "CoQA F1");
        assert_eq!(
            format_value(AccuracyMetric::Top1Agreement, 0.9731),
            "top-1 97.3%"
        );
        assert_eq!(darker(RGBColor(200, 100, 40)), RGBColor(150, 75, 30));
    }
}
