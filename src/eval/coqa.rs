//! CoQA evaluation as lm-evaluation-harness runs its `coqa` task: greedy
//! generation over ragged batches, the prediction and golds of
//! [`super::coqa_prompt`], F1/EM of [`super::metrics`], per-example records
//! with resume ([`super::records`]), mean and standard error over documents.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::coqa_data::CoqaDoc;
use super::coqa_prompt::{MAX_NEW_TOKENS, STOP, golds, prediction, prompt};
use super::encode::{BosPolicy, encode_prompt, resolve_bos};
use super::metrics::{coqa_scores, mean, mean_stderr};
use super::records::{RecordsFile, RecordsHeader};
use crate::backend::Backend;
use crate::io::tokenizer::Tokenizer;
use crate::model::{GenerationConfig, Model, StopReason, generate};

/// How to run the evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoqaOptions {
    /// Sequences generated together (results do not depend on it).
    pub batch_size: usize,
    /// Generation budget per document (lm-eval: 256).
    pub max_new_tokens: usize,
    /// Whether prompts start with BOS.
    pub bos: BosPolicy,
    /// The model as evaluated (spec and quantization), written to the records
    /// header so that records of another model are never resumed.
    pub model: String,
}

impl Default for CoqaOptions {
    fn default() -> Self {
        CoqaOptions {
            batch_size: 8,
            max_new_tokens: MAX_NEW_TOKENS,
            bos: BosPolicy::Auto,
            model: String::new(),
        }
    }
}

/// One evaluated document (one line of the records file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoqaRecord {
    /// Position of the document in the data set (lm-eval's `doc_id`).
    pub doc_index: usize,
    /// The story's id (the resume key).
    pub doc_id: String,
    /// 1-based number of the asked (last) turn.
    pub turn: usize,
    /// Prompt length in tokens, BOS included.
    pub prompt_tokens: usize,
    /// Whether the prompt lost its beginning to fit the model's positions.
    pub truncated: bool,
    /// The continuation as generated, cut before the stop string.
    pub output: String,
    /// What is scored: `output` stripped, up to its first newline.
    pub prediction: String,
    pub golds: Vec<String>,
    pub f1: f64,
    pub em: f64,
    /// Generated tokens (EOS excluded).
    pub new_tokens: usize,
    pub stop: StopReason,
}

/// Aggregate CoQA result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoqaResult {
    /// What was run: lm-eval's `coqa` task, version 3 (zero-shot, last turn of each story).
    pub task: String,
    /// Documents scored.
    pub docs: usize,
    /// Mean F1 over documents.
    pub f1: f64,
    /// Sample standard deviation / √n (lm-eval's stderr); none for n < 2.
    pub f1_stderr: Option<f64>,
    /// Mean exact match over documents.
    pub em: f64,
    pub em_stderr: Option<f64>,
    /// Documents taken from an existing records file.
    pub resumed: usize,
    /// Documents generated in this run.
    pub computed: usize,
    /// Whether prompts started with BOS.
    pub bos_added: bool,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub batch_size: usize,
    /// Prompts cut from the left to fit the model's positions.
    pub truncated_prompts: usize,
    pub mean_prompt_tokens: f64,
    /// Tokens generated in this run.
    pub new_tokens: usize,
    /// Seconds spent generating in this run.
    pub generate_s: f64,
    /// Where the per-example records are.
    pub records_path: Option<String>,
    /// Every document's record, in data-set order (in memory only; the
    /// records file holds them on disk).
    #[serde(skip)]
    pub records: Vec<CoqaRecord>,
}

/// Progress after each batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchProgress {
    /// Documents finished in this run, out of `total` to compute.
    pub done: usize,
    pub total: usize,
    /// Documents already finished before this run.
    pub resumed: usize,
    pub elapsed_s: f64,
}

/// Evaluates `docs` (already limited), appending records to `records_path`
/// when given and skipping documents it already holds.
pub fn evaluate<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    docs: &[CoqaDoc],
    opts: &CoqaOptions,
    records_path: Option<&Path>,
) -> Result<CoqaResult> {
    evaluate_with_progress(model, tokenizer, docs, opts, records_path, &mut |_| {})
}

/// [`evaluate`], calling `on_batch` after every batch.
pub fn evaluate_with_progress<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    docs: &[CoqaDoc],
    opts: &CoqaOptions,
    records_path: Option<&Path>,
    on_batch: &mut dyn FnMut(&BatchProgress),
) -> Result<CoqaResult> {
    if docs.is_empty() {
        bail!("no CoQA documents to evaluate (is --limit 0?)");
    }
    if opts.batch_size == 0 || opts.max_new_tokens == 0 {
        bail!("batch size and max new tokens must be at least 1");
    }
    let add_bos = resolve_bos(opts.bos, tokenizer)?;
    let header = RecordsHeader {
        task: "coqa".into(),
        model: opts.model.clone(),
        settings: serde_json::json!({
            "variant": "lm-eval coqa v3 (zero-shot, last turn)",
            "bos": add_bos,
            "max_new_tokens": opts.max_new_tokens,
            "stop": [STOP],
        }),
    };
    let (mut file, old) = match records_path {
        Some(p) => {
            let (f, old) = RecordsFile::open::<CoqaRecord>(p, &header)?;
            (Some(f), old)
        }
        None => (None, vec![]),
    };
    let mut done: HashMap<String, CoqaRecord> = HashMap::new();
    for r in old {
        done.insert(r.doc_id.clone(), r);
    }
    for d in docs {
        if let Some(r) = done.get(&d.id)
            && r.golds != golds(d)
        {
            bail!(
                "{}: the record of document '{}' has other gold answers than the data; \
                 it was written for other data: pass another output path or delete the file",
                records_path
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                d.id
            );
        }
    }
    let pending: Vec<usize> = (0..docs.len())
        .filter(|&i| !done.contains_key(&docs[i].id))
        .collect();
    let resumed = docs.len() - pending.len();
    let run = generate_pending(
        model,
        tokenizer,
        docs,
        &pending,
        opts,
        add_bos,
        file.as_mut(),
        resumed,
        on_batch,
    )?;
    for r in run.records {
        done.insert(r.doc_id.clone(), r);
    }
    let records: Vec<CoqaRecord> = docs
        .iter()
        .map(|d| done.remove(&d.id).context("a document has no record"))
        .collect::<Result<_>>()?;
    let f1s: Vec<f64> = records.iter().map(|r| r.f1).collect();
    let ems: Vec<f64> = records.iter().map(|r| r.em).collect();
    let lens: Vec<f64> = records.iter().map(|r| r.prompt_tokens as f64).collect();
    Ok(CoqaResult {
        task: "coqa".into(),
        docs: records.len(),
        f1: mean(&f1s),
        f1_stderr: mean_stderr(&f1s),
        em: mean(&ems),
        em_stderr: mean_stderr(&ems),
        resumed,
        computed: pending.len(),
        bos_added: add_bos,
        max_new_tokens: opts.max_new_tokens,
        stop: vec![STOP.to_string()],
        batch_size: opts.batch_size,
        truncated_prompts: records.iter().filter(|r| r.truncated).count(),
        mean_prompt_tokens: mean(&lens),
        new_tokens: run.new_tokens,
        generate_s: run.seconds,
        records_path: file.map(|f| f.path().display().to_string()),
        records,
    })
}

struct Generated {
    records: Vec<CoqaRecord>,
    new_tokens: usize,
    seconds: f64,
}

/// Generates the `pending` documents in batches of similar prompt length
/// (longest first), appending each batch's records to `file`.
#[allow(clippy::too_many_arguments)]
fn generate_pending<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    docs: &[CoqaDoc],
    pending: &[usize],
    opts: &CoqaOptions,
    add_bos: bool,
    mut file: Option<&mut RecordsFile>,
    resumed: usize,
    on_batch: &mut dyn FnMut(&BatchProgress),
) -> Result<Generated> {
    let start = Instant::now();
    let max_prompt = model
        .config
        .max_position_embeddings
        .saturating_sub(opts.max_new_tokens);
    let mut encoded: Vec<(usize, Vec<u32>, bool)> = pending
        .iter()
        .map(|&i| {
            let (ids, cut) = encode_prompt(tokenizer, &prompt(&docs[i]), add_bos, max_prompt)
                .with_context(|| format!("document '{}'", docs[i].id))?;
            Ok((i, ids, cut))
        })
        .collect::<Result<_>>()?;
    encoded.sort_by_key(|(i, ids, _)| (std::cmp::Reverse(ids.len()), *i));
    let cfg = GenerationConfig {
        max_new_tokens: opts.max_new_tokens,
        stop_strings: vec![STOP.to_string()],
        stop_at_eos: true,
    };
    let mut out = Generated {
        records: Vec::with_capacity(pending.len()),
        new_tokens: 0,
        seconds: 0.0,
    };
    for batch in encoded.chunks(opts.batch_size) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|(_, ids, _)| ids.clone()).collect();
        let gens = generate(model, tokenizer, &prompts, &cfg)?;
        let mut new = Vec::with_capacity(batch.len());
        for ((i, ids, cut), g) in batch.iter().zip(gens) {
            let g = g.context("generation returned no result for a prompt")?;
            let doc = &docs[*i];
            let gold = golds(doc);
            let pred = prediction(&g.text);
            let s = coqa_scores(&gold, &pred);
            out.new_tokens += g.tokens.len();
            new.push(CoqaRecord {
                doc_index: *i,
                doc_id: doc.id.clone(),
                turn: doc.turns.len(),
                prompt_tokens: ids.len(),
                truncated: *cut,
                output: g.text,
                prediction: pred,
                golds: gold,
                f1: s.f1,
                em: s.em,
                new_tokens: g.tokens.len(),
                stop: g.stop,
            });
        }
        if let Some(f) = file.as_deref_mut() {
            f.append(&new)?;
        }
        out.records.extend(new);
        on_batch(&BatchProgress {
            done: out.records.len(),
            total: pending.len(),
            resumed,
            elapsed_s: start.elapsed().as_secs_f64(),
        });
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

/// The first `limit` documents (all when `None`), as lm-eval's `--limit N`.
pub fn limit_docs(docs: &[CoqaDoc], limit: Option<usize>) -> &[CoqaDoc] {
    &docs[..limit.unwrap_or(docs.len()).min(docs.len())]
}
