//! What to quantize and how: one serializable [`QuantSpec`] per method, shared
//! by the CLI (`--quant nf4,block_size=64`), experiment configs (TOML tables)
//! and result files.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// Modules transformers' bitsandbytes integration leaves unquantized.
pub fn default_skip_modules() -> Vec<String> {
    vec!["lm_head".to_string()]
}

fn default_block_size() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_compute_dtype() -> DType {
    DType::F32
}
fn default_threshold() -> f32 {
    6.0
}
fn default_bits() -> u32 {
    4
}
fn default_group_size() -> i64 {
    128
}
fn default_damp() -> f64 {
    0.01
}
fn default_gptq_block() -> usize {
    128
}

/// Calibration data for GPTQ / AWQ.
///
/// The defaults, 16 windows of 512 tokens, suit the CPU and the built-in
/// text (about 1,700 tokens): GPTQ on smollm2-135m takes about three minutes
/// on a 2-core machine. The GPTQ paper's setting, 128 windows of 2048
/// tokens of C4 or WikiText-2, needs a calibration file of at least 2048
/// tokens and is 32 times the tokens (and more attention work per window).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibConfig {
    /// Plain text or JSONL (with a `text` field); `None` uses the built-in text.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Number of sampled windows.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokens per window.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

fn default_samples() -> usize {
    16
}
fn default_seq_len() -> usize {
    512
}

impl Default for CalibConfig {
    fn default() -> Self {
        CalibConfig {
            path: None,
            samples: default_samples(),
            seq_len: default_seq_len(),
            seed: 0,
        }
    }
}

/// bitsandbytes 4-bit (NF4 or FP4) settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bnb4Config {
    /// Weights per absmax block (power of two).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Quantize the absmax values again (8-bit, blocks of 256).
    #[serde(default = "default_true")]
    pub double_quant: bool,
    /// Dtype in which dequantized weights meet activations.
    #[serde(default = "default_compute_dtype")]
    pub compute_dtype: DType,
    /// Module name suffixes left unquantized.
    #[serde(default = "default_skip_modules")]
    pub skip_modules: Vec<String>,
}

/// LLM.int8() settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Int8Config {
    /// Activation magnitude from which a feature column is an outlier; 0 disables.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default = "default_skip_modules")]
    pub skip_modules: Vec<String>,
}

/// Round-to-nearest group-wise integer quantization (the GPTQ/AWQ baseline).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtnConfig {
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// Columns per group; -1 = one group per row.
    #[serde(default = "default_group_size")]
    pub group_size: i64,
    /// Symmetric (no zero point) instead of asymmetric min-max.
    #[serde(default)]
    pub sym: bool,
    #[serde(default = "default_skip_modules")]
    pub skip_modules: Vec<String>,
}

/// GPTQ settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptqConfig {
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_group_size")]
    pub group_size: i64,
    /// Quantize columns in order of decreasing Hessian diagonal.
    #[serde(default)]
    pub desc_act: bool,
    /// With act-order: fix group parameters before reordering.
    #[serde(default)]
    pub static_groups: bool,
    #[serde(default)]
    pub sym: bool,
    /// Dampening as a fraction of the mean Hessian diagonal.
    #[serde(default = "default_damp")]
    pub damp_percent: f64,
    /// Columns per lazy-update block.
    #[serde(default = "default_gptq_block")]
    pub block_size: usize,
    /// Quantize q/k/v, then o, then gate/up, then down, re-capturing inputs in between.
    #[serde(default = "default_true")]
    pub true_sequential: bool,
    #[serde(default)]
    pub calib: CalibConfig,
    #[serde(default = "default_skip_modules")]
    pub skip_modules: Vec<String>,
}

/// AWQ settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwqConfig {
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_group_size")]
    pub group_size: i64,
    /// Points of the α grid in [0, 1].
    #[serde(default = "default_grid")]
    pub grid: usize,
    /// Run the clipping search after scaling.
    #[serde(default = "default_true")]
    pub clip: bool,
    /// Calibration tokens (an even stride over all of them) on which the
    /// scale and clipping searches measure output error.
    #[serde(default = "default_search_tokens")]
    pub search_tokens: usize,
    #[serde(default)]
    pub calib: CalibConfig,
    #[serde(default = "default_skip_modules")]
    pub skip_modules: Vec<String>,
}

fn default_search_tokens() -> usize {
    4096
}

fn default_grid() -> usize {
    20
}

/// How a model's weights are stored: unquantized at a dtype, or a method.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum QuantSpec {
    /// Unquantized; every weight rounded to `dtype` when given, else kept as loaded.
    None {
        #[serde(default)]
        dtype: Option<DType>,
    },
    Int8(Int8Config),
    Nf4(Bnb4Config),
    Fp4(Bnb4Config),
    Rtn(RtnConfig),
    Gptq(GptqConfig),
    Awq(AwqConfig),
}

/// Method names accepted by [`QuantSpec::parse`].
pub const METHODS: [&str; 7] = ["none", "int8", "nf4", "fp4", "rtn", "gptq", "awq"];

impl QuantSpec {
    /// Parses `METHOD[,key=value...]`, e.g. `nf4`, `nf4,block_size=128,double_quant=false`,
    /// `gptq,bits=3,group_size=128`, `none,dtype=bf16`. Values are TOML literals
    /// (strings may be bare words). Keys `calib_samples`, `calib_seq_len`,
    /// `calib_seed`, `calib_path` set the fields of the `calib` table.
    pub fn parse(text: &str) -> Result<QuantSpec> {
        let mut parts = text.split(',').map(str::trim);
        let method = parts.next().unwrap_or_default();
        if !METHODS.contains(&method) {
            bail!(
                "unknown quantization method '{method}'; known: {}",
                METHODS.join(", ")
            );
        }
        let mut table = toml::Table::new();
        table.insert("method".into(), toml::Value::String(method.into()));
        for kv in parts.filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("'{kv}' in '{text}' is not key=value"))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.trim().to_string()));
            let k = k.trim();
            if let Some(field) = k.strip_prefix("calib_") {
                let calib = table
                    .entry("calib")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = calib {
                    t.insert(field.to_string(), value);
                }
            } else {
                table.insert(k.to_string(), value);
            }
        }
        Self::from_table(table).with_context(|| format!("invalid quantization '{text}'"))
    }

    /// Builds a spec from a TOML table with a `method` key; unknown keys are errors.
    pub fn from_table(table: toml::Table) -> Result<QuantSpec> {
        let spec: QuantSpec = toml::Value::Table(table).try_into()?;
        spec.validate()?;
        Ok(spec)
    }

    /// The calibration settings of a calibrated method (GPTQ, AWQ).
    pub fn calib_mut(&mut self) -> Option<&mut CalibConfig> {
        match self {
            QuantSpec::Gptq(c) => Some(&mut c.calib),
            QuantSpec::Awq(c) => Some(&mut c.calib),
            _ => None,
        }
    }

    /// The method's name.
    pub fn method(&self) -> &'static str {
        match self {
            QuantSpec::None { .. } => "none",
            QuantSpec::Int8(_) => "int8",
            QuantSpec::Nf4(_) => "nf4",
            QuantSpec::Fp4(_) => "fp4",
            QuantSpec::Rtn(_) => "rtn",
            QuantSpec::Gptq(_) => "gptq",
            QuantSpec::Awq(_) => "awq",
        }
    }

    /// Checks value ranges and combinations.
    pub fn validate(&self) -> Result<()> {
        match self {
            QuantSpec::Nf4(c) | QuantSpec::Fp4(c) => {
                if c.block_size < 16 || !c.block_size.is_power_of_two() {
                    bail!(
                        "block_size {} must be a power of two of at least 16",
                        c.block_size
                    );
                }
            }
            QuantSpec::Int8(c) => {
                if c.threshold.is_nan() || c.threshold < 0.0 {
                    bail!(
                        "threshold {} must be ≥ 0 (0 disables outliers)",
                        c.threshold
                    );
                }
            }
            QuantSpec::Rtn(c) => check_int_format(c.bits, c.group_size)?,
            QuantSpec::Gptq(c) => {
                check_int_format(c.bits, c.group_size)?;
                if c.static_groups && !c.desc_act {
                    bail!("static_groups only applies with desc_act = true");
                }
                if !(0.0..1.0).contains(&c.damp_percent) || c.damp_percent == 0.0 {
                    bail!("damp_percent {} must be in (0, 1)", c.damp_percent);
                }
                if c.block_size == 0 {
                    bail!("block_size must be positive");
                }
                if c.desc_act && c.static_groups && c.group_size == -1 {
                    bail!(
                        "static_groups needs a group_size (it is meaningless with group_size = -1)"
                    );
                }
                check_calib(&c.calib)?;
            }
            QuantSpec::Awq(c) => {
                check_int_format(c.bits, c.group_size)?;
                if c.grid == 0 {
                    bail!("grid must be at least 1");
                }
                if c.search_tokens == 0 {
                    bail!("search_tokens must be at least 1");
                }
                check_calib(&c.calib)?;
            }
            QuantSpec::None { .. } => {}
        }
        Ok(())
    }
}

fn check_int_format(bits: u32, group_size: i64) -> Result<()> {
    if ![2, 3, 4, 8].contains(&bits) {
        bail!("bits {bits} not supported: use 2, 3, 4 or 8");
    }
    if group_size != -1 && (group_size < 8 || !(group_size as usize).is_multiple_of(8)) {
        bail!("group_size {group_size} must be -1 or a positive multiple of 8 (32, 64, 128)");
    }
    Ok(())
}

fn check_calib(c: &CalibConfig) -> Result<()> {
    if c.samples == 0 || c.seq_len == 0 {
        bail!("calibration needs at least one sample of at least one token");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_forms_with_defaults() {
        let s = QuantSpec::parse("nf4").unwrap();
        let QuantSpec::Nf4(c) = &s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (c.block_size, c.double_quant, c.compute_dtype),
            (64, true, DType::F32)
        );
        let s =
            QuantSpec::parse("fp4,block_size=128,double_quant=false,compute_dtype=bf16").unwrap();
        assert_eq!(
            s,
            QuantSpec::Fp4(Bnb4Config {
                block_size: 128,
                double_quant: false,
                compute_dtype: DType::BF16,
                skip_modules: vec!["lm_head".into()],
            })
        );
        let s = QuantSpec::parse("gptq,bits=3,group_size=-1,desc_act=true").unwrap();
        let QuantSpec::Gptq(g) = &s else { panic!() };
        assert_eq!((g.bits, g.group_size, g.desc_act), (3, -1, true));
        assert_eq!(
            QuantSpec::parse("none,dtype=bf16").unwrap(),
            QuantSpec::None {
                dtype: Some(DType::BF16)
            }
        );
    }

    #[test]
    fn rejects_bad_specs_clearly() {
        let err = |t: &str| format!("{:#}", QuantSpec::parse(t).unwrap_err());
        assert!(err("q5").contains("unknown quantization method 'q5'"));
        assert!(err("nf4,block_size=48").contains("power of two"));
        assert!(err("nf4,blocksize=64").contains("blocksize"));
        assert!(err("gptq,bits=5").contains("bits 5"));
        assert!(err("gptq,static_groups=true").contains("desc_act"));
        assert!(err("rtn,group_size=100").contains("group_size 100"));
        assert!(err("gptq,bits=1").contains("bits 1"));
        assert!(err("gptq,group_size=0").contains("group_size 0"));
        assert!(err("gptq,damp_percent=0").contains("damp_percent"));
        assert!(
            err("gptq,desc_act=true,static_groups=true,group_size=-1").contains("static_groups")
        );
        assert!(err("awq,calib_samples=0").contains("at least one sample"));
        let s =
            QuantSpec::parse("gptq,calib_samples=8,calib_seq_len=256,calib_path=c.txt").unwrap();
        let QuantSpec::Gptq(g) = &s else { panic!() };
        assert_eq!((g.calib.samples, g.calib.seq_len), (8, 256));
        assert_eq!(g.calib.path.as_deref(), Some(std::path::Path::new("c.txt")));
    }
}
