//! One experiment: which model, at which precision, quantized how, evaluated
//! and benchmarked with which settings.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::bench::BenchConfig;
use crate::quant::QuantSpec;
use crate::tensor::DType;

/// Accuracy evaluation settings of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Run the three sanity prompts.
    pub sanity: bool,
    /// New tokens per sanity prompt.
    pub sanity_tokens: usize,
    /// Evaluate CoQA.
    pub coqa: bool,
    /// CoQA data (official JSON or HF layout); `None` = the bundled fixture.
    pub coqa_data: Option<PathBuf>,
    /// Evaluate only the first N documents (lm-eval's `--limit`).
    pub limit: Option<usize>,
    /// Sequences generated together.
    pub batch_size: usize,
    /// Compare logits with the unquantized model (KL divergence, top-1 agreement).
    pub divergence: bool,
    /// Text for the divergence measurement; `None` = the built-in text.
    pub divergence_text: Option<PathBuf>,
    /// Tokens of that text compared (the first ones).
    pub divergence_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            sanity: true,
            sanity_tokens: 32,
            coqa: true,
            coqa_data: None,
            limit: None,
            batch_size: 8,
            divergence: true,
            divergence_text: None,
            divergence_tokens: crate::eval::divergence::DEFAULT_TOKENS,
        }
    }
}

/// A named, fully specified experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name (the table key in experiments.toml).
    #[serde(default)]
    pub name: String,
    /// What the experiment is for.
    #[serde(default)]
    pub description: String,
    /// Model spec; `None` = the run's model.
    #[serde(default)]
    pub model: Option<String>,
    /// Precision of the unquantized weights (embeddings, norms, skipped layers,
    /// and the input to quantization).
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    /// Quantization method and settings.
    #[serde(default = "no_quant")]
    pub quant: QuantSpec,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Run the hardware benchmark.
    #[serde(default = "yes")]
    pub benchmark: bool,
    #[serde(default)]
    pub bench: BenchConfig,
}

fn yes() -> bool {
    true
}

fn default_dtype() -> DType {
    DType::F16
}

fn no_quant() -> QuantSpec {
    QuantSpec::None { dtype: None }
}

impl Experiment {
    /// Builds an experiment from its TOML table; unknown keys are errors.
    pub fn from_table(name: &str, table: toml::Table) -> Result<Experiment> {
        let mut exp: Experiment = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("experiment '{name}'"))?;
        exp.quant
            .validate()
            .with_context(|| format!("experiment '{name}': invalid quant settings"))?;
        exp.name = name.to_string();
        Ok(exp)
    }

    /// The experiment as a TOML table (for sweeps to edit).
    pub fn to_table(&self) -> Result<toml::Table> {
        Ok(toml::Table::try_from(self)?)
    }

    /// The model to load, given the run's default.
    pub fn model_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(default)
    }
}
