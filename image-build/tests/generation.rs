//! Generated configuration (genimage, RAUC, mmdebstrap, the staged rootfs) and the readers
//! `check` and `test` use (GPT, console markers), without running external tools.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use image_build::board;
use image_build::boot_test::{ConsoleEvent, classify};
use image_build::check::{CheckReport, check_layout};
use image_build::config::{ImageConfig, Partitions};
use image_build::gpt::{self, Partition};
use image_build::{layout, rauc, rootfs, tools};

fn fixture_config(directory: &Path, extra: &str) -> ImageConfig {
    let write = |name: &str, content: &str, mode: u32| {
        let path = directory.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("appliance", "#!/bin/sh\n# STAND-IN for the appliance binary.\nexit 0\n", 0o755);
    write("appliance.toml", "[uplink]\n", 0o644);
    write("claim.pem", "TEST CLAIM", 0o644);
    let text = format!(
        "[image]\nname = \"t\"\nversion = \"1.2.3\"\nboard = \"qemu-x86_64\"\narchitecture = \"amd64\"\n\
         [appliance]\nbinary = \"appliance\"\nconfig = \"appliance.toml\"\nwatchdog_sec = 17\n{extra}\n\
         [identity]\nfiles = [\"claim.pem\"]\n[packages]\nextra = [\"ca-certificates\", \"udev\"]\n\
         [partitions]\nslot_mib = 700\ndata_mib = 48\n"
    );
    ImageConfig::parse(&text, &directory.join("image.toml")).unwrap()
}

#[test]
fn genimage_config_has_three_gpt_partitions_in_order_with_sizes() {
    let text = layout::genimage_config(
        "disk.img",
        Partitions { slot_mib: 700, data_mib: 48 },
        "/w/rootfs",
        "/w/data",
    );
    assert!(text.contains("partition-table-type = \"gpt\""));
    let a = text.find("partition rootfs-a {").unwrap();
    let b = text.find("partition rootfs-b {").unwrap();
    let data = text.find("partition data {").unwrap();
    assert!(a < b && b < data);
    assert_eq!(text.matches("size = 700M").count(), 3, "rootfs.ext4, slot A and slot B");
    assert_eq!(text.matches("size = 48M").count(), 2, "data.ext4 and the data partition");
    assert!(text.contains("srcpath = \"/w/rootfs\"") && text.contains("srcpath = \"/w/data\""));
    // Slot B has no image: it stays empty until the first update.
    let slot_b = &text[b..data];
    assert!(!slot_b.contains("image ="));
    assert!(text[a..b].contains("image = \"rootfs.ext4\""));
}

#[test]
fn rauc_system_conf_declares_two_slots_and_keyring() {
    let board = board::find("qemu-x86_64").unwrap();
    let text = rauc::system_conf(board);
    assert!(text.contains("compatible=tributary-qemu-x86_64"));
    assert!(text.contains("[slot.rootfs.0]\ndevice=/dev/disk/by-partlabel/rootfs-a\ntype=ext4\nbootname=A"));
    assert!(text.contains("[slot.rootfs.1]\ndevice=/dev/disk/by-partlabel/rootfs-b\ntype=ext4\nbootname=B"));
    assert!(text.contains("path=/etc/rauc/keyring.pem"));
    assert!(text.contains("data-directory=/var/lib/tributary/rauc"));
    assert!(text.contains("bootloader-custom-backend=/usr/lib/tributary/rauc-boot-state"));
}

#[test]
fn rauc_manifest_names_the_rootfs_image() {
    let board = board::find("qemu-x86_64").unwrap();
    let text = rauc::manifest(board, "1.2.3", "42");
    assert!(text.contains("compatible=tributary-qemu-x86_64\nversion=1.2.3\nbuild=42"));
    assert!(text.contains("[bundle]\nformat=verity"));
    assert!(text.contains("[image.rootfs]\nfilename=rootfs.ext4"));
}

#[test]
fn mmdebstrap_arguments_include_base_kernel_and_extra_packages_once() {
    let directory = tempfile::tempdir().unwrap();
    let config = fixture_config(directory.path(), "");
    let arguments = rootfs::mmdebstrap_arguments(&config, Path::new("/out/rootfs.tar"));
    assert_eq!(arguments[0], "--variant=minbase");
    assert!(arguments.contains(&"--architectures=amd64".to_string()));
    let include = arguments.iter().find(|argument| argument.starts_with("--include=")).unwrap();
    assert_eq!(
        include,
        "--include=systemd-sysv,udev,rauc,rauc-service,e2fsprogs,linux-image-amd64,ca-certificates"
    );
    assert_eq!(&arguments[arguments.len() - 2..], ["bookworm", "/out/rootfs.tar"]);
}

#[test]
fn staging_installs_appliance_units_and_rauc_config() {
    let directory = tempfile::tempdir().unwrap();
    let config =
        fixture_config(directory.path(), "health_check_command = [\"/usr/bin/appliance\", \"it's ok\"]");
    let root = directory.path().join("rootfs");
    std::fs::create_dir_all(root.join("usr")).unwrap();
    let keyring = directory.path().join("keyring.pem");
    std::fs::write(&keyring, "KEYRING").unwrap();
    rootfs::stage_rootfs(&root, &config, &keyring).unwrap();

    let mode = |path: &str| std::fs::metadata(root.join(path)).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        std::fs::read(root.join("usr/bin/appliance")).unwrap(),
        std::fs::read(&config.appliance.binary).unwrap()
    );
    assert_eq!(mode("usr/bin/appliance"), 0o755);
    assert_eq!(std::fs::read_to_string(root.join("etc/tributary/appliance.toml")).unwrap(), "[uplink]\n");
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/tributary-appliance.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "RequiresMountsFor=/var/lib/tributary",
        "ExecStart=/usr/bin/appliance --config /etc/tributary/appliance.toml",
    ] {
        assert!(unit.lines().any(|unit_line| unit_line == line), "{line} missing");
    }
    let drop_in = std::fs::read_to_string(
        root.join("etc/systemd/system/tributary-appliance.service.d/image-build.conf"),
    )
    .unwrap();
    assert!(drop_in.contains("WatchdogSec=17s"));
    let mark_good =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/tributary-mark-good.service")).unwrap();
    assert!(mark_good.contains("Wants=tributary-appliance.service"));
    assert!(mark_good.contains("After=tributary-appliance.service"));
    for (link, target) in [
        (
            "etc/systemd/system/multi-user.target.wants/tributary-appliance.service",
            "/usr/lib/systemd/system/tributary-appliance.service",
        ),
        (
            "etc/systemd/system/multi-user.target.wants/tributary-mark-good.service",
            "/usr/lib/systemd/system/tributary-mark-good.service",
        ),
        (
            "etc/systemd/system/local-fs.target.wants/var-lib-tributary.mount",
            "/usr/lib/systemd/system/var-lib-tributary.mount",
        ),
    ] {
        assert_eq!(std::fs::read_link(root.join(link)).unwrap(), Path::new(target));
    }
    assert_eq!(mode("usr/lib/tributary/mark-good"), 0o755);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/tributary/mark-good.env")).unwrap(),
        "TRIBUTARY_HEALTH_SETTLE_SEC=10\nTRIBUTARY_HEALTH_WAIT_SEC=120\n"
    );
    assert_eq!(mode("usr/lib/tributary/rauc-boot-state"), 0o755);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/tributary/health-check")).unwrap().lines().last().unwrap(),
        r"exec '/usr/bin/appliance' 'it'\''s ok'"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/rauc/system.conf")).unwrap(),
        rauc::system_conf(config.board)
    );
    assert_eq!(std::fs::read_to_string(root.join("etc/rauc/keyring.pem")).unwrap(), "KEYRING");
    assert!(root.join("var/lib/tributary").is_dir());

    let data = directory.path().join("data");
    rootfs::stage_data(&data, &config).unwrap();
    assert_eq!(std::fs::read_to_string(data.join("identity/claim.pem")).unwrap(), "TEST CLAIM");
    assert_eq!(
        std::fs::metadata(data.join("identity/claim.pem")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(data.join("ring").is_dir());
}

/// Writes a GPT with `partitions` (name, first LBA, last LBA) into a sparse file.
fn write_gpt(path: &Path, partitions: &[(&str, u64, u64)], corrupt_header: bool) {
    let entry_count = 128u32;
    let mut entries = vec![0u8; entry_count as usize * 128];
    let linux =
        [0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4];
    for (index, (name, first, last)) in partitions.iter().enumerate() {
        let entry = &mut entries[index * 128..(index + 1) * 128];
        entry[0..16].copy_from_slice(&linux);
        entry[16] = index as u8 + 1;
        entry[32..40].copy_from_slice(&first.to_le_bytes());
        entry[40..48].copy_from_slice(&last.to_le_bytes());
        for (unit_index, unit) in name.encode_utf16().enumerate() {
            entry[56 + unit_index * 2..58 + unit_index * 2].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let mut header = vec![0u8; 92];
    header[0..8].copy_from_slice(b"EFI PART");
    header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    header[12..16].copy_from_slice(&92u32.to_le_bytes());
    header[72..80].copy_from_slice(&2u64.to_le_bytes());
    header[80..84].copy_from_slice(&entry_count.to_le_bytes());
    header[84..88].copy_from_slice(&128u32.to_le_bytes());
    header[88..92].copy_from_slice(&gpt::crc32(&entries).to_le_bytes());
    let crc = gpt::crc32(&header) ^ u32::from(corrupt_header);
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    let last_lba = partitions.iter().map(|partition| partition.2).max().unwrap_or(34);
    let mut image = vec![0u8; 512 * 34];
    image[512..512 + 92].copy_from_slice(&header);
    image[1024..1024 + entries.len()].copy_from_slice(&entries);
    std::fs::write(path, &image).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len((last_lba + 34) * 512).unwrap();
}

#[test]
fn crc32_matches_the_ieee_check_value() {
    assert_eq!(gpt::crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn gpt_reader_returns_names_sizes_and_types() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("disk.img");
    write_gpt(&path, &[("rootfs-a", 2048, 4095), ("rootfs-b", 4096, 6143), ("data", 6144, 7167)], false);
    let partitions = gpt::read_partitions(&path).unwrap();
    let names: Vec<&str> = partitions.iter().map(|partition| partition.name.as_str()).collect();
    assert_eq!(names, ["rootfs-a", "rootfs-b", "data"]);
    assert_eq!(partitions[0].size_bytes(), 1024 * 1024);
    assert_eq!(partitions[2].size_bytes(), 512 * 1024);
    assert_eq!(partitions[0].type_guid, layout::LINUX_FILESYSTEM_TYPE_UUID);
}

#[test]
fn gpt_reader_rejects_a_bad_checksum_and_a_missing_header() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("disk.img");
    write_gpt(&path, &[("rootfs-a", 2048, 4095)], true);
    let error = gpt::read_partitions(&path).unwrap_err().to_string();
    assert!(error.contains("header checksum mismatch"), "{error}");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let error = gpt::read_partitions(&path).unwrap_err().to_string();
    assert!(error.contains("no GPT header"), "{error}");
}

fn partition(name: &str, first_lba: u64, mib: u64) -> Partition {
    Partition {
        number: 0,
        name: name.into(),
        type_guid: layout::LINUX_FILESYSTEM_TYPE_UUID.into(),
        first_lba,
        last_lba: first_lba + mib * 2048 - 1,
    }
}

/// `expected_problem`: a fragment of the one problem expected, or None for a clean layout.
fn check_layout_case(partitions: &[Partition], expected: Option<Partitions>, expected_problem: Option<&str>) {
    let mut report = CheckReport::default();
    check_layout(partitions, expected, &mut report);
    match expected_problem {
        None => assert!(report.problems.is_empty(), "{:?}", report.problems),
        Some(fragment) => assert!(
            report.problems.iter().any(|problem| problem.contains(fragment)),
            "{fragment:?} not in {:?}",
            report.problems
        ),
    }
}

#[test]
fn layout_check_finds_missing_partitions_wrong_sizes_and_overlap() {
    let sizes = Some(Partitions { slot_mib: 2, data_mib: 1 });
    let good = [partition("rootfs-a", 2048, 2), partition("rootfs-b", 6144, 2), partition("data", 10240, 1)];
    check_layout_case(&good, sizes, None);
    check_layout_case(&good, None, None);
    check_layout_case(&good[..2], sizes, Some("expected partitions"));
    check_layout_case(&[good[1].clone(), good[0].clone(), good[2].clone()], sizes, Some("in that order"));
    check_layout_case(
        &good,
        Some(Partitions { slot_mib: 3, data_mib: 1 }),
        Some("rootfs-a is 2097152 bytes, expected 3 MiB"),
    );
    check_layout_case(
        &[partition("rootfs-a", 2048, 2), partition("rootfs-b", 6144, 3), partition("data", 12288, 1)],
        None,
        Some("slot A is 2097152 bytes but slot B is 3145728 bytes"),
    );
    check_layout_case(
        &[partition("rootfs-a", 2048, 2), partition("rootfs-b", 4096, 2), partition("data", 10240, 1)],
        None,
        Some("overlap"),
    );
}

#[test]
fn console_markers_are_classified() {
    for (line, expected) in [
        (
            "TRIBUTARY-BOOT-OK: tributary-appliance.service active and healthy for 5s, slot A marked good",
            ConsoleEvent::Healthy,
        ),
        (
            "[   12.3] mark-good[301]: TRIBUTARY-BOOT-FAIL: tributary-appliance.service is failed, not active",
            ConsoleEvent::Failed,
        ),
        // Not final: Restart=on-failure may bring it up; mark-good decides within its bound.
        (
            "[FAILED] Failed to start tributary-appliance.service - Tributary appliance (edge daemon).",
            ConsoleEvent::Other,
        ),
        ("[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs", ConsoleEvent::Failed),
        (
            "[  OK  ] Started tributary-appliance.service - Tributary appliance (edge daemon).",
            ConsoleEvent::Other,
        ),
        ("[FAILED] Failed to start systemd-timesyncd.service", ConsoleEvent::Other),
    ] {
        assert_eq!(classify(line), expected, "{line}");
    }
}

#[test]
fn kernel_command_line_selects_the_slot() {
    let board = board::find("qemu-x86_64").unwrap();
    let line = board.kernel_command_line("B");
    assert!(
        line.contains("root=PARTLABEL=rootfs-b")
            && line.contains("rauc.slot=B")
            && line.contains("console=ttyS0")
    );
}

#[test]
fn missing_tools_are_named_with_their_debian_packages() {
    let missing =
        tools::Tool { command: "tributary-no-such-tool", debian_package: "tributary-no-such-package" };
    let error =
        tools::require(&[missing, tools::Tool { command: "sh", debian_package: "dash" }]).unwrap_err();
    assert_eq!(error.missing, [missing]);
    let message = error.to_string();
    assert!(
        message.contains("tributary-no-such-tool (Debian package tributary-no-such-package)"),
        "{message}"
    );
    assert!(message.contains("apt-get install tributary-no-such-package"), "{message}");
    assert!(!message.contains("dash"), "{message}");
}
