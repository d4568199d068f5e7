//! The `quantbench` command line: parses arguments and hands each subcommand
//! to the library.

use clap::{Parser, Subcommand};
use quantbench::cli;

#[derive(Parser)]
#[command(
    name = "quantbench",
    version,
    about = "How few bits can this model be stored in, and what does each choice cost?"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure storage, memory, prefill and decode latency, throughput.
    Bench(cli::bench::Args),
    /// Mean KL(base‖quantized) per token and top-1 agreement on a text.
    Divergence(cli::divergence::Args),
    /// Quantize with RTN/GPTQ/AWQ and write a GPTQ or AWQ checkpoint directory.
    Export(cli::export::Args),
    /// Evaluate accuracy: CoQA (lm-eval's task), perplexity or sanity prompts.
    Eval(cli::eval::Args),
    /// Greedy continuation of a prompt.
    Generate(cli::generate::Args),
    /// Configuration, parameter count and storage by format.
    Inspect(cli::inspect::Args),
    /// Quantize with nf4/fp4/int8 and write a bitsandbytes-serialized HF directory.
    Quantize(cli::quantize::Args),
    /// Run named experiments into a resumable run directory.
    Run(cli::run::Args),
    /// Compare experiments (default: fp16 baseline, NF4, FP4).
    Compare(cli::run::CompareArgs),
    /// Run a grid of experiments from a sweep file.
    Sweep(cli::run::SweepArgs),
    /// Finished, running, failed and pending experiments of a run directory
    /// (with Slurm's view of its array tasks).
    Status(cli::status::Args),
    /// Work through the unfinished experiments of a sweep plan (started by
    /// `sweep --devices`).
    Worker(cli::worker::Args),
    /// Plots, report.md and report.html from run directories.
    Report(cli::report::Args),
    /// Write seeded random weights of a named shape as an HF directory.
    Synth(cli::synth::Args),
    /// Per-launch block timeline of the last GPU step recorded with
    /// QUANTBENCH_CUDA_TRACE=FILE.
    Timeline(cli::timeline::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Bench(a) => cli::bench::run_cmd(a),
        Command::Divergence(a) => cli::divergence::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Quantize(a) => cli::quantize::run(a),
        Command::Synth(a) => cli::synth::run(a),
        Command::Run(a) => cli::run::run(a),
        Command::Compare(a) => cli::run::compare(a),
        Command::Sweep(a) => cli::run::sweep_cmd(a),
        Command::Status(a) => cli::status::run(a),
        Command::Worker(a) => cli::worker::run(a),
        Command::Report(a) => cli::report::run(a),
        Command::Timeline(a) => cli::timeline::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
