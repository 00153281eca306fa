//! `tributary`: the one-machine entry point: `demo` (the pipeline on one machine), `bench`
//! (measurements against this machine's limits) and `sink` (a core sink from a config).
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad command line (clap).

mod bench;
mod bench_peers;
mod bench_pipeline;
mod bench_replicate;
mod bench_sink;
mod bench_train;
mod bench_uplink;
mod demo;

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
    /// Run the whole pipeline on one machine with embedded defaults: a fleet CA, a core sink with
    /// datasets on two targets, and simulated appliances streaming over QUIC for a while.
    Demo(demo::DemoArgs),
    /// Run a core sink from a TOML config (the same server as `core-sink serve`); prints
    /// "listening on ADDRESS" once ready; SIGTERM or Ctrl-C commits what is pending and exits.
    Sink {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Run an appliance daemon from a TOML config (the same daemon as the `appliance` binary),
    /// until SIGTERM or Ctrl-C; the benchmarks run it as a child process.
    Appliance {
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // rumqttd (the demo's embedded broker) logs every client disconnect as an error.
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG")
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
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

fn run_sink(config: &std::path::Path) -> anyhow::Result<()> {
    let config = core_sink::SinkConfig::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(core_sink::run_until_signal(config))
}

fn run_appliance(config: &std::path::Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(appliance::daemon::run(config, async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }))
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench { target } => bench::run(target),
        Command::Sink { config } => run_sink(&config),
        Command::Appliance { config } => run_appliance(&config),
        Command::Demo(args) => demo::run(&args),
    }
}
