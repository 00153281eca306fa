//! `image-build check`: the structural check CI runs when a boot test does not fit its budget.
//! Disk image: a valid GPT (checksums verified in Rust), `rootfs-a`, `rootfs-b` and `data`
//! present in that order, A and B of equal size, sizes as configured, ext4 in slot A and data.
//! Bundle: signature verified against the keyring with `rauc info --keyring`, compatible as
//! expected for the board.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::board::BoardProfile;
use crate::config::Partitions;
use crate::gpt::{self, Partition};
use crate::layout::{DATA_LABEL, SLOT_A_LABEL, SLOT_B_LABEL};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Default)]
pub struct CheckReport {
    pub passed: Vec<String>,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn into_result(self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            bail!("structural check failed:\n  - {}", self.problems.join("\n  - "))
        }
    }

    fn expect(&mut self, ok: bool, passed: String, problem: String) {
        if ok { self.passed.push(passed) } else { self.problems.push(problem) }
    }
}

/// Checks a partition list against the layout; `expected` sizes are checked when given.
pub fn check_layout(partitions: &[Partition], expected: Option<Partitions>, report: &mut CheckReport) {
    let find = |label: &str| partitions.iter().find(|partition| partition.name == label);
    let labels: Vec<&str> = partitions.iter().map(|partition| partition.name.as_str()).collect();
    report.expect(
        labels == [SLOT_A_LABEL, SLOT_B_LABEL, DATA_LABEL],
        format!("partitions {labels:?}"),
        format!("expected partitions [{SLOT_A_LABEL:?}, {SLOT_B_LABEL:?}, {DATA_LABEL:?}] in that order, found {labels:?}"),
    );
    let (Some(slot_a), Some(slot_b), Some(data)) = (find(SLOT_A_LABEL), find(SLOT_B_LABEL), find(DATA_LABEL))
    else {
        return;
    };
    report.expect(
        slot_a.size_bytes() == slot_b.size_bytes(),
        format!("slots A and B both {} MiB", slot_a.size_bytes() / MIB),
        format!("slot A is {} bytes but slot B is {} bytes", slot_a.size_bytes(), slot_b.size_bytes()),
    );
    let mut sorted: Vec<&Partition> = partitions.iter().collect();
    sorted.sort_by_key(|partition| partition.first_lba);
    let overlapping = sorted.windows(2).any(|pair| pair[0].last_lba >= pair[1].first_lba);
    report.expect(!overlapping, "no partitions overlap".into(), format!("partitions overlap: {sorted:?}"));
    if let Some(expected) = expected {
        for (partition, mib) in
            [(slot_a, expected.slot_mib), (slot_b, expected.slot_mib), (data, expected.data_mib)]
        {
            report.expect(
                partition.size_bytes() == mib * MIB,
                format!("{} is {mib} MiB", partition.name),
                format!(
                    "{} is {} bytes, expected {mib} MiB ({} bytes)",
                    partition.name,
                    partition.size_bytes(),
                    mib * MIB
                ),
            );
        }
    }
}

pub fn check(
    disk_image: &Path,
    bundle: &Path,
    keyring: &Path,
    expected: Option<(Partitions, &BoardProfile)>,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let partitions = gpt::read_partitions(disk_image)?;
    report.passed.push(format!("GPT header and entry checksums of {}", disk_image.display()));
    check_layout(&partitions, expected.map(|(partitions, _)| partitions), &mut report);
    let image_bytes = std::fs::metadata(disk_image)?.len();
    for partition in &partitions {
        report.expect(
            (partition.last_lba + 1) * gpt::SECTOR_BYTES <= image_bytes,
            format!("{} inside the image", partition.name),
            format!("{} ends past the end of the image ({image_bytes} bytes)", partition.name),
        );
        if partition.name == SLOT_A_LABEL || partition.name == DATA_LABEL {
            let ext4 = gpt::has_ext4_superblock(disk_image, partition.offset_bytes()).unwrap_or(false);
            report.expect(
                ext4,
                format!("{} holds an ext4 file system", partition.name),
                format!("{} holds no ext4 file system (no superblock magic)", partition.name),
            );
        }
    }

    let info = rauc_info(bundle, keyring)?;
    report.passed.push(format!(
        "bundle signature of {} verified with keyring {}",
        bundle.display(),
        keyring.display()
    ));
    if let Some((_, board)) = expected {
        let compatible = board.rauc_compatible();
        report.expect(
            info.compatible == compatible,
            format!("bundle compatible {compatible:?}"),
            format!("bundle compatible is {:?}, expected {compatible:?}", info.compatible),
        );
    }
    report.expect(
        info.slot_classes.iter().any(|class| class == "rootfs"),
        "bundle has an image for slot class rootfs".into(),
        format!("bundle has no image for slot class rootfs (has {:?})", info.slot_classes),
    );
    Ok(report)
}

pub struct BundleInfo {
    pub compatible: String,
    pub slot_classes: Vec<String>,
}

/// `rauc info --keyring` verifies the bundle's signature; it fails on a bad or untrusted one.
pub fn rauc_info(bundle: &Path, keyring: &Path) -> Result<BundleInfo> {
    crate::tools::require(crate::tools::CHECK_TOOLS)?;
    let output = Command::new("rauc")
        .arg(format!("--keyring={}", keyring.display()))
        .arg("--output-format=json")
        .arg("info")
        .arg(bundle)
        .output()
        .context("failed to start rauc")?;
    if !output.status.success() {
        bail!(
            "rauc info could not verify {} with keyring {} ({}): {}",
            bundle.display(),
            keyring.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    // rauc prints log lines before the JSON document; the document is the last line.
    let json_line = stdout.lines().rev().find(|line| line.trim_start().starts_with('{')).unwrap_or("");
    let value: serde_json::Value = serde_json::from_str(json_line)
        .with_context(|| format!("rauc info printed no JSON document: {stdout}"))?;
    let compatible = value["compatible"].as_str().unwrap_or_default().to_string();
    let slot_classes = value["images"]
        .as_array()
        .map(|images| {
            images
                .iter()
                .flat_map(|image| image.as_object().into_iter().flat_map(|object| object.keys().cloned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(BundleInfo { compatible, slot_classes })
}
