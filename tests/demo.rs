//! `tributary demo` as a new user runs it (shortened): it exits 0 and the datasets it reports
//! hold every reading and frame it produced.

use core_sink::datasets::manifest::Manifest;

#[test]
fn demo_lands_every_record_in_the_datasets() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("demo");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["demo", "--duration", "3", "--appliances", "2", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // "produced N sensor readings and M frames (...)"
    let line = stdout.lines().find(|line| line.starts_with("produced ")).expect("summary line");
    let words: Vec<&str> = line.split_whitespace().collect();
    let readings: u64 = words[1].parse().unwrap();
    let frames: u64 = words[5].parse().unwrap();
    assert!(readings > 0 && frames > 0, "{line}");
    let samples = |dataset: &str| -> u64 {
        let manifest =
            Manifest::read(&dir.join("sink/manifests").join(dataset).join("manifest.json")).unwrap().unwrap();
        manifest.shards.iter().map(|shard| shard.samples).sum()
    };
    assert_eq!(samples("sensor"), readings, "{stdout}");
    assert_eq!(samples("media"), frames, "{stdout}");
}
