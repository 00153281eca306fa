//! image-build: turns an image TOML into a flashable GPT disk image with A/B root slots and a
//! data partition, plus a signed RAUC bundle of the same root filesystem, using Debian's tools
//! (mmdebstrap, genimage, rauc, openssl); checks both structurally; boots the image under qemu.
//!
//! Invariant: the data partition (ring, identity) is never inside a root slot.
//! Invariant: the bundle's rootfs.ext4 is the file written into slot A.

pub mod board;
pub mod boot_test;
pub mod build;
pub mod check;
pub mod config;
pub mod gpt;
pub mod layout;
pub mod rauc;
pub mod rootfs;
pub mod step;
pub mod tools;
