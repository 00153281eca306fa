//! `image-build build`: TOML in; disk image, RAUC bundle, kernel and initrd out.
//!
//! Output directory layout:
//! - `NAME.img`: GPT disk image (see `layout.rs`)
//! - `NAME-VERSION.raucb`: signed RAUC bundle of the same rootfs.ext4 as slot A
//! - `keyring.pem`: the keyring the image trusts (`check` verifies the bundle against it)
//! - `test-keys/`: generated test signing key and certificate, only without `[signing]`
//! - `vmlinuz`, `initrd.img`: the image's kernel and initrd, for direct kernel boot in `test`
//! - `logs/`: output of each external tool
//! - `work/`: intermediate files, removed after a successful build unless `--keep-work`

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::config::{ImageConfig, SigningPaths};
use crate::step::{Steps, log_path, run_logged};
use crate::{check, layout, rauc, rootfs, tools};

/// Bundle compression. Measured on a 1 GiB slot (≈630 MiB used) on 2 loaded cores: the
/// mksquashfs default (gzip level 9) took 553 s, zstd level 3 took 20 s for the same bundle
/// size (≈200 MiB); the Debian kernel reads zstd squashfs (CONFIG_SQUASHFS_ZSTD=y).
pub const BUNDLE_MKSQUASHFS_ARGUMENTS: &str = "-comp zstd -Xcompression-level 3";

pub struct BuildOptions {
    pub output: PathBuf,
    /// Directory of cached mmdebstrap tarballs, keyed by a hash of the mmdebstrap arguments.
    pub rootfs_cache: Option<PathBuf>,
    pub keep_work: bool,
    pub show_progress: bool,
    /// Production signing key paths; override `[signing]` of the TOML.
    pub signing: Option<SigningPaths>,
}

pub struct BuildOutput {
    pub disk_image: PathBuf,
    pub bundle: PathBuf,
    pub keyring: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub timings: Vec<(String, Duration)>,
    pub rootfs_from_cache: bool,
}

pub fn required_tools(config: &ImageConfig) -> Vec<tools::Tool> {
    let mut required = tools::BUILD_TOOLS.to_vec();
    let host_is_target = match config.board.architecture {
        crate::board::Architecture::Amd64 => std::env::consts::ARCH == "x86_64",
        crate::board::Architecture::Arm64 => std::env::consts::ARCH == "aarch64",
    };
    if !host_is_target && config.board.architecture == crate::board::Architecture::Arm64 {
        required.push(tools::QEMU_AARCH64_STATIC);
    }
    required
}

pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// Fails, before any step runs, when a tool is missing (naming its Debian package) or when not
/// running as root.
pub fn check_environment(config: &ImageConfig) -> Result<()> {
    tools::require(&required_tools(config))?;
    if !running_as_root() {
        bail!(
            "image-build build must run as root: the root filesystem is unpacked with its owners and \
             genimage copies them into ext4 (run it with sudo, or in the CI container as root)"
        );
    }
    Ok(())
}

pub fn build(config: &ImageConfig, options: &BuildOptions) -> Result<BuildOutput> {
    check_environment(config)?;
    let output = &options.output;
    let work = output.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("failed to clear {}", work.display()))?;
    }
    // Logs are per build: a log left from an earlier build would mislead.
    let logs = output.join("logs");
    if logs.exists() {
        fs::remove_dir_all(&logs).with_context(|| format!("failed to clear {}", logs.display()))?;
    }
    fs::create_dir_all(&logs).with_context(|| format!("failed to create {}", output.display()))?;
    fs::create_dir_all(&work).with_context(|| format!("failed to create {}", work.display()))?;

    let mut steps = Steps::new(6, options.show_progress);
    let signing = options.signing.clone().or_else(|| config.signing.clone());
    let keys = steps.run("signing keys", |_| signing_keys(signing, output))?;
    let keyring = output.join("keyring.pem");
    fs::copy(&keys.keyring, &keyring)
        .with_context(|| format!("failed to copy keyring to {}", keyring.display()))?;

    let rootfs_tar = work.join("rootfs.tar");
    let rootfs_from_cache = steps.run("mmdebstrap: root filesystem", |bar| {
        make_rootfs_tar(
            config,
            options.rootfs_cache.as_deref(),
            &rootfs_tar,
            &log_path(output, "mmdebstrap"),
            bar,
        )
    })?;

    let rootfs_directory = work.join("rootfs");
    let data_directory = work.join("data");
    let (kernel, initrd) = steps.run("unpack and stage root filesystem", |_| {
        fs::create_dir_all(&rootfs_directory)?;
        run_logged(
            "tar",
            &[
                "--extract".into(),
                "--preserve-permissions".into(),
                "--numeric-owner".into(),
                "--xattrs".into(),
                "--xattrs-include=*".into(),
                format!("--file={}", rootfs_tar.display()),
                format!("--directory={}", rootfs_directory.display()),
            ],
            &log_path(output, "tar"),
            None,
        )?;
        rootfs::stage_rootfs(&rootfs_directory, config, &keys.keyring)
            .with_context(|| format!("failed to stage {}", rootfs_directory.display()))?;
        rootfs::stage_data(&data_directory, config)
            .with_context(|| format!("failed to stage {}", data_directory.display()))?;
        let (kernel, initrd) = rootfs::find_kernel(&rootfs_directory)?;
        let kernel_out = output.join("vmlinuz");
        let initrd_out = output.join("initrd.img");
        fs::copy(&kernel, &kernel_out).with_context(|| format!("failed to copy {}", kernel.display()))?;
        fs::copy(&initrd, &initrd_out).with_context(|| format!("failed to copy {}", initrd.display()))?;
        Ok((kernel_out, initrd_out))
    })?;

    let disk_image_name = format!("{}.img", config.name);
    let genimage_output = work.join("genimage-out");
    steps.run("genimage: disk image", |_| {
        let empty_root = work.join("genimage-root");
        fs::create_dir_all(&empty_root)?;
        fs::create_dir_all(&genimage_output)?;
        let genimage_config = work.join("genimage.cfg");
        fs::write(
            &genimage_config,
            layout::genimage_config(
                &disk_image_name,
                config.partitions,
                &rootfs_directory.display().to_string(),
                &data_directory.display().to_string(),
            ),
        )?;
        run_logged(
            "genimage",
            &[
                format!("--config={}", genimage_config.display()),
                format!("--rootpath={}", empty_root.display()),
                format!("--tmppath={}", work.join("genimage-tmp").display()),
                format!("--inputpath={}", genimage_output.display()),
                format!("--outputpath={}", genimage_output.display()),
            ],
            &log_path(output, "genimage"),
            None,
        )
    })?;
    let disk_image = output.join(&disk_image_name);
    fs::rename(genimage_output.join(&disk_image_name), &disk_image)
        .with_context(|| format!("failed to move the disk image to {}", disk_image.display()))?;

    let bundle = output.join(format!("{}-{}.raucb", config.name, config.version));
    steps.run("rauc: signed bundle", |_| {
        let bundle_directory = work.join("bundle");
        fs::create_dir_all(&bundle_directory)?;
        // A hard link: the bundle carries the very bytes that are slot A of the disk image.
        fs::hard_link(
            genimage_output.join(layout::ROOTFS_IMAGE),
            bundle_directory.join(layout::ROOTFS_IMAGE),
        )?;
        fs::write(
            bundle_directory.join("manifest.raucm"),
            rauc::manifest(config.board, &config.version, &build_id()),
        )?;
        if bundle.exists() {
            fs::remove_file(&bundle)?;
        }
        run_logged(
            "rauc",
            &[
                "bundle".into(),
                format!("--cert={}", keys.certificate.display()),
                format!("--key={}", keys.key.display()),
                format!("--keyring={}", keys.keyring.display()),
                format!("--mksquashfs-args={BUNDLE_MKSQUASHFS_ARGUMENTS}"),
                bundle_directory.display().to_string(),
                bundle.display().to_string(),
            ],
            &log_path(output, "rauc-bundle"),
            None,
        )
    })?;

    steps.run("structural check", |_| {
        let report = check::check(&disk_image, &bundle, &keyring, Some((config.partitions, config.board)))?;
        report.into_result()
    })?;

    if !options.keep_work {
        fs::remove_dir_all(&work).with_context(|| format!("failed to remove {}", work.display()))?;
    }
    Ok(BuildOutput { disk_image, bundle, keyring, kernel, initrd, timings: steps.timings, rootfs_from_cache })
}

struct Keys {
    certificate: PathBuf,
    key: PathBuf,
    keyring: PathBuf,
}

fn signing_keys(signing: Option<SigningPaths>, output: &Path) -> Result<Keys> {
    if let Some(signing) = signing {
        return Ok(Keys { certificate: signing.certificate, key: signing.key, keyring: signing.keyring });
    }
    let directory = output.join("test-keys");
    let certificate = directory.join("test-signing.cert.pem");
    let key = directory.join("test-signing.key.pem");
    if !(certificate.is_file() && key.is_file()) {
        fs::create_dir_all(&directory)?;
        tracing::warn!("no [signing] keys given: generating TEST keys in {}", directory.display());
        run_logged(
            "openssl",
            &rauc::test_key_arguments(&certificate, &key),
            &log_path(output, "openssl"),
            None,
        )?;
        fs::write(
            directory.join("README"),
            "TEST signing key generated by image-build because no [signing] keys were given.\n\
             Images built with it trust only bundles signed with it. Never ship it.\n",
        )?;
    }
    // Self-signed: the certificate is its own keyring.
    Ok(Keys { certificate: certificate.clone(), key, keyring: certificate })
}

fn make_rootfs_tar(
    config: &ImageConfig,
    cache: Option<&Path>,
    rootfs_tar: &Path,
    log: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<bool> {
    // The cache key covers the arguments without the output path, so a change of suite, board
    // or package list makes a new tarball.
    let placeholder = Path::new("OUTPUT");
    let key_arguments = rootfs::mmdebstrap_arguments(config, placeholder);
    let key = hex(&Sha256::digest(key_arguments.join("\n").as_bytes()))[..16].to_string();
    if let Some(cache) = cache {
        let cached = cache.join(format!("rootfs-{key}.tar"));
        if cached.is_file() {
            bar.set_message(format!("mmdebstrap: root filesystem (cached {})", cached.display()));
            fs::copy(&cached, rootfs_tar).with_context(|| format!("failed to copy {}", cached.display()))?;
            return Ok(true);
        }
    }
    run_logged("mmdebstrap", &rootfs::mmdebstrap_arguments(config, rootfs_tar), log, None)?;
    if let Some(cache) = cache {
        fs::create_dir_all(cache)?;
        let partial = cache.join(format!(".rootfs-{key}.tar.partial"));
        fs::copy(rootfs_tar, &partial)?;
        fs::rename(&partial, cache.join(format!("rootfs-{key}.tar")))?;
    }
    Ok(false)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `SOURCE_DATE_EPOCH` when set (reproducible builds), else the current time in seconds.
fn build_id() -> String {
    std::env::var("SOURCE_DATE_EPOCH").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0)
            .to_string()
    })
}
