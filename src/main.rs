//! `tributary`: the one-machine entry point. Today it runs benchmarks; `tributary demo` (the whole
//! pipeline on one machine) arrives with the appliance and core-sink crates.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad command line (clap).

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tributary", version, about = "Tributary: an edge-to-core data pipeline for AI", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a component against the physical limit of this machine, measured in the same run.
    Bench {
        #[command(subcommand)]
        target: bench::Target,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match try_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tributary: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench { target } => bench::run(target),
    }
}
