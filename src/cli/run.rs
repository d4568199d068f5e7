//! `quantbench run`, `compare` and `sweep`: experiments into a resumable run directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

use super::scaleout::ScaleArgs;
use crate::backend::Device;
use crate::bench::BenchConfig;
use crate::config::{Experiment, Registry, sweep};
use crate::runner::{RunOptions, run_experiments, summary_table};

/// Options shared by run, compare and sweep.
#[derive(ClapArgs, Debug, Clone)]
pub struct RunArgs {
    /// Model for every experiment.
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Evaluate only the first N CoQA documents.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Run directory (default: results/<command>-<model>-<device>); rerunning resumes it.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Experiment registry (default: the built-in configs/experiments.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue past a failing experiment, recording its error.
    #[arg(long)]
    pub keep_going: bool,
    /// Short benchmark settings (128-token prompts, batch 1 and 4, few
    /// tokens). The default on the CPU, where the full settings take long.
    #[arg(long, conflicts_with = "full_bench")]
    pub quick: bool,
    /// The experiments' own benchmark settings, also on the CPU.
    #[arg(long)]
    pub full_bench: bool,
    /// Calibration text for GPTQ/AWQ experiments: plain text or JSONL with a
    /// "text" field (default: each experiment's own, else the built-in text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
}

/// Model used when neither the experiment nor `--model` names one.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Benchmark settings of `--quick`.
pub fn quick_bench() -> BenchConfig {
    BenchConfig {
        prompt_lens: vec![128],
        decode_prompt_len: 128,
        decode_tokens: 16,
        warmup: 2,
        repeats: 3,
        batch_sizes: vec![1, 4],
        throughput_prompt_len: 32,
        throughput_tokens: 8,
        seed: 0,
    }
}

/// `s` with every character but ASCII letters, digits, `-` and `.` replaced by `_`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Resolves the run's settings for `experiments` (quick benchmarks where they
/// apply) and the run directory.
pub fn run_options(cmd: &str, experiments: &mut [Experiment], args: &RunArgs) -> RunOptions {
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    if args.quick || (args.device == Device::Cpu && !args.full_bench) {
        eprintln!("benchmarks: quick settings (--full-bench for the experiments' own)");
        for e in experiments.iter_mut() {
            e.bench = quick_bench();
        }
    }
    if let Some(path) = &args.calib {
        for c in experiments.iter_mut().filter_map(|e| e.quant.calib_mut()) {
            c.path = Some(path.clone());
        }
    }
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        PathBuf::from("results").join(format!(
            "{cmd}-{}-{}",
            sanitize(&model),
            sanitize(&args.device.to_string())
        ))
    });
    RunOptions {
        model,
        force_model: args.model.is_some(),
        device: args.device,
        limit: args.limit,
        keep_going: args.keep_going,
        run_dir,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    }
}

/// Runs `experiments` with the shared options and prints the summary.
pub fn execute(cmd: &str, mut experiments: Vec<Experiment>, args: &RunArgs) -> Result<()> {
    let opts = run_options(cmd, &mut experiments, args);
    let run_dir = opts.run_dir.clone();
    let results = run_experiments(experiments, &opts)?;
    print!("{}", summary_table(&results));
    println!("results: {} (quantbench report {0})", run_dir.display());
    Ok(())
}

/// Arguments of `quantbench run`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Experiment names from the registry.
    pub experiments: Vec<String>,
    /// Run every experiment of the registry.
    #[arg(long)]
    pub all: bool,
    /// Run experiment N of the sweep plan in --run-dir (what each Slurm
    /// array task of `sweep --slurm` does).
    #[arg(long, conflicts_with_all = ["experiments", "all"])]
    pub task: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
}

fn pick(registry: &Registry, names: &[String]) -> Result<Vec<Experiment>> {
    names.iter().map(|n| registry.get(n).cloned()).collect()
}

/// `quantbench run`.
pub fn run(args: Args) -> Result<()> {
    if let Some(task) = args.task {
        return super::worker::run_task(task, &args.run);
    }
    let registry = Registry::load(args.run.config.as_deref())?;
    let exps = if args.all {
        registry.experiments.values().cloned().collect()
    } else {
        if args.experiments.is_empty() {
            anyhow::bail!(
                "name experiments to run or pass --all; known: {}",
                registry.known()
            );
        }
        pick(&registry, &args.experiments)?
    };
    execute("run", exps, &args.run)
}

/// Arguments of `quantbench compare`.
#[derive(ClapArgs, Debug)]
pub struct CompareArgs {
    /// Experiments to compare (default: fp16_baseline bnb_4bit_nf4 bnb_4bit_fp4).
    pub experiments: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The default comparison trio.
pub const COMPARE_DEFAULT: [&str; 3] = ["fp16_baseline", "bnb_4bit_nf4", "bnb_4bit_fp4"];

/// `quantbench compare`.
pub fn compare(args: CompareArgs) -> Result<()> {
    let registry = Registry::load(args.run.config.as_deref())?;
    let names: Vec<String> = if args.experiments.is_empty() {
        COMPARE_DEFAULT.iter().map(|s| s.to_string()).collect()
    } else {
        args.experiments.clone()
    };
    execute("compare", pick(&registry, &names)?, &args.run)
}

/// Arguments of `quantbench sweep`.
#[derive(ClapArgs, Debug)]
pub struct SweepArgs {
    /// Grid file (base preset, [set] overrides, [grid] lists).
    pub grid: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub scale: ScaleArgs,
}

/// `quantbench sweep`.
pub fn sweep_cmd(args: SweepArgs) -> Result<()> {
    let registry = Registry::load(args.run.config.as_deref())?;
    let exps = sweep::load(&args.grid, &registry)?;
    let stem = args
        .grid
        .file_stem()
        .map_or("sweep".into(), |s| s.to_string_lossy().to_string());
    let cmd = format!("sweep-{stem}");
    if args.scale.is_scaled() {
        return super::scaleout::sweep(&cmd, exps, &args.run, &args.scale);
    }
    execute(&cmd, exps, &args.run)
}
