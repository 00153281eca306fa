//! `tributary bench sink`: dataset shard writing over 1, 2 and 4 target directories with
//! 200 KiB samples, against a plain parallel sequential write + fsync of the same bytes over the
//! same directories; and reading the published shards with the stock `webdataset` Python reader
//! against a plain sequential read of the same files. Both peers run in the same process run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use core_sink::datasets::manifest::Manifest;
use core_sink::datasets::pipeline::Pipeline;
use core_sink::datasets::{DatasetsConfig, Placement};
use core_sink::landing::{Committer, RawLanding};
use protocol::{ChunkBuilder, Lane, RecordRef};

const MIB: u64 = 1024 * 1024;
const SAMPLE_BYTES: usize = 200 * 1024;

#[derive(Args)]
pub struct SinkArgs {
    /// Directory holding the landing and the target directories.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Samples of 200 KiB per run.
    #[arg(long, default_value_t = 2_500)]
    samples: u64,
    /// Write an SVG bar chart of the results here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// ~255 B JSON rows written into one typed Parquet series shard (0 skips the case).
    #[arg(long, default_value_t = 400_000)]
    series_rows: u64,
    /// Only the Parquet series case (for profiling it alone).
    #[arg(long)]
    series_only: bool,
}

/// The typed Parquet series writer (`ParquetShardWriter`: field extraction, typed columns, row
/// groups, zstd) on ~255 B sensor JSON rows, against the peer every JSON consumer pays: one
/// `serde_json::Value` parse of the same payloads. Single thread, file written then fsynced.
fn bench_series(base: &Path, rows: u64) -> Result<()> {
    use core_sink::datasets::parquet::{OwnedSeriesRow, ParquetShardWriter};
    std::fs::create_dir_all(base)?;
    let rows: Vec<OwnedSeriesRow> = (0..rows)
        .map(|index| OwnedSeriesRow {
            device: format!("device-{:02}", index % 16),
            lane: "sensor".to_owned(),
            seq: 1 + index / 400,
            index: (index % 400) as u32,
            key: format!("reading-{index:010}"),
            timestamp_us: 1_780_000_000_000_000 + index as i64 * 1_000,
            content_type: "application/json".to_owned(),
            payload: crate::bench_uplink::sensor_json(index).into_bytes(),
        })
        .collect();
    let payload_bytes: u64 = rows.iter().map(|row| row.payload.len() as u64).sum();
    let started = Instant::now();
    let path = base.join("series.parquet");
    let mut writer = ParquetShardWriter::new(std::fs::File::create(&path)?, 65_536)?;
    for row in &rows {
        writer.append(&row.as_row())?;
    }
    writer.finish()?.sync_all()?;
    let write = rows.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut fields = 0usize;
    for row in &rows {
        let value: serde_json::Value = serde_json::from_slice(&row.payload)?;
        fields += value.as_object().map_or(0, serde_json::Map::len);
    }
    let parse = rows.len() as f64 / started.elapsed().as_secs_f64();
    assert!(fields > 0);
    println!(
        "parquet series: {} rows of {} B JSON: {:.0} rows/s ({:.1} MB/s of payload); serde_json Value parse alone {:.0} rows/s; ratio {:.2}",
        rows.len(),
        payload_bytes / rows.len().max(1) as u64,
        write,
        write * payload_bytes as f64 / rows.len().max(1) as f64 / 1e6,
        parse,
        write / parse
    );
    Ok(())
}

/// Lands `samples` media records of 200 KiB, one per chunk, and returns the checkpoint.
fn land_media(landing_dir: &Path, samples: u64) -> Result<Vec<u8>> {
    let mut landing = RawLanding::new(landing_dir, 1 << 30);
    landing.recover(None)?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut payload = vec![0u8; SAMPLE_BYTES];
    for index in 0..samples {
        for byte in payload.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        land_media_chunk(&mut landing, index, &payload)?;
    }
    landing.commit()?;
    Ok(landing.checkpoint())
}

/// Lands one media record (`frame-<index>`, a JPEG by its content type) as chunk seq
/// `index + 1` of device `bench-cam`; the caller commits.
pub(crate) fn land_media_chunk(landing: &mut RawLanding, index: u64, payload: &[u8]) -> Result<()> {
    let key = format!("frame-{index:08}");
    let mut builder = ChunkBuilder::new(Lane::Media, 256 * 1024);
    builder.push(RecordRef { key: &key, timestamp_us: index, content_type: "image/jpeg", payload })?;
    let encoded = builder.seal_raw().encode(index + 1);
    let (header, _) = protocol::decode_chunk(&encoded)?;
    landing.land("bench-cam", &header, &encoded)?;
    Ok(())
}

/// Plain parallel sequential write + fsync of `total` bytes spread over `targets`.
fn parallel_write_peer(targets: &[PathBuf], total: u64) -> Result<f64> {
    let per_target = total / targets.len() as u64;
    let block = vec![0x5au8; MIB as usize];
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let writers: Vec<_> = targets
            .iter()
            .map(|target| {
                let block = &block;
                scope.spawn(move || -> Result<()> {
                    let path = target.join("peer.bin");
                    let mut file = std::fs::File::create(&path)?;
                    let mut written = 0;
                    while written < per_target {
                        file.write_all(block)?;
                        written += block.len() as u64;
                    }
                    file.sync_all()?;
                    std::fs::remove_file(path)?;
                    Ok(())
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread")?;
        }
        Ok(())
    })?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn python(script: &str, files: &[PathBuf]) -> Result<f64> {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .context("run python3")?;
    anyhow::ensure!(output.status.success(), "python3 failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    text.trim().parse::<f64>().with_context(|| format!("python printed {text:?}"))
}

pub(crate) const WEBDATASET_READ: &str = r#"
import sys, time, webdataset
urls = ["file://" + path for path in sys.argv[1:]]
started = time.perf_counter()
total = 0
for sample in webdataset.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
    total += sum(len(value) for key, value in sample.items() if isinstance(value, bytes))
print(total / (time.perf_counter() - started))
"#;

pub(crate) const PLAIN_READ: &str = r#"
import sys, time
started = time.perf_counter()
total = 0
for path in sys.argv[1:]:
    with open(path, "rb") as file:
        while True:
            block = file.read(1 << 20)
            if not block:
                break
            total += len(block)
print(total / (time.perf_counter() - started))
"#;

pub fn bench_sink(args: &SinkArgs) -> Result<()> {
    let base = args.dir.join("tributary-bench-sink");
    let _ = std::fs::remove_dir_all(&base);
    if args.series_rows > 0 {
        bench_series(&base.join("series"), args.series_rows)?;
    }
    if args.series_only {
        let _ = std::fs::remove_dir_all(&base);
        return Ok(());
    }
    let landing_dir = base.join("landing");
    let checkpoint = land_media(&landing_dir, args.samples)?;
    let total = args.samples * SAMPLE_BYTES as u64;
    println!(
        "tributary bench sink: {} samples of 200 KiB ({:.0} MiB) into WebDataset shards, in {}",
        args.samples,
        total as f64 / MIB as f64,
        base.display()
    );
    println!(
        "{:<8} {:>12} {:>12} {:>7}   {:>16} {:>14} {:>7}",
        "targets", "shards MB/s", "peer MB/s", "ratio", "webdataset MB/s", "plain read MB/s", "ratio"
    );
    let mut results = BTreeMap::new();
    for count in [1usize, 2, 4] {
        let run = base.join(format!("run-{count}"));
        let targets: Vec<PathBuf> = (0..count).map(|index| run.join(format!("target{index}"))).collect();
        let mut config = DatasetsConfig::with_targets(targets.clone(), run.join("manifests"));
        config.placement = Placement::RoundRobin;
        config.shard_bytes_max = 64 * MIB;
        let mut pipeline = Pipeline::open(
            config,
            &landing_dir,
            std::sync::Arc::new(core_sink::dictionaries::DictionaryStore::open(&run.join("dictionaries"))?),
        )?;
        let started = Instant::now();
        while pipeline.step(&checkpoint)? {}
        pipeline.publish_open_shards();
        let write = total as f64 / started.elapsed().as_secs_f64();
        drop(pipeline);
        let peer = parallel_write_peer(&targets, total)?;
        let manifest =
            Manifest::read(&run.join("manifests/media/manifest.json"))?.context("media manifest")?;
        let shards: Vec<PathBuf> = manifest.shards.iter().map(|shard| shard.path.clone()).collect();
        let read = python(WEBDATASET_READ, &shards)?;
        let plain = python(PLAIN_READ, &shards)?;
        println!(
            "{count:<8} {:>12.1} {:>12.1} {:>7.2}   {:>16.1} {:>14.1} {:>7.2}",
            write / 1e6,
            peer / 1e6,
            write / peer,
            read / 1e6,
            plain / 1e6,
            read / plain
        );
        results.insert(count, (write, peer, read, plain));
    }
    println!(
        "targets: shard writing >= 0.85 of the parallel write peer; webdataset reading >= 0.90 of a plain read"
    );
    if let Some(plot) = &args.plot {
        std::fs::write(plot, svg(&results)).with_context(|| format!("write {}", plot.display()))?;
        println!("plot written to {}", plot.display());
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// A grouped bar chart: for each target count, shard write vs peer write, webdataset vs plain read.
fn svg(results: &BTreeMap<usize, (f64, f64, f64, f64)>) -> String {
    let groups: Vec<crate::bench::BarGroup> = results
        .iter()
        .map(|(count, (write, peer, read, plain))| crate::bench::BarGroup {
            label: format!("{count} target{}", if *count == 1 { "" } else { "s" }),
            values: vec![Some(*write), Some(*peer), Some(*read), Some(*plain)],
        })
        .collect();
    crate::bench::grouped_bar_svg(
        "tributary bench sink: MB/s by number of targets (200 KiB samples)",
        &["shard write", "parallel write peer", "webdataset read", "plain read peer"],
        &groups,
        false,
        |value| format!("{:.0}", value / 1e6),
    )
}
