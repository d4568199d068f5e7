//! Weight memory and peak memory per experiment.

use std::collections::BTreeSet;

use plotters::style::RGBColor;

use super::Entry;
use super::bars::{BarChart, BarSeries, Fill};
use crate::report::table::MIB;

/// Colour of the weight bars.
const WEIGHTS: RGBColor = RGBColor(50, 110, 185);
/// Colour of the peak bars.
const PEAK: RGBColor = RGBColor(235, 140, 40);

/// Name of the peak series for the peak kinds present (`device`, `process_rss`).
fn peak_name(kinds: &BTreeSet<&str>) -> String {
    match (kinds.len(), kinds.iter().next()) {
        (1, Some(&"device")) => "peak device memory".into(),
        (1, Some(&"process_rss")) => "peak process RSS".into(),
        _ => "peak memory (device or process RSS; see table)".into(),
    }
}

/// The memory chart of the entries with storage or peak memory, and notes on
/// those left out. `None` when no entry has either.
pub fn figure(entries: &[Entry]) -> Option<(BarChart, Vec<String>)> {
    let mut bands = vec![];
    let (mut weights, mut peaks, mut notes) = (vec![], vec![], vec![]);
    let mut kinds = BTreeSet::new();
    for e in entries {
        let w = e
            .result
            .storage
            .as_ref()
            .map(|s| s.weight_bytes as f64 / MIB);
        let bench = e.result.bench.as_ref();
        let p = bench
            .and_then(|b| b.peak_memory_bytes)
            .map(|p| p as f64 / MIB);
        if w.is_none() && p.is_none() {
            notes.push(format!("{}: no storage or peak memory recorded", e.label));
            continue;
        }
        if let (Some(b), Some(_)) = (bench, p) {
            kinds.insert(b.peak_memory_kind.as_str());
        }
        bands.push((e.label.to_string(), e.color));
        weights.push(w);
        peaks.push(p);
    }
    if bands.is_empty() {
        return None;
    }
    if kinds.contains("process_rss") {
        notes.push("Process RSS is the whole process's peak resident memory (weights, activations, runtime), not the weights alone.".into());
    }
    let texts = |v: &[Option<f64>]| v.iter().map(|v| v.map(|v| format!("{v:.1} MiB"))).collect();
    let n = bands.len();
    let chart = BarChart {
        title: "Weight memory and peak memory".into(),
        x_desc: "MiB".into(),
        bands,
        series: vec![
            BarSeries {
                name: "weights (exact storage)".into(),
                fill: Fill::Fixed(WEIGHTS),
                texts: texts(&weights),
                values: weights,
                marks: vec![None; n],
            },
            BarSeries {
                name: peak_name(&kinds),
                fill: Fill::Fixed(PEAK),
                texts: texts(&peaks),
                values: peaks,
                marks: vec![None; n],
            },
        ],
        mark_name: None,
    };
    Some((chart, notes))
}
