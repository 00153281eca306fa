//! Committed raw landing read back (the datasets pipeline and the archive feed read these
//! files): a checkpoint blob and a landing file with arbitrary bytes. Never panics, never
//! allocates past a bounded length prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], &[u8])| {
    let (checkpoint, file) = input;
    let _ = landing::raw::parse_checkpoint(checkpoint);
    let path = std::env::temp_dir().join(format!("tributary-fuzz-landing-{}.tcr", std::process::id()));
    std::fs::write(&path, file).expect("temp dir is writable");
    let _ = landing::read_landed_file(&path);
});
