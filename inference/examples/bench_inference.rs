//! Runs `inference::bench` (the root package's `tributary bench inference`) from this crate:
//! `cargo run --release -p tributary-inference --features bench --example bench_inference -- --models-dir models`.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: inference::bench::InferenceArgs,
}

fn main() -> anyhow::Result<()> {
    inference::bench::run(Cli::parse().args)
}
