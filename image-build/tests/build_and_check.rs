//! The real build (mmdebstrap, genimage, rauc) followed by the structural check, and, when
//! `TRIBUTARY_IMAGE_BOOT_TEST=1`, the qemu boot test.
//!
//! Needs root and the Debian packages named in `image_build::tools::BUILD_TOOLS`. Without them
//! the test fails with the list of packages when `CI` is set, and otherwise prints a skip
//! notice and passes. `TRIBUTARY_IMAGE_ROOTFS_CACHE=DIR` reuses the mmdebstrap tarball.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use image_build::boot_test::{self, BootTestOptions};
use image_build::build::{self, BuildOptions};
use image_build::check;
use image_build::config::ImageConfig;

/// Generous bound for the boot test under TCG on 2 shared cores (measured ≈ 60-120 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The appliance STAND-IN (examples/appliance_stand_in.rs), which `cargo test` builds beside
/// the test binaries: the real appliance daemon is being written in appliance/.
fn appliance_stand_in() -> PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_directory = test_binary.parent().and_then(|deps| deps.parent()).unwrap();
    profile_directory.join("examples").join("appliance_stand_in")
}

/// The real appliance daemon, when this test runs as part of `cargo test --workspace` (which
/// builds every workspace binary before running any test).
fn real_appliance() -> Option<PathBuf> {
    let test_binary = std::env::current_exe().unwrap();
    let profile_directory = test_binary.parent().and_then(|deps| deps.parent()).unwrap();
    Some(profile_directory.join("appliance")).filter(|path| path.is_file())
}

/// The real daemon's config inside the image: a local HTTP source and a small ring on the data
/// partition, no uplink (the boot test has no core), so "healthy" means its pipeline runs.
const REAL_APPLIANCE_CONFIG: &str = r#"# Boot-test configuration: local pipeline only.
data_dir = "/var/lib/tributary/appliance"
[ring]
capacity_bytes = 8388608
audit_reserved_bytes = 1048576
durability = "sync"
[sources.local]
input = { kind = "http", listen = "127.0.0.1:8081" }
"#;

#[test]
fn build_then_check_then_optionally_boot() {
    let directory = tempfile::Builder::new().prefix("image-build-test-").tempdir_in("/var/tmp").unwrap();
    let input = directory.path();
    let stand_in = appliance_stand_in();
    if real_appliance().is_none() && !stand_in.is_file() {
        let message = format!(
            "appliance stand-in {} not built (run `cargo test` without target filters, or \
             `cargo build --release -p tributary-image-build --examples`)",
            stand_in.display()
        );
        assert!(std::env::var_os("CI").is_none(), "{message}");
        println!("SKIPPED build_then_check_then_optionally_boot: {message}");
        return;
    }
    match real_appliance() {
        Some(real) => {
            println!("image carries the real appliance daemon {}", real.display());
            std::fs::copy(&real, input.join("appliance-stand-in")).unwrap();
            std::fs::write(input.join("appliance.toml"), REAL_APPLIANCE_CONFIG).unwrap();
        }
        None => {
            println!("image carries the appliance STAND-IN (the daemon binary was not built)");
            std::fs::copy(&stand_in, input.join("appliance-stand-in")).unwrap();
            std::fs::write(
                input.join("appliance.toml"),
                "# Test configuration for the appliance stand-in.\n",
            )
            .unwrap();
        }
    }
    std::fs::set_permissions(input.join("appliance-stand-in"), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    std::fs::write(input.join("claim.cert.pem"), "TEST CLAIM CERTIFICATE\n").unwrap();
    std::fs::write(input.join("claim.key.pem"), "TEST CLAIM KEY\n").unwrap();
    let toml = r#"
[image]
name = "tributary-test"
version = "0.0.1-test"
board = "qemu-x86_64"
architecture = "amd64"

[appliance]
binary = "appliance-stand-in"
config = "appliance.toml"
watchdog_sec = 20
health_settle_sec = 5

[identity]
files = ["claim.cert.pem", "claim.key.pem"]

[partitions]
slot_mib = 1024
data_mib = 32
"#;
    std::fs::write(input.join("image.toml"), toml).unwrap();
    let config = ImageConfig::load(&input.join("image.toml")).unwrap();

    // Missing tools or no root: fail under CI (naming the Debian packages), skip elsewhere.
    if let Err(problem) = build::check_environment(&config) {
        assert!(std::env::var_os("CI").is_none(), "image build cannot run under CI: {problem:#}");
        println!("SKIPPED build_then_check_then_optionally_boot: {problem:#}");
        return;
    }

    let options = BuildOptions {
        output: input.join("out"),
        rootfs_cache: std::env::var_os("TRIBUTARY_IMAGE_ROOTFS_CACHE").map(PathBuf::from),
        // Kept for `systemd-analyze verify` below; the temporary directory goes at the end.
        keep_work: true,
        show_progress: true,
        signing: None,
    };
    let built = build::build(&config, &options).unwrap_or_else(|error| panic!("build failed: {error:#}"));
    for (step, elapsed) in &built.timings {
        println!("step {step}: {:.1} s", elapsed.as_secs_f64());
    }

    verify_units(&input.join("out/work/rootfs"));

    // The build already ran the check; run it again from the outputs alone, as CI would.
    let report = check::check(
        &built.disk_image,
        &built.bundle,
        &built.keyring,
        Some((config.partitions, config.board)),
    )
    .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.passed.iter().any(|line| line.contains("signature")));

    // A bundle signed by another key must not verify against the image's keyring.
    let other = input.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let status = std::process::Command::new("openssl")
        .args(image_build::rauc::test_key_arguments(&other.join("cert.pem"), &other.join("key.pem")))
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let error =
        check::rauc_info(&built.bundle, &other.join("cert.pem")).err().expect("foreign keyring must fail");
    assert!(error.to_string().contains("could not verify"), "{error:#}");

    if std::env::var("TRIBUTARY_IMAGE_BOOT_TEST").as_deref() != Ok("1") {
        println!("boot test not run: set TRIBUTARY_IMAGE_BOOT_TEST=1 to boot the image under qemu");
        return;
    }
    let options = BootTestOptions {
        disk_image: built.disk_image.clone(),
        kernel: built.kernel.clone(),
        initrd: built.initrd.clone(),
        board: config.board,
        timeout: BOOT_TIMEOUT,
        cpus: 2,
        console_log: input.join("out/boot-console.log"),
        show_progress: false,
    };
    let result = boot_test::run(&options).unwrap_or_else(|error| panic!("{error:#}"));
    println!("boot test: {:.1} s: {}", result.elapsed.as_secs_f64(), result.marker_line);
    assert!(result.marker_line.contains("slot A marked good"));
}

/// `systemd-analyze verify` against the staged root filesystem, when the host has it: unit
/// file mistakes (a key in the wrong section, a missing ExecStart binary) only show up as
/// warnings in the journal at boot, so any output fails the test.
fn verify_units(rootfs: &std::path::Path) {
    if image_build::tools::find("systemd-analyze").is_none() {
        println!("systemd-analyze not found (Debian package systemd): unit files not verified");
        return;
    }
    let output = std::process::Command::new("systemd-analyze")
        .arg(format!("--root={}", rootfs.display()))
        .args([
            "verify",
            "tributary-appliance.service",
            "tributary-mark-good.service",
            "var-lib-tributary.mount",
        ])
        .output()
        .unwrap();
    let printed =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && printed.trim().is_empty(), "systemd-analyze verify: {printed}");
}
