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
    /// Quantize with RTN/GPTQ/AWQ and write a GPTQ or AWQ checkpoint directory.
    Export(cli::export::Args),
    /// Greedy continuation of a prompt.
    Generate(cli::generate::Args),
    /// Configuration, parameter count and storage by format.
    Inspect(cli::inspect::Args),
    /// Write seeded random weights of a named shape as an HF directory.
    Synth(cli::synth::Args),
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
        Command::Export(a) => cli::export::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Synth(a) => cli::synth::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
