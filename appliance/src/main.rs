//! `appliance`: the edge daemon. Reads one TOML config, runs source → filters → chunker → ring →
//! uplink pipelines and the metrics endpoint until SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 after a clean shutdown, 1 on any error (printed as `appliance: <what failed>`).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "appliance",
    version,
    about = "Tributary appliance daemon: sources, filters, chunker, LMDB ring and QUIC uplink to the core sink"
)]
struct Args {
    /// The appliance config (TOML). See docs/operations.md for every key.
    #[arg(long, default_value = "/etc/tributary/appliance.toml")]
    config: PathBuf,
    /// Only validate the config and exit (0 = valid).
    #[arg(long)]
    check_config: bool,
}

fn main() {
    if let Err(error) = try_main() {
        eprintln!("appliance: {error:#}");
        std::process::exit(1);
    }
}

fn try_main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if args.check_config {
        appliance::config::ApplianceConfig::load(&args.config)?;
        println!("{}: valid", args.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(appliance::daemon::run(&args.config, async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }))
}
