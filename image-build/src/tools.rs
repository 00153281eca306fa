//! External tools and the Debian packages that provide them. Every missing tool is reported at
//! once, before any step runs, so one `apt-get install` fixes them all.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub command: &'static str,
    pub debian_package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool { command: "mmdebstrap", debian_package: "mmdebstrap" };
pub const GENIMAGE: Tool = Tool { command: "genimage", debian_package: "genimage" };
pub const RAUC: Tool = Tool { command: "rauc", debian_package: "rauc" };
pub const OPENSSL: Tool = Tool { command: "openssl", debian_package: "openssl" };
pub const MKE2FS: Tool = Tool { command: "mke2fs", debian_package: "e2fsprogs" };
pub const MKSQUASHFS: Tool = Tool { command: "mksquashfs", debian_package: "squashfs-tools" };
pub const TAR: Tool = Tool { command: "tar", debian_package: "tar" };
pub const QEMU_X86_64: Tool = Tool { command: "qemu-system-x86_64", debian_package: "qemu-system-x86" };
pub const QEMU_AARCH64: Tool = Tool { command: "qemu-system-aarch64", debian_package: "qemu-system-arm" };
pub const QEMU_AARCH64_STATIC: Tool =
    Tool { command: "qemu-aarch64-static", debian_package: "qemu-user-static" };

/// Tools `image-build build` runs (plus the user-mode emulator for a foreign architecture).
pub const BUILD_TOOLS: &[Tool] = &[MMDEBSTRAP, GENIMAGE, RAUC, OPENSSL, MKE2FS, MKSQUASHFS, TAR];
/// Tools `image-build check` runs.
pub const CHECK_TOOLS: &[Tool] = &[RAUC];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("missing tools: {} (install with: apt-get install {})", list_commands(.missing), list_packages(.missing))]
pub struct MissingTools {
    pub missing: Vec<Tool>,
}

fn list_commands(tools: &[Tool]) -> String {
    tools
        .iter()
        .map(|tool| format!("{} (Debian package {})", tool.command, tool.debian_package))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_packages(tools: &[Tool]) -> String {
    let mut packages: Vec<&str> = tools.iter().map(|tool| tool.debian_package).collect();
    packages.sort_unstable();
    packages.dedup();
    packages.join(" ")
}

/// Finds `command` on `PATH`: the build and genimage run tools by name, so a tool outside
/// `PATH` counts as missing.
pub fn find(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|directory| directory.join(command))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// Ok when every tool is found; otherwise names each missing tool with its Debian package.
pub fn require(tools: &[Tool]) -> Result<(), MissingTools> {
    let missing: Vec<Tool> = tools.iter().copied().filter(|tool| find(tool.command).is_none()).collect();
    if missing.is_empty() { Ok(()) } else { Err(MissingTools { missing }) }
}
