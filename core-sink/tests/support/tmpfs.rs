//! A size-limited tmpfs for the tests of full storage (root only; CI runs as root), shared by the
//! dataset pipeline's and replication's tests.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;

/// A size-limited tmpfs mounted for the test (root only), unmounted when dropped.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status();
        if status.is_ok_and(|status| status.success()) {
            return Some(Tmpfs(path.to_path_buf()));
        }
        assert!(std::env::var_os("CI").is_none(), "CI runs as root and must be able to mount a tmpfs");
        eprintln!("SKIPPING a full-storage test: mounting a tmpfs needs root");
        None
    }
}

impl Tmpfs {
    /// Changes the size limit in place (what is stored stays).
    pub fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {} with size={size}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
