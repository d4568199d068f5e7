//! The summary table of a report, one row per experiment, as plain cells that
//! the Markdown and HTML writers render.

use std::collections::BTreeSet;

use serde_json::Value;

use super::load::Loaded;
use crate::runner::result::{ExperimentResult, Status};

/// Bytes in a MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

/// A table column.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub header: String,
    /// Whether cells sort by number.
    pub numeric: bool,
}

/// A table cell: its text and, for numbers, the value to sort by.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub text: String,
    pub sort: Option<f64>,
}

impl Cell {
    /// A text cell.
    pub fn text(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            sort: None,
        }
    }

    /// A number cell shown as `text`, or an empty mark when `value` is `None`.
    pub fn number(value: Option<f64>, text: impl FnOnce(f64) -> String) -> Cell {
        match value {
            Some(v) => Cell {
                text: text(v),
                sort: Some(v),
            },
            None => Cell::text(EMPTY),
        }
    }
}

/// Text of a cell without a value.
pub const EMPTY: &str = "—";

/// Columns and rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    /// Index of the column with this header.
    pub fn column(&self, header: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.header == header)
    }
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object().and_then(|o| o.get(key))
}

/// A short description of the quantization in an experiment's resolved
/// configuration: `none f16`, `nf4 b64 dq`, `gptq 4b g128 act-order`, ...
pub fn method_label(config: &Value) -> String {
    let Some(quant) = get(config, "quant") else {
        return EMPTY.to_string();
    };
    let Some(method) = get(quant, "method").and_then(Value::as_str) else {
        return EMPTY.to_string();
    };
    let mut parts = vec![method.to_string()];
    let text = |key: &str| get(quant, key).and_then(Value::as_str).map(str::to_string);
    let flag = |key: &str| get(quant, key).and_then(Value::as_bool).unwrap_or(false);
    let int = |key: &str| get(quant, key).and_then(Value::as_i64);
    match method {
        "none" => {
            if let Some(d) = text("dtype").or_else(|| {
                get(config, "dtype")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }) {
                parts.push(d);
            }
        }
        "nf4" | "fp4" => {
            if let Some(b) = int("block_size") {
                parts.push(format!("b{b}"));
            }
            if flag("double_quant") {
                parts.push("dq".into());
            }
        }
        "int8" => {
            if let Some(t) = get(quant, "threshold").and_then(Value::as_f64) {
                parts.push(if t == 0.0 {
                    "no outliers".into()
                } else {
                    format!("t{t}")
                });
            }
        }
        _ => {
            if let Some(b) = int("bits") {
                parts.push(format!("{b}b"));
            }
            match int("group_size") {
                Some(-1) => parts.push("per-row".into()),
                Some(g) => parts.push(format!("g{g}")),
                None => {}
            }
            if flag("sym") {
                parts.push("sym".into());
            }
            if flag("desc_act") {
                parts.push("act-order".into());
            }
        }
    }
    parts.join(" ")
}

/// Prompt lengths with prefill measurements, ascending.
fn prompt_lens(results: &[Loaded]) -> Vec<usize> {
    let set: BTreeSet<usize> = results
        .iter()
        .filter_map(|l| l.result.bench.as_ref())
        .flat_map(|b| b.prefill.iter().map(|p| p.prompt_len))
        .collect();
    set.into_iter().collect()
}

/// Batch sizes with throughput measurements, ascending.
pub fn batch_sizes(results: &[Loaded]) -> Vec<usize> {
    let set: BTreeSet<usize> = results
        .iter()
        .filter_map(|l| l.result.bench.as_ref())
        .flat_map(|b| b.throughput.iter().map(|t| t.batch_size))
        .collect();
    set.into_iter().collect()
}

/// How the peak memory column is labelled and whether cells need a kind mark.
fn peak_kinds(results: &[Loaded]) -> BTreeSet<String> {
    results
        .iter()
        .filter_map(|l| l.result.bench.as_ref())
        .filter(|b| b.peak_memory_bytes.is_some())
        .map(|b| b.peak_memory_kind.clone())
        .collect()
}

/// Header of the peak memory column: names the kind when all agree.
fn peak_header(kinds: &BTreeSet<String>) -> String {
    match kinds.iter().next() {
        Some(k) if kinds.len() == 1 && k == "process_rss" => "peak RSS MiB".into(),
        Some(k) if kinds.len() == 1 && k == "device" => "peak device MiB".into(),
        _ => "peak MiB".into(),
    }
}

fn f1_cell(value: Option<f64>, stderr: Option<f64>) -> Cell {
    Cell::number(value, |v| match stderr {
        Some(s) => format!("{v:.3} ± {s:.3}"),
        None => format!("{v:.3}"),
    })
}

/// The summary table of `results`, in the given order. Optional columns
/// (quantized-layer bits, perplexity) appear only when some result has them;
/// prefill gets a column per prompt length and throughput one per batch size.
pub fn summary_table(results: &[Loaded]) -> Table {
    let lens = prompt_lens(results);
    let batches = batch_sizes(results);
    let kinds = peak_kinds(results);
    let any = |f: &dyn Fn(&ExperimentResult) -> bool| results.iter().any(|l| f(&l.result));
    let with_qbits = any(&|r| {
        r.storage
            .as_ref()
            .is_some_and(|s| s.quantized_bits_per_parameter.is_some())
    });
    let with_ppl = any(&|r| r.accuracy.perplexity.is_some());

    let mut columns: Vec<(String, bool)> = vec![
        ("experiment".into(), false),
        ("method".into(), false),
        ("bits/param".into(), true),
    ];
    if with_qbits {
        columns.push(("bits/param (quantized layers)".into(), true));
    }
    columns.extend([
        ("weight MiB".into(), true),
        (peak_header(&kinds), true),
        ("CoQA F1 ± stderr".into(), true),
        ("CoQA EM".into(), true),
        ("KL".into(), true),
        ("top-1".into(), true),
    ]);
    if with_ppl {
        columns.push(("perplexity".into(), true));
    }
    columns.extend(lens.iter().map(|l| (format!("prefill ms @{l}"), true)));
    columns.push(("decode ms/token".into(), true));
    columns.push(("decode p95 ms".into(), true));
    columns.extend(batches.iter().map(|b| (format!("tok/s @b{b}"), true)));
    columns.push(("status".into(), false));

    let rows = results
        .iter()
        .map(|l| {
            let r = &l.result;
            let s = r.storage.as_ref();
            let b = r.bench.as_ref();
            let a = &r.accuracy;
            let mut row = vec![
                Cell::text(l.label.clone()),
                Cell::text(method_label(&r.config)),
                Cell::number(s.map(|s| s.bits_per_parameter), |v| format!("{v:.3}")),
            ];
            if with_qbits {
                row.push(Cell::number(
                    s.and_then(|s| s.quantized_bits_per_parameter),
                    |v| format!("{v:.3}"),
                ));
            }
            let peak = b.and_then(|b| {
                b.peak_memory_bytes
                    .map(|p| (p, b.peak_memory_kind.as_str()))
            });
            row.extend([
                Cell::number(s.map(|s| s.weight_bytes as f64 / MIB), |v| {
                    format!("{v:.1}")
                }),
                Cell::number(peak.map(|(p, _)| p as f64 / MIB), |v| match peak {
                    Some((_, kind)) if kinds.len() > 1 => format!(
                        "{v:.1} ({})",
                        if kind == "device" { "device" } else { "RSS" }
                    ),
                    _ => format!("{v:.1}"),
                }),
                f1_cell(a.coqa_f1, a.coqa_f1_stderr),
                Cell::number(a.coqa_em, |v| format!("{v:.3}")),
                Cell::number(a.kl_divergence, |v| format!("{v:.4}")),
                Cell::number(a.top1_agreement, |v| format!("{:.1}%", 100.0 * v)),
            ]);
            if with_ppl {
                row.push(Cell::number(a.perplexity, |v| format!("{v:.2}")));
            }
            for len in &lens {
                let ms = b
                    .and_then(|b| b.prefill.iter().find(|p| p.prompt_len == *len))
                    .map(|p| p.ms.mean);
                row.push(Cell::number(ms, |v| format!("{v:.1}")));
            }
            row.push(Cell::number(b.map(|b| b.decode_ms_per_token.mean), |v| {
                format!("{v:.2}")
            }));
            row.push(Cell::number(b.map(|b| b.decode_ms_per_token.p95), |v| {
                format!("{v:.2}")
            }));
            for batch in &batches {
                let tps = b
                    .and_then(|b| b.throughput.iter().find(|t| t.batch_size == *batch))
                    .map(|t| t.tokens_per_s);
                row.push(Cell::number(tps, |v| format!("{v:.1}")));
            }
            row.push(Cell::text(match r.status {
                Status::Ok => "ok",
                Status::Failed => "failed",
            }));
            row
        })
        .collect();
    Table {
        columns: columns
            .into_iter()
            .map(|(header, numeric)| Column { header, numeric })
            .collect(),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn method_labels() {
        let nf4 = json!({"dtype": "f16", "quant": {"method": "nf4", "block_size": 64, "double_quant": true}});
        assert_eq!(method_label(&nf4), "nf4 b64 dq");
        let gptq = json!({"quant": {"method": "gptq", "bits": 3, "group_size": 128, "desc_act": true, "sym": false}});
        assert_eq!(method_label(&gptq), "gptq 3b g128 act-order");
        let rtn = json!({"quant": {"method": "rtn", "bits": 4, "group_size": -1, "sym": true}});
        assert_eq!(method_label(&rtn), "rtn 4b per-row sym");
        let none = json!({"dtype": "bf16", "quant": {"method": "none", "dtype": null}});
        assert_eq!(method_label(&none), "none bf16");
        let int8 = json!({"quant": {"method": "int8", "threshold": 0.0}});
        assert_eq!(method_label(&int8), "int8 no outliers");
        assert_eq!(method_label(&json!({})), EMPTY);
    }
}
