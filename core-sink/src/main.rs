//! `core-sink`: the core service (QUIC ingest) and the fleet CA commands.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use core_sink::SinkConfig;
use fleet::{FleetCa, RevocationList, Validity};

#[derive(Parser)]
#[command(name = "core-sink", version, about = "Tributary core sink: lands appliance data exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the QUIC ingest server until SIGINT/SIGTERM; commits what is pending before exiting.
    Serve {
        /// TOML config (see docs/operations.md for every key).
        #[arg(long)]
        config: PathBuf,
    },
    /// Create a CA, a server certificate and a config file in DIR: a ready-to-run sink.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: SocketAddr,
        /// Names (DNS or IP) the server certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Fleet certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Training datasets: what the manifests list.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// The core archive of AI decisions: verify it, show or export one decision, check a bundle.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Copy the published datasets and the archive to the replicas of the config's [replication]
    /// section, pass after pass until SIGINT/SIGTERM (`--once`: one pass); `verify` compares.
    Replicate {
        #[command(subcommand)]
        command: Option<ReplicateCommand>,
        /// TOML config of the sink (its [replication], [datasets] and [archive] sections).
        #[arg(long)]
        config: Option<PathBuf>,
        /// One pass, then exit (1 if a replica failed).
        #[arg(long)]
        once: bool,
        /// Verify each replica first and re-copy every difference from the source (implies --once).
        #[arg(long)]
        repair: bool,
    },
    /// Rebuild the datasets and the archive from a replica into a new directory: a directory
    /// replica (`--from DIR`) or any replica of a config (`--config FILE --replica NAME`).
    Restore {
        /// The replica's directory.
        #[arg(long, conflicts_with_all = ["config", "replica"])]
        from: Option<PathBuf>,
        /// The sink's config naming the replica in [replication] (S3 credentials from the
        /// environment).
        #[arg(long, requires = "replica")]
        config: Option<PathBuf>,
        #[arg(long, requires = "config")]
        replica: Option<String>,
        /// Where to restore (missing or empty).
        #[arg(long)]
        to: PathBuf,
    },
    /// Device fleet over MQTT: claim tokens, approvals, remote config, revocation, fleet view.
    Fleet {
        /// TOML config of the sink (its [onboarding] section, ca_dir and revocation_file).
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        command: onboarding_authority::cli::FleetCommand,
    },
}

#[derive(Subcommand)]
enum ReplicateCommand {
    /// Compare every replica with the sources and name every difference; exit 1 if any.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// Only this replica.
        #[arg(long)]
        replica: Option<String>,
    },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// One line per dataset: kind, shards, samples, bytes, targets used.
    List {
        #[arg(long)]
        config: PathBuf,
    },
    /// Every shard of DATASET: name, target, samples, bytes, sha256, seq ranges.
    Show {
        dataset: String,
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the fleet CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "tributary fleet")]
        fleet: String,
    },
    /// Issue a device certificate: writes cert.pem, key.pem and ca.pem into OUT.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        device: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue the sink's server certificate into OUT.
    IssueServer {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Add DEVICE to the revocation list; a running sink refuses it within revocation_reload_ms.
    Revoke {
        device: String,
        /// The list the sink reads (its `revocation_file`).
        #[arg(long)]
        revocation_file: PathBuf,
    },
    /// Replace the fleet CA without a gap, in three phases (docs/operations.md, "CA rollover").
    #[command(long_about = ROLLOVER_HELP)]
    Rollover {
        #[command(subcommand)]
        phase: RolloverCommand,
    },
}

const ROLLOVER_HELP: &str = "Replace the fleet CA without a gap, in three phases.\n\n\
1. begin: stages a new CA (ca.next.key, ca.next.pem), certifies it with the old one \
(ca.cross.pem) and trusts both (ca.pem = [old, new]). The old CA still signs. The running sink \
and authority take it up by themselves; give the broker the new ca.pem (restart it). Devices \
learn the new CA with their next renewal (the old CA vouches for it): wait one renewal period.\n\
2. switch: the new CA signs (ca.key replaced, ca.pem = [new, old]). Re-issue the sink's and \
the broker's server certificates from it (`ca issue-server`) and restart the broker; devices \
move to new-CA certificates at their next renewal. `fleet list` shows each device's ISSUER.\n\
3. retire: ca.pem = [new]; refused while active devices hold an old-CA certificate (named), \
unless --force. Give the broker the new ca.pem and restart it; the sink takes it up by itself.\n\n\
Each phase is re-runnable: after a crash, run it again.";

#[derive(Subcommand)]
enum RolloverCommand {
    /// Phase 1: stage a new CA, trusted alongside the old one, which still signs.
    Begin {
        /// The fleet CA directory (the sink's `ca_dir`).
        #[arg(long = "ca")]
        ca_dir: PathBuf,
    },
    /// Phase 2: the new CA signs; the old one is still trusted.
    Switch {
        #[arg(long = "ca")]
        ca_dir: PathBuf,
    },
    /// Phase 3: stop trusting the old CA.
    Retire {
        #[arg(long = "ca")]
        ca_dir: PathBuf,
        /// The sink's config: its [onboarding] registry tells which devices still hold an
        /// old-CA certificate. Required unless --force.
        #[arg(long, required_unless_present = "force")]
        config: Option<PathBuf>,
        /// Retire even though devices still hold old-CA certificates (they stop working).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match try_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("core-sink: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Init { dir, listen, names } => init(&dir, listen, &names),
        Command::Ca { command } => ca(command),
        Command::Datasets { command } => datasets(command),
        Command::Audit { command } => audit(command),
        Command::Replicate { command: Some(ReplicateCommand::Verify { config, replica }), .. } => {
            replicate_verify(&config, replica.as_deref())
        }
        Command::Replicate { command: None, config, once, repair } => {
            let config = config
                .context("--config FILE is required (the sink's config with a [replication] section)")?;
            replicate(&config, once, repair)
        }
        Command::Restore { from, config, replica, to } => {
            let replica = restore_source(from.as_deref(), config.as_deref(), replica.as_deref())?;
            let report = core_sink::replication::restore::restore(replica.as_ref(), &to, 4 << 30)
                .with_context(|| format!("restore from {} into {}", replica.describe(), to.display()))?;
            println!(
                "restored {} log bytes, {} objects, {} datasets ({} shards, {} bytes) into {}\n\
                 archive: {}/archive (check it with `core-sink audit verify --archive {}/archive`)\n\
                 datasets: targets under {}/datasets/targets/<target>, manifest_dir = {}/datasets/manifests\n\
                 review: {} shards in {}/review; raw landing: {} files ({} bytes) under {}/landing/raw",
                report.log_bytes,
                report.objects,
                report.datasets,
                report.shards,
                report.shard_bytes,
                to.display(),
                to.display(),
                to.display(),
                to.display(),
                to.display(),
                report.review_shards,
                to.display(),
                report.landing_files,
                report.landing_bytes,
                to.display()
            );
            Ok(())
        }
        Command::Fleet { config, command } => {
            let config = SinkConfig::load(&config)?;
            let onboarding = config.onboarding.as_ref().context("the config has no [onboarding] section")?;
            let printed =
                onboarding_authority::cli::run(command, onboarding, &config.ca_dir, &config.revocation_file)?;
            println!("{printed}");
            Ok(())
        }
    }
}

fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = SinkConfig::load(config_path)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start tokio runtime")?;
    runtime.block_on(core_sink::run_until_signal(config))
}

/// The replica `restore` reads: `--from DIR`, or `--replica NAME` of `--config FILE`.
fn restore_source(
    from: Option<&Path>,
    config: Option<&Path>,
    name: Option<&str>,
) -> anyhow::Result<Box<dyn core_sink::replication::replica::Replica>> {
    use core_sink::replication::replica::{DirectoryReplica, S3Replica};
    if let Some(from) = from {
        anyhow::ensure!(from.is_dir(), "restore: --from {} is not a directory", from.display());
        return Ok(Box::new(DirectoryReplica::new(from)));
    }
    let (Some(config_path), Some(name)) = (config, name) else {
        anyhow::bail!("restore needs --from DIR, or --config FILE --replica NAME");
    };
    let config = SinkConfig::load(config_path)?;
    let replica = config
        .replication
        .as_ref()
        .and_then(|replication| replication.replicas.iter().find(|replica| replica.name == name))
        .with_context(|| {
            format!("config {}: no replica named {name:?} in [replication]", config_path.display())
        })?;
    match (&replica.directory, &replica.s3) {
        (Some(directory), _) => Ok(Box::new(DirectoryReplica::new(directory))),
        (None, Some(s3)) => {
            Ok(Box::new(S3Replica::connect(s3).map_err(|error| anyhow::anyhow!("replica {name}: {error}"))?))
        }
        (None, None) => anyhow::bail!("replica {name} names neither a directory nor s3"),
    }
}

fn replicate(config_path: &Path, once: bool, repair: bool) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let config = SinkConfig::load(config_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut replicator = core_sink::replication::Replicator::open(&config, stop.clone())
        .with_context(|| format!("config {}", config_path.display()))?;
    if config.replication.as_ref().is_some_and(|replication| replication.adaptive) {
        tracing::warn!(
            "replication.adaptive = true needs the ingest latency of a lander in the same process \
             (core-sink serve); standalone, the budget stays at bytes_per_second_max"
        );
    }
    if once || repair {
        let reports = replicator.pass(repair);
        let mut failed = 0;
        for report in &reports {
            match &report.error {
                None => println!("{}: up to date (repaired {})", report.replica, report.repaired),
                Some(error) => {
                    failed += 1;
                    println!("{}: failed: {error}", report.replica);
                }
            }
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} replicas failed (the next pass resumes where this one stopped)",
            reports.len()
        );
        return Ok(());
    }
    // The replicator on its own thread; this one waits for SIGINT or SIGTERM, then stops it
    // between two objects (what it copied is durable and in its watermark).
    let thread = std::thread::Builder::new().name("replication".into()).spawn(move || replicator.run())?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("start tokio runtime")?;
    runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        anyhow::Ok(())
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = thread.join();
    Ok(())
}

fn replicate_verify(config_path: &Path, only: Option<&str>) -> anyhow::Result<()> {
    let config = SinkConfig::load(config_path)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replicator = core_sink::replication::Replicator::open(&config, stop)
        .with_context(|| format!("config {}", config_path.display()))?;
    let names = replicator.replica_names();
    if let Some(only) = only {
        anyhow::ensure!(
            names.iter().any(|name| name == only),
            "no replica named {only:?} in {}",
            config_path.display()
        );
    }
    let mut differences_total = 0;
    for (index, name) in names.iter().enumerate() {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        let differences = replicator.verify(index).with_context(|| format!("verify replica {name}"))?;
        if differences.is_empty() {
            println!("{name}: equal to the sources");
        }
        for difference in &differences {
            println!("{name}: {difference}");
        }
        differences_total += differences.len();
    }
    anyhow::ensure!(
        differences_total == 0,
        "{differences_total} differences (`core-sink replicate --repair --config {}` re-copies them)",
        config_path.display()
    );
    Ok(())
}

fn init(dir: &Path, listen: SocketAddr, names: &[String]) -> anyhow::Result<()> {
    let ca_dir = dir.join("ca");
    let ca = FleetCa::init(&ca_dir, "tributary fleet")?;
    let server = ca.issue_server(names, Validity::days(365))?;
    server.write_to(&dir.join("server"), ca.certificate_pem())?;
    let config = format!(
        "# core-sink config written by `core-sink init`; relative paths are relative to this file.\n\
         listen = \"{listen}\"\n\
         state_dir = \"state\"\n\
         landing_dir = \"landing\"\n\
         ca_dir = \"ca\"\n\
         server_certificate_dir = \"server\"\n\
         revocation_file = \"ca/revoked.txt\"\n"
    );
    let config_path = dir.join("sink.toml");
    std::fs::write(&config_path, config).with_context(|| format!("write {}", config_path.display()))?;
    println!("sink ready: core-sink serve --config {}", config_path.display());
    Ok(())
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, fleet } => {
            FleetCa::init(&dir, &fleet)?;
            println!("fleet CA created in {}", dir.display());
        }
        CaCommand::Issue { ca_dir, device, out, days } => {
            let ca = FleetCa::load(&ca_dir)?;
            ca.issue_device(&device, Validity::days(days))?.write_to(&out, ca.certificate_pem())?;
            println!("certificate for device {device} written to {}", out.display());
        }
        CaCommand::IssueServer { ca_dir, names, out, days } => {
            let ca = FleetCa::load(&ca_dir)?;
            ca.issue_server(&names, Validity::days(days))?.write_to(&out, ca.certificate_pem())?;
            println!("server certificate for {} written to {}", names.join(", "), out.display());
        }
        CaCommand::Revoke { device, revocation_file } => {
            RevocationList::revoke(&revocation_file, &device)?;
            println!("device {device} revoked in {}", revocation_file.display());
        }
        CaCommand::Rollover { phase } => {
            let report = match phase {
                RolloverCommand::Begin { ca_dir } => fleet::rollover::begin(&ca_dir)?,
                RolloverCommand::Switch { ca_dir } => fleet::rollover::switch(&ca_dir)?,
                RolloverCommand::Retire { ca_dir, config, force } => {
                    let still_on_old = match config {
                        Some(config_path) => {
                            let config = SinkConfig::load(&config_path)?;
                            let onboarding = config.onboarding.as_ref().context(
                                "the config has no [onboarding] section (pass --force without it)",
                            )?;
                            let registry = onboarding_authority::Registry::open(&onboarding.registry_dir)?;
                            onboarding_authority::cli::devices_on_other_cas(&registry, &ca_dir)?
                        }
                        None => Vec::new(),
                    };
                    fleet::rollover::retire(&ca_dir, &still_on_old, force)?
                }
            };
            println!(
                "fleet CA: {:?}; signer {}; trusted {}",
                report.phase,
                report.signer,
                report.bundle.join(", ")
            );
        }
    }
    Ok(())
}

fn datasets(command: DatasetsCommand) -> anyhow::Result<()> {
    use core_sink::datasets::manifest::Manifest;
    let (config, only) = match &command {
        DatasetsCommand::List { config } => (config, None),
        DatasetsCommand::Show { dataset, config } => (config, Some(dataset.as_str())),
    };
    let config = SinkConfig::load(config)?;
    let datasets = config.datasets.context("the config has no [datasets] section")?;
    for name in ["media", "sensor"] {
        if only.is_some_and(|only| only != name) {
            continue;
        }
        let path = datasets.manifest_dir.join(name).join("manifest.json");
        let Some(manifest) = Manifest::read(&path)? else {
            println!("{name}: no manifest yet ({})", path.display());
            continue;
        };
        let samples: u64 = manifest.shards.iter().map(|shard| shard.samples).sum();
        let bytes: u64 = manifest.shards.iter().map(|shard| shard.bytes).sum();
        let targets: std::collections::BTreeSet<usize> =
            manifest.shards.iter().map(|shard| shard.target).collect();
        println!(
            "{name}: {} ({}), {} shards, {samples} samples, {bytes} bytes, targets {targets:?}",
            manifest.kind,
            path.display(),
            manifest.shards.len()
        );
        if only.is_some() {
            for shard in &manifest.shards {
                let ranges: Vec<String> = shard
                    .ranges
                    .iter()
                    .map(|range| {
                        format!("{}/{} {}..={}", range.device, range.lane, range.first_seq, range.last_seq)
                    })
                    .collect();
                println!(
                    "  {} target {} samples {} bytes {} sha256 {} [{}]",
                    shard.path.display(),
                    shard.target,
                    shard.samples,
                    shard.bytes,
                    shard.sha256,
                    ranges.join(", ")
                );
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every checkpoint signature, the consistency of successive checkpoints, every log
    /// entry and every object it names (in the store the archive's objects.toml names; an S3
    /// store takes AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment); exits 1
    /// naming the first bad entry, checkpoint or object.
    Verify {
        #[arg(long)]
        archive: PathBuf,
    },
    /// One decision as JSON: fields, device, objects and their locations, inclusion proof.
    Show {
        id: String,
        #[arg(long)]
        archive: PathBuf,
        /// The device, when several devices used the same decision id.
        #[arg(long)]
        device: Option<String>,
    },
    /// Write the evidence bundle of one decision (leaf, objects, checkpoint, key, proof) to OUT.
    Export {
        id: String,
        #[arg(long)]
        archive: PathBuf,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an evidence bundle offline; prints the key it is signed with, to compare with the
    /// archive's published keys/checkpoint.vkey.
    VerifyBundle { dir: PathBuf },
    /// Decisions scoring below SCORE_MAX, one per line, in log order.
    Review {
        #[arg(long)]
        archive: PathBuf,
        #[arg(long)]
        score_max: f32,
    },
}

fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { archive } => {
            let report = archive::verify(&archive)
                .with_context(|| format!("archive {} failed verification", archive.display()))?;
            println!(
                "archive {} verified: {} entries ({} decisions, {} models), {} checkpoints (latest covers {}), \
                 {} objects ({} bytes) hashed, {} entries after the latest checkpoint",
                archive.display(),
                report.entries,
                report.decisions,
                report.models,
                report.checkpoints,
                report.latest_checkpoint_tree_size,
                report.objects_checked,
                report.object_bytes_hashed,
                report.entries_after_latest_checkpoint
            );
        }
        AuditCommand::Show { id, archive, device } => {
            let view = archive::show(&archive, &id, device.as_deref())
                .with_context(|| format!("show decision {id} of archive {}", archive.display()))?;
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        AuditCommand::Export { id, archive, device, out } => {
            archive::export(&archive, &id, device.as_deref(), &out)
                .with_context(|| format!("export decision {id} of archive {}", archive.display()))?;
            println!("evidence bundle of decision {id} written to {}", out.display());
        }
        AuditCommand::VerifyBundle { dir } => {
            let report = archive::verify_bundle(&dir)
                .with_context(|| format!("evidence bundle {} failed verification", dir.display()))?;
            println!(
                "bundle {} verified: decision {} of device {}, leaf {} of {} (root {}), signed by {}",
                dir.display(),
                report.decision_id,
                report.device,
                report.leaf_index,
                report.tree_size,
                report.root_hash,
                report.verifier_key
            );
        }
        AuditCommand::Review { archive, score_max } => {
            for item in archive::review_list(&archive, score_max)? {
                println!(
                    "{} {} {} {} {}",
                    item.device, item.decision_id, item.label, item.score, item.original
                );
            }
        }
    }
    Ok(())
}
