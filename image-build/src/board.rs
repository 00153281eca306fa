//! Board profiles: what differs between boards (architecture, kernel package, serial console,
//! how qemu emulates it). Adding a board is adding one entry to `BOARDS`.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Amd64,
    Arm64,
}

impl Architecture {
    pub fn debian_name(self) -> &'static str {
        match self {
            Architecture::Amd64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }

    /// The Rust target that builds the appliance for this architecture.
    pub fn rust_target(self) -> &'static str {
        match self {
            Architecture::Amd64 => "x86_64-unknown-linux-gnu",
            Architecture::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }
}

impl FromStr for Architecture {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "amd64" => Ok(Architecture::Amd64),
            "arm64" => Ok(Architecture::Arm64),
            _ => Err(()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct BoardProfile {
    pub name: &'static str,
    pub architecture: Architecture,
    /// Debian package with the kernel (and, through initramfs-tools, the initrd).
    pub kernel_package: &'static str,
    /// Serial console device, as named on the kernel command line.
    pub console: &'static str,
    /// qemu binary and machine arguments for the boot test.
    pub qemu_binary: &'static str,
    pub qemu_machine_arguments: &'static [&'static str],
}

impl BoardProfile {
    /// RAUC `compatible`: a bundle installs only on systems with the same string.
    pub fn rauc_compatible(&self) -> String {
        format!("tributary-{}", self.name)
    }

    /// Kernel command line for direct kernel boot of `slot` ("A" or "B").
    pub fn kernel_command_line(&self, slot: &str) -> String {
        assert!(slot == "A" || slot == "B", "slot must be A or B, got {slot}");
        let label = if slot == "A" { crate::layout::SLOT_A_LABEL } else { crate::layout::SLOT_B_LABEL };
        // `rauc.slot=` tells RAUC which slot booted; `panic=-1` turns a kernel panic into a qemu
        // exit so a broken image fails the boot test at once instead of at its timeout.
        format!(
            "console={} root=PARTLABEL={label} rw rootwait rauc.slot={slot} panic=-1 quiet \
             systemd.show_status=1",
            self.console
        )
    }
}

pub static BOARDS: &[BoardProfile] = &[
    BoardProfile {
        name: "qemu-x86_64",
        architecture: Architecture::Amd64,
        kernel_package: "linux-image-amd64",
        console: "ttyS0",
        qemu_binary: "qemu-system-x86_64",
        qemu_machine_arguments: &["-machine", "q35", "-accel", "tcg", "-cpu", "max"],
    },
    BoardProfile {
        name: "qemu-aarch64",
        architecture: Architecture::Arm64,
        kernel_package: "linux-image-arm64",
        console: "ttyAMA0",
        qemu_binary: "qemu-system-aarch64",
        qemu_machine_arguments: &["-machine", "virt", "-accel", "tcg", "-cpu", "max"],
    },
];

pub fn find(name: &str) -> Option<&'static BoardProfile> {
    BOARDS.iter().find(|board| board.name == name)
}

pub fn names() -> Vec<&'static str> {
    BOARDS.iter().map(|board| board.name).collect()
}
