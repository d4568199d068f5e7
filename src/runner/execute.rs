//! One experiment, end to end: load → base logits (divergence) → quantize →
//! sanity → evaluate → benchmark, producing an [`ExperimentResult`].

use std::time::Instant;

use anyhow::{Context, Result};

use super::provenance;
use super::result::{
    AccuracyMetrics, ExperimentResult, FormatBytes, SCHEMA_VERSION, Status, StorageMetrics, Timings,
};
use super::store::RunStore;
use crate::backend::{Backend, Device};
use crate::config::Experiment;
use crate::eval::divergence::{DEFAULT_TEXT, Reference, text_windows};
use crate::io::load_model;
use crate::io::tokenizer::Tokenizer;
use crate::model::{LlamaWeights, Model};
use crate::quant::storage::{quantized_usage, total_usage, usage_by_format};
use crate::quant::{QuantContext, cast_dense, quantize_model_on};

/// Exact storage of `w`.
pub fn storage_metrics(w: &LlamaWeights) -> StorageMetrics {
    let by = usage_by_format(w);
    let total = total_usage(&by);
    let q = quantized_usage(w);
    StorageMetrics {
        parameters: total.parameters,
        weight_bytes: total.bytes,
        bits_per_parameter: total.bits_per_parameter(),
        quantized_bits_per_parameter: (q.tensors > 0).then(|| q.bits_per_parameter()),
        formats: by
            .into_iter()
            .map(|(k, u)| {
                (
                    k,
                    FormatBytes {
                        tensors: u.tensors,
                        parameters: u.parameters,
                        bytes: u.bytes,
                    },
                )
            })
            .collect(),
    }
}

/// The base model's logits on the experiment's divergence text.
fn base_reference<B: Backend>(
    base: &Model<B>,
    tokenizer: &Tokenizer,
    exp: &Experiment,
) -> Result<Reference> {
    let text = match &exp.eval.divergence_text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("{}: cannot read eval.divergence_text", p.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let window = exp
        .eval
        .divergence_tokens
        .min(base.config.max_position_embeddings);
    let windows = text_windows(tokenizer, &text, exp.eval.divergence_tokens, window)
        .context("divergence text")?;
    Reference::compute(base, windows).context("base model logits for the divergence")
}

/// A result skeleton for `exp`, status failed until every stage has run.
pub fn new_result(exp: &Experiment, model: &str, device: &str) -> Result<ExperimentResult> {
    Ok(ExperimentResult {
        schema_version: SCHEMA_VERSION,
        experiment: exp.name.clone(),
        status: Status::Failed,
        error: None,
        config: serde_json::to_value(exp)?,
        model: model.to_string(),
        storage: None,
        accuracy: AccuracyMetrics::default(),
        sanity: vec![],
        eval_details: serde_json::Value::Null,
        bench: None,
        timings: Timings::default(),
        provenance: provenance::collect(device),
        started_at: chrono::Utc::now().to_rfc3339(),
        finished_at: String::new(),
    })
}

/// Runs every stage of `exp` on `backend` (the backend of `device`, where
/// GPTQ also runs), filling `result` as it goes (so a failure still records
/// what finished).
pub fn execute<B: Backend>(
    backend: B,
    device: Device,
    exp: &Experiment,
    model_spec: &str,
    store: &RunStore,
    result: &mut ExperimentResult,
) -> Result<()> {
    let total = Instant::now();
    let t = Instant::now();
    let mut loaded = load_model(model_spec)?;
    result.model = loaded.source.clone();
    result.timings.load_s = t.elapsed().as_secs_f64();

    cast_dense(&mut loaded.weights, exp.dtype);
    // The base of the divergence is the unquantized model at the experiment's
    // dtype; its logits are taken before quantizing, then it is freed.
    let (backend, reference) = if exp.eval.divergence {
        let t = Instant::now();
        let base = Model::new(backend, &loaded.weights)?;
        let reference = base_reference(&base, &loaded.tokenizer, exp)?;
        result.timings.divergence_s = t.elapsed().as_secs_f64();
        (base.into_backend(), Some(reference))
    } else {
        (backend, None)
    };

    let t = Instant::now();
    let ctx = QuantContext {
        tokenizer: &loaded.tokenizer,
    };
    quantize_model_on(&mut loaded.weights, &exp.quant, &ctx, device)?;
    result.storage = Some(storage_metrics(&loaded.weights));
    result.timings.quantize_s = t.elapsed().as_secs_f64();

    let model = Model::new(backend, &loaded.weights)?;
    if let Some(reference) = reference {
        let t = Instant::now();
        let d = reference
            .compare(&model)
            .context("divergence from the base model")?;
        result.accuracy.kl_divergence = Some(d.mean_kl());
        result.accuracy.top1_agreement = Some(d.top1_agreement());
        result.accuracy.divergence_tokens = Some(d.tokens);
        result.timings.divergence_s += t.elapsed().as_secs_f64();
    }
    // The backend holds its own copy; the host copy would only inflate memory.
    drop(loaded.weights);
    let t = Instant::now();
    super::evaluate::run_evaluations(&model, &loaded.tokenizer, exp, store, result)?;
    result.timings.eval_s = t.elapsed().as_secs_f64() - result.timings.sanity_s;

    if exp.benchmark {
        let t = Instant::now();
        result.bench = Some(crate::bench::run(&model, &exp.bench)?);
        result.timings.bench_s = t.elapsed().as_secs_f64();
    }
    result.timings.total_s = total.elapsed().as_secs_f64();
    Ok(())
}
