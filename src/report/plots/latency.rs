//! Decode latency per experiment: mean milliseconds per token at batch 1,
//! with the 95th percentile marked.

use super::Entry;
use super::bars::{BarChart, BarSeries, Fill};

/// The latency chart of the entries with a benchmark, and notes on those left
/// out. `None` when no entry was benchmarked.
pub fn figure(entries: &[Entry]) -> Option<(BarChart, Vec<String>)> {
    let (mut bands, mut values, mut marks, mut texts, mut notes) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut devices = std::collections::BTreeSet::new();
    for e in entries {
        let Some(b) = &e.result.bench else {
            notes.push(format!("{}: not benchmarked", e.label));
            continue;
        };
        let d = &b.decode_ms_per_token;
        bands.push((e.label.to_string(), e.color));
        values.push(Some(d.mean));
        marks.push(Some(d.p95));
        texts.push(Some(format!(
            "{:.2} ms (p95 {:.2}, n={})",
            d.mean, d.p95, d.n
        )));
        devices.insert(b.device.clone());
    }
    if bands.is_empty() {
        return None;
    }
    if devices.len() > 1 {
        let list: Vec<String> = devices.into_iter().collect();
        notes.push(format!(
            "Measured on different devices: {}.",
            list.join("; ")
        ));
    }
    let chart = BarChart {
        title: "Decode latency (batch 1)".into(),
        x_desc: "milliseconds per token (bar: mean, tick: 95th percentile)".into(),
        bands,
        series: vec![BarSeries {
            name: "mean".into(),
            fill: Fill::PerBand,
            values,
            marks,
            texts,
        }],
        mark_name: Some("p95".into()),
    };
    Some((chart, notes))
}
