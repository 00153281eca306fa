//! `image-build`: builds, checks and boot-tests Tributary appliance images.
//!
//! Exit codes: 0 success; 1 the build, check or boot test failed (the message says why);
//! 2 bad command line (from clap).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use image_build::boot_test::{self, BootTestOptions};
use image_build::build::{self, BuildOptions};
use image_build::config::{ImageConfig, SigningPaths};
use image_build::{board, check};

#[derive(Parser)]
#[command(
    name = "image-build",
    version,
    about = "Build flashable A/B Tributary appliance images and signed RAUC update bundles",
    long_about = "Build flashable A/B Tributary appliance images and signed RAUC update bundles.\n\n\
        `build` runs mmdebstrap (root filesystem), genimage (GPT disk image with slots rootfs-a, \
        rootfs-b and a data partition) and rauc (signed bundle of the same rootfs). `check` \
        verifies the partition table and the bundle signature. `test` boots the image under \
        qemu (TCG) and waits for the appliance to be reported active and healthy.\n\n\
        Debian packages needed: mmdebstrap genimage rauc openssl e2fsprogs squashfs-tools \
        (build, check); qemu-system-x86 (test). See image-build/README.md for the TOML format."
)]
struct Cli {
    /// Hide progress spinners (logs still go to stderr).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Build the disk image and the signed RAUC bundle from an image TOML (run as root).
    Build {
        /// The image description (see image-build/README.md).
        config: PathBuf,
        /// Output directory: NAME.img, NAME-VERSION.raucb, keyring.pem, vmlinuz, initrd.img, logs/.
        #[arg(long, short, default_value = "image-out")]
        output: PathBuf,
        /// Reuse mmdebstrap tarballs from this directory (keyed by the mmdebstrap arguments).
        #[arg(long, value_name = "DIR")]
        rootfs_cache: Option<PathBuf>,
        /// Keep output/work (unpacked rootfs, genimage files) after a successful build.
        #[arg(long)]
        keep_work: bool,
        /// Production signing certificate (PEM); needs --key and --keyring. Overrides [signing].
        #[arg(long, requires_all = ["key", "keyring"], value_name = "PEM")]
        cert: Option<PathBuf>,
        /// Production signing key (PEM file).
        #[arg(long, requires_all = ["cert", "keyring"], value_name = "PEM")]
        key: Option<PathBuf>,
        /// Keyring (CA certificates) installed in the image to verify bundles.
        #[arg(long, requires_all = ["cert", "key"], value_name = "PEM")]
        keyring: Option<PathBuf>,
    },
    /// Check a disk image and bundle: GPT with rootfs-a, rootfs-b, data; signature verified.
    Check {
        disk_image: PathBuf,
        bundle: PathBuf,
        /// Keyring to verify the bundle with [default: keyring.pem beside the bundle].
        #[arg(long, value_name = "PEM")]
        keyring: Option<PathBuf>,
        /// Image TOML: also check partition sizes and the bundle's compatible string.
        #[arg(long, value_name = "TOML")]
        config: Option<PathBuf>,
    },
    /// Boot the image under qemu (TCG) until the appliance is reported active and healthy.
    Test {
        disk_image: PathBuf,
        /// Kernel for direct kernel boot [default: vmlinuz beside the image].
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd [default: initrd.img beside the image].
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Board profile the image was built for.
        #[arg(long, default_value = "qemu-x86_64")]
        board: String,
        /// Fail when the healthy marker has not appeared after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_sec: u64,
        /// Virtual CPUs (TCG runs one host thread per CPU).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Serial console log [default: boot-console.log beside the image].
        #[arg(long)]
        console_log: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tributary: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn try_main(cli: Cli) -> Result<()> {
    let show_progress = !cli.quiet;
    match cli.command {
        Commands::Build { config, output, rootfs_cache, keep_work, cert, key, keyring } => {
            let image = ImageConfig::load(&config)?;
            let signing = match (cert, key, keyring) {
                (Some(certificate), Some(key), Some(keyring)) => {
                    Some(SigningPaths { certificate, key, keyring })
                }
                _ => None,
            };
            let options = BuildOptions { output, rootfs_cache, keep_work, show_progress, signing };
            let built =
                build::build(&image, &options).context("image build failed (see the logs directory)")?;
            println!("disk image:  {}", built.disk_image.display());
            println!("bundle:      {}", built.bundle.display());
            println!("keyring:     {}", built.keyring.display());
            println!("kernel:      {} (initrd {})", built.kernel.display(), built.initrd.display());
            println!("step times:");
            for (step, elapsed) in &built.timings {
                let note = if step.starts_with("mmdebstrap") && built.rootfs_from_cache {
                    " (from cache)"
                } else {
                    ""
                };
                println!("  {:>7.1} s  {step}{note}", elapsed.as_secs_f64());
            }
            Ok(())
        }
        Commands::Check { disk_image, bundle, keyring, config } => {
            let keyring = keyring
                .unwrap_or_else(|| bundle.parent().unwrap_or(std::path::Path::new(".")).join("keyring.pem"));
            let image = config.map(|config| ImageConfig::load(&config)).transpose()?;
            let expected = image.as_ref().map(|image| (image.partitions, image.board));
            let report = check::check(&disk_image, &bundle, &keyring, expected)?;
            for passed in &report.passed {
                println!("ok: {passed}");
            }
            report.into_result()?;
            println!("structural check passed");
            Ok(())
        }
        Commands::Test { disk_image, kernel, initrd, board, timeout_sec, cpus, console_log } => {
            let board = board::find(&board).with_context(|| {
                format!("unknown board profile {board:?} (expected one of: {})", board::names().join(", "))
            })?;
            let (default_kernel, default_initrd) = boot_test::default_boot_files(&disk_image);
            let console_log = console_log.unwrap_or_else(|| {
                disk_image.parent().unwrap_or(std::path::Path::new(".")).join("boot-console.log")
            });
            let options = BootTestOptions {
                kernel: kernel.unwrap_or(default_kernel),
                initrd: initrd.unwrap_or(default_initrd),
                disk_image,
                board,
                timeout: Duration::from_secs(timeout_sec),
                cpus,
                console_log,
                show_progress,
            };
            let result = boot_test::run(&options)?;
            println!(
                "boot test passed in {:.1} s: {}",
                result.elapsed.as_secs_f64(),
                result.marker_line.trim()
            );
            Ok(())
        }
    }
}
