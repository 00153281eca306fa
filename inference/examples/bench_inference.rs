//! Runs `src/bench_inference.rs` (the root package's `tributary bench inference`) from this
//! crate, so it can be built and run before the root package mounts it:
//! `cargo run --release -p tributary-inference --example bench_inference -- --models-dir models`.

#[path = "../../src/bench_inference.rs"]
mod bench_inference;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: bench_inference::InferenceArgs,
}

fn main() -> anyhow::Result<()> {
    bench_inference::run(Cli::parse().args)
}
