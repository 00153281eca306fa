//! `image-build test`: boots a disk image under qemu (TCG: no KVM here) with direct kernel
//! boot and watches the serial console for the marker lines of tributary-mark-good.service.
//!
//! Passes on `TRIBUTARY-BOOT-OK`; fails at once on `TRIBUTARY-BOOT-FAIL`, on a kernel panic or
//! on qemu exiting, and fails after `timeout` otherwise. The image file is never written:
//! qemu runs with `-snapshot`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::board::BoardProfile;
use crate::tools;

pub const OK_MARKER: &str = "TRIBUTARY-BOOT-OK";
pub const FAIL_MARKER: &str = "TRIBUTARY-BOOT-FAIL";
/// Memory for the guest: enough for systemd, RAUC and a small appliance.
pub const GUEST_MEMORY_MIB: u32 = 512;

pub struct BootTestOptions {
    pub disk_image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub board: &'static BoardProfile,
    pub timeout: Duration,
    pub cpus: u32,
    pub console_log: PathBuf,
    pub show_progress: bool,
}

pub struct BootTestResult {
    pub marker_line: String,
    pub elapsed: Duration,
}

/// What a console line means for the test.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    Healthy,
    Failed,
    Other,
}

pub fn classify(line: &str) -> ConsoleEvent {
    if line.contains(OK_MARKER) {
        ConsoleEvent::Healthy
    } else if line.contains(FAIL_MARKER) || line.contains("Kernel panic") {
        // A failed start of the appliance is not final (Restart=on-failure); the mark-good
        // script decides, within its own bound, and prints the FAIL marker.
        ConsoleEvent::Failed
    } else {
        ConsoleEvent::Other
    }
}

pub fn qemu_tool(board: &BoardProfile) -> tools::Tool {
    match board.qemu_binary {
        "qemu-system-aarch64" => tools::QEMU_AARCH64,
        _ => tools::QEMU_X86_64,
    }
}

pub fn qemu_arguments(options: &BootTestOptions) -> Vec<String> {
    let mut arguments: Vec<String> =
        options.board.qemu_machine_arguments.iter().map(|argument| argument.to_string()).collect();
    arguments.extend([
        "-m".to_string(),
        GUEST_MEMORY_MIB.to_string(),
        "-smp".to_string(),
        options.cpus.to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-monitor".to_string(),
        "none".to_string(),
        "-serial".to_string(),
        "stdio".to_string(),
        "-nic".to_string(),
        "none".to_string(),
        "-no-reboot".to_string(),
        "-snapshot".to_string(),
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", options.disk_image.display()),
        "-kernel".to_string(),
        options.kernel.display().to_string(),
        "-initrd".to_string(),
        options.initrd.display().to_string(),
        "-append".to_string(),
        options.board.kernel_command_line("A"),
    ]);
    arguments
}

pub fn run(options: &BootTestOptions) -> Result<BootTestResult> {
    let tool = qemu_tool(options.board);
    tools::require(&[tool])?;
    for (what, path) in
        [("disk image", &options.disk_image), ("kernel", &options.kernel), ("initrd", &options.initrd)]
    {
        if !path.is_file() {
            bail!(
                "{what} {} does not exist (build the image first, or pass --{})",
                path.display(),
                what.split(' ').next_back().unwrap_or(what)
            );
        }
    }
    if let Some(parent) = options.console_log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut console_log = File::create(&options.console_log)
        .with_context(|| format!("failed to create {}", options.console_log.display()))?;
    let mut child = Command::new(tool.command)
        .args(qemu_arguments(options))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", tool.command))?;
    let (sender, receiver) = mpsc::channel::<Option<String>>();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr_sender = sender.clone();
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if sender.send(Some(String::from_utf8_lossy(&line).trim_end().to_string())).is_err() {
                return;
            }
        }
        let _ = sender.send(None);
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if stderr_sender.send(Some(format!("qemu: {line}"))).is_err() {
                return;
            }
        }
    });

    let bar = if options.show_progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let outcome = loop {
        let remaining = options.timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            break Err(format!("no {OK_MARKER} line within {} s", options.timeout.as_secs()));
        }
        match receiver.recv_timeout(remaining) {
            Ok(Some(line)) => {
                writeln!(console_log, "{line}")?;
                let shown: String = line.chars().filter(|c| !c.is_control()).take(100).collect();
                bar.set_message(format!("boot test [{:.0} s]: {shown}", started.elapsed().as_secs_f64()));
                match classify(&line) {
                    ConsoleEvent::Healthy => break Ok(line),
                    ConsoleEvent::Failed => break Err(format!("console reported a failure: {line}")),
                    ConsoleEvent::Other => {}
                }
            }
            Ok(None) => break Err("qemu exited before the appliance was reported healthy".to_string()),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err("qemu's console closed".to_string()),
        }
    };
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    bar.finish_and_clear();
    match outcome {
        Ok(marker_line) => Ok(BootTestResult { marker_line, elapsed }),
        Err(reason) => bail!(
            "boot test failed after {:.0} s: {reason}; console log {} ends with:\n{}",
            elapsed.as_secs_f64(),
            options.console_log.display(),
            crate::step::log_tail(&options.console_log, 30)
        ),
    }
}

/// The kernel and initrd `build` writes beside the disk image.
pub fn default_boot_files(disk_image: &Path) -> (PathBuf, PathBuf) {
    let directory = disk_image.parent().unwrap_or(Path::new("."));
    (directory.join("vmlinuz"), directory.join("initrd.img"))
}
