//! Decode throughput against batch size, one line per experiment, batch size
//! on a log₂ axis.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::bars::short_number;
use super::ticks::FixedTicks;
use super::{Entry, Figure, padded, text};

/// One experiment's line.
#[derive(Clone, Debug)]
pub struct Line {
    pub label: String,
    pub color: RGBColor,
    /// (batch size, tokens per second), by increasing batch size.
    pub points: Vec<(usize, f64)>,
}

/// The throughput figure.
#[derive(Clone, Debug)]
pub struct ThroughputChart {
    pub lines: Vec<Line>,
}

/// The throughput chart of the entries with throughput measurements, and
/// notes on those left out. `None` when no entry has any.
pub fn figure(entries: &[Entry]) -> Option<(ThroughputChart, Vec<String>)> {
    let mut lines = vec![];
    let mut notes = vec![];
    for e in entries {
        let mut points: Vec<(usize, f64)> = e
            .result
            .bench
            .iter()
            .flat_map(|b| &b.throughput)
            .filter(|t| t.batch_size > 0 && t.tokens_per_s.is_finite())
            .map(|t| (t.batch_size, t.tokens_per_s))
            .collect();
        if points.is_empty() {
            notes.push(format!("{}: no throughput measurements", e.label));
            continue;
        }
        points.sort_by_key(|p| p.0);
        lines.push(Line {
            label: e.label.to_string(),
            color: e.color,
            points,
        });
    }
    if lines.is_empty() {
        None
    } else {
        Some((ThroughputChart { lines }, notes))
    }
}

impl ThroughputChart {
    /// Distinct batch sizes, ascending.
    pub fn batch_sizes(&self) -> Vec<usize> {
        let set: std::collections::BTreeSet<usize> = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .collect();
        set.into_iter().collect()
    }
}

impl Figure for ThroughputChart {
    fn size(&self) -> (u32, u32) {
        (1100, 680)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let batches = self.batch_sizes();
        let log = |b: usize| (b as f64).log2();
        let (x_lo, x_hi) = padded(log(batches[0]), log(*batches.last().unwrap()), 0.06, 0.5);
        let y_max = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let y_hi = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let ticks: Vec<f64> = batches.iter().map(|&b| log(b)).collect();
        let x_fmt = |x: &f64| format!("{}", x.exp2().round());
        let mut chart = ChartBuilder::on(root)
            .margin(20)
            .caption("Decode throughput vs batch size", text(24.0))
            .x_label_area_size(60)
            .y_label_area_size(90)
            .build_cartesian_2d(FixedTicks::new(x_lo, x_hi, ticks), 0.0..y_hi)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_desc("batch size (sequences decoded together, log scale)")
            .y_desc("generated tokens per second (all sequences)")
            .axis_desc_style(text(18.0))
            .label_style(text(17.0))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|y| short_number(*y))
            .draw()?;
        for line in &self.lines {
            let pts: Vec<(f64, f64)> = line.points.iter().map(|&(b, t)| (log(b), t)).collect();
            let c = line.color;
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))?
                .label(line.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(190, 190, 190))
            .label_font(text(16.0))
            .margin(12)
            .draw()?;
        Ok(())
    }
}
