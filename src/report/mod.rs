//! `quantbench report`: plots (PNG and SVG), `report.md` and a self-contained
//! `report.html` from the experiment result files of one or more run
//! directories. Everything shown is computed from those files alone.

pub mod axis;
pub mod html;
pub mod labels;
pub mod load;
pub mod markdown;
pub mod pareto;
pub mod plots;
pub mod table;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::runner::result::Status;
use axis::BitsAxis;
use load::Loaded;
use plots::{Entry, PlotFile};
use table::Table;

/// How to read the table; shown under it in both reports.
pub const READING_NOTES: [&str; 4] = [
    "bits/param: exact stored bytes (packed values, scales, zero points, nested scales) × 8 / parameters, whole model; the quantized-layers column counts quantized linear layers only.",
    "KL: mean KL(base ‖ quantized) per token against the unquantized model (lower is better); top-1: tokens whose argmax matches the unquantized model's.",
    "prefill ms: mean time to process one prompt of the given length; decode: milliseconds per generated token at batch 1 (mean and 95th percentile).",
    "tok/s @bN: generated tokens per second over all N sequences decoded together.",
];

/// Everything a report shows.
#[derive(Clone, Debug)]
pub struct Report {
    /// Run directories and how many results each held.
    pub sources: Vec<(PathBuf, usize)>,
    pub table: Table,
    pub plots: Vec<PlotFile>,
    /// Failed experiments: label and error.
    pub failures: Vec<(String, String)>,
    /// Report-wide remarks.
    pub notes: Vec<String>,
    /// Experiments, and how many of them failed.
    pub counts: (usize, usize),
}

impl Report {
    /// One sentence: how many experiments, how many failed.
    pub fn summary_line(&self) -> String {
        let (n, failed) = self.counts;
        format!(
            "{n} experiment{} ({} ok, {failed} failed) from {} run director{}.",
            if n == 1 { "" } else { "s" },
            n - failed,
            self.sources.len(),
            if self.sources.len() == 1 { "y" } else { "ies" }
        )
    }
}

/// Report order: finished experiments by decreasing whole-model bits per
/// parameter (those without storage last), then by label; failed ones after.
pub fn sort_for_report(results: &mut [Loaded]) {
    results.sort_by(|a, b| {
        let key = |l: &Loaded| {
            (
                l.result.status != Status::Ok,
                -l.result
                    .storage
                    .as_ref()
                    .map_or(f64::NEG_INFINITY, |s| s.bits_per_parameter),
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then_with(|| a.label.cmp(&b.label))
    });
}

/// The files a report wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub markdown: PathBuf,
    pub html: PathBuf,
    /// `<stem>.png` and `<stem>.svg` of every plot.
    pub plots: Vec<PathBuf>,
    pub report: Report,
}

/// Draws every plot the results support into `out`.
fn draw_plots(entries: &[Entry], out: &Path, notes: &mut Vec<String>) -> Result<Vec<PlotFile>> {
    let mut plots = vec![];
    match axis::choose_metric(entries.iter().map(|e| &e.result.accuracy)) {
        Some(metric) => {
            let mut axes = vec![BitsAxis::WholeModel];
            if entries.iter().any(|e| {
                e.result
                    .storage
                    .as_ref()
                    .is_some_and(|s| s.quantized_bits_per_parameter.is_some())
            }) {
                axes.push(BitsAxis::QuantizedLayers);
            }
            for axis in axes {
                if let Some((fig, n)) = plots::accuracy::figure(entries, axis, metric) {
                    let title = match axis {
                        BitsAxis::WholeModel => {
                            format!("{} vs bits per parameter (whole model)", metric.name())
                        }
                        BitsAxis::QuantizedLayers => {
                            format!(
                                "{} vs bits per parameter (quantized layers only)",
                                metric.name()
                            )
                        }
                    };
                    plots.push(plots::write(&fig, out, axis.file_stem(), &title, n)?);
                }
            }
            if metric != axis::AccuracyMetric::CoqaF1 {
                let some_f1 = entries.iter().any(|e| e.result.accuracy.coqa_f1.is_some());
                notes.push(if some_f1 {
                    format!(
                        "CoQA F1 is missing from some results; the accuracy plots show {}, which more results have.",
                        metric.name()
                    )
                } else {
                    format!("No result has CoQA F1; the accuracy plots show {} instead.", metric.name())
                });
            }
        }
        None => notes.push(
            "No accuracy metric recorded in any finished experiment: no accuracy plot.".into(),
        ),
    }
    if let Some((fig, n)) = plots::memory::figure(entries) {
        plots.push(plots::write(
            &fig,
            out,
            "memory",
            "Weight memory and peak memory",
            n,
        )?);
    }
    if let Some((fig, n)) = plots::latency::figure(entries) {
        plots.push(plots::write(
            &fig,
            out,
            "decode_latency",
            "Decode latency (batch 1)",
            n,
        )?);
    }
    if let Some((fig, n)) = plots::throughput::figure(entries) {
        plots.push(plots::write(
            &fig,
            out,
            "throughput",
            "Decode throughput vs batch size",
            n,
        )?);
    }
    if !entries.iter().any(|e| e.result.bench.is_some()) {
        notes.push("No experiment was benchmarked: no latency or throughput plots.".into());
    }
    Ok(plots)
}

/// Reads every experiment result in `run_dirs` and writes the plots,
/// `report.md` and `report.html` into `out` (created if needed).
pub fn generate(run_dirs: &[PathBuf], out: &Path) -> Result<Written> {
    let mut results = load::load_runs(run_dirs)?;
    sort_for_report(&mut results);
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create report directory", out.display()))?;
    let sources = run_dirs
        .iter()
        .map(|d| {
            let n = results
                .iter()
                .filter(|l| l.path.parent() == Some(d.as_path()))
                .count();
            (d.clone(), n)
        })
        .collect();
    let entries: Vec<Entry> = results
        .iter()
        .filter(|l| l.result.status == Status::Ok)
        .enumerate()
        .map(|(i, l)| Entry {
            label: &l.label,
            color: plots::color(i),
            result: &l.result,
        })
        .collect();
    let mut notes = vec![];
    let plots = draw_plots(&entries, out, &mut notes)?;
    let failures: Vec<(String, String)> = results
        .iter()
        .filter(|l| l.result.status == Status::Failed)
        .map(|l| {
            (
                l.label.clone(),
                l.result
                    .error
                    .clone()
                    .unwrap_or_else(|| "(no error message recorded)".into()),
            )
        })
        .collect();
    let report = Report {
        sources,
        table: table::summary_table(&results),
        counts: (results.len(), failures.len()),
        plots,
        failures,
        notes,
    };
    let markdown = out.join("report.md");
    std::fs::write(&markdown, markdown::render(&report))
        .with_context(|| format!("{}: cannot write", markdown.display()))?;
    let html = out.join("report.html");
    std::fs::write(&html, html::render(&report))
        .with_context(|| format!("{}: cannot write", html.display()))?;
    let plots = report
        .plots
        .iter()
        .flat_map(|p| ["png", "svg"].map(|ext| out.join(format!("{}.{ext}", p.stem))))
        .collect();
    Ok(Written {
        markdown,
        html,
        plots,
        report,
    })
}
