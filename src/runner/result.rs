//! The result file of one experiment (`<run dir>/<experiment>.json`), schema
//! version [`SCHEMA_VERSION`]. Fields are documented here; `report` reads only
//! these files, so every figure can be regenerated from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bench::BenchResult;

/// Version of the result and run-directory schema. Bump on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Whether an experiment finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed,
}

/// Storage of the model as run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageMetrics {
    pub parameters: usize,
    /// Exact bytes of all weights at their stored formats.
    pub weight_bytes: usize,
    /// `8 * weight_bytes / parameters`, whole model.
    pub bits_per_parameter: f64,
    /// Same, over quantized linear layers only (`None` when none are quantized).
    pub quantized_bits_per_parameter: Option<f64>,
    /// Bytes and parameters per format name (`f16`, `nf4-dq-b64`, ...).
    pub formats: BTreeMap<String, FormatBytes>,
}

/// Storage of the tensors of one format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatBytes {
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
}

/// Accuracy numbers a report plots; absent when not evaluated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AccuracyMetrics {
    pub coqa_f1: Option<f64>,
    pub coqa_f1_stderr: Option<f64>,
    pub coqa_em: Option<f64>,
    pub coqa_em_stderr: Option<f64>,
    /// Documents evaluated.
    pub coqa_docs: Option<usize>,
    pub perplexity: Option<f64>,
    /// Mean KL(base ‖ this) per token against the unquantized model.
    pub kl_divergence: Option<f64>,
    /// Fraction of tokens whose argmax equals the unquantized model's.
    pub top1_agreement: Option<f64>,
    /// Tokens the KL and top-1 agreement were measured over.
    #[serde(default)]
    pub divergence_tokens: Option<usize>,
}

/// Seconds spent in each stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub load_s: f64,
    pub quantize_s: f64,
    pub sanity_s: f64,
    pub eval_s: f64,
    pub bench_s: f64,
    /// Base and quantized logits for the KL / top-1 agreement.
    #[serde(default)]
    pub divergence_s: f64,
    pub total_s: f64,
}

/// Where and with what the experiment ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub tool_version: String,
    /// `git rev-parse HEAD` of the source tree at build time, if known.
    pub git_commit: Option<String>,
    pub hostname: String,
    pub cpu: String,
    pub cpu_cores: usize,
    pub memory_bytes: Option<u64>,
    /// Compute device (`cpu (2 threads)`, `NVIDIA H100 80GB HBM3 (cuda:0)`).
    pub device: String,
}

/// One sanity prompt and the greedy continuation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SanitySample {
    pub prompt: String,
    pub output: String,
}

/// Everything recorded about one experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResult {
    pub schema_version: u32,
    pub experiment: String,
    pub status: Status,
    /// The failure, when `status` is `failed`.
    pub error: Option<String>,
    /// The fully resolved experiment configuration.
    pub config: serde_json::Value,
    /// The model as loaded (`smollm2-135m`, a path, a hub id, `synth:tiny`).
    pub model: String,
    pub storage: Option<StorageMetrics>,
    pub accuracy: AccuracyMetrics,
    pub sanity: Vec<SanitySample>,
    /// Detailed evaluation outputs (CoQA aggregate, perplexity settings, ...).
    pub eval_details: serde_json::Value,
    pub bench: Option<BenchResult>,
    pub timings: Timings,
    pub provenance: Provenance,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
}
