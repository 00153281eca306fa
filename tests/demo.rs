//! `tributary demo` as a new user runs it (shortened, with the sink-outage fault): it exits 0,
//! the landed counts in its summary equal what the filters kept, the sink's manifests and what
//! the stock Python readers read, and every answered decision is in the verified archive.

mod support;

use core_sink::datasets::manifest::Manifest;

/// The number after `prefix` in the line that starts with `line_start`.
fn number_after(stdout: &str, line_start: &str, prefix: &str) -> u64 {
    let line = stdout.lines().find(|line| line.trim_start().starts_with(line_start)).unwrap_or_else(|| {
        panic!("no line starting with {line_start:?} in:\n{stdout}");
    });
    let rest =
        &line[line.find(prefix).unwrap_or_else(|| panic!("{prefix:?} not in {line:?}")) + prefix.len()..];
    rest.split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line:?}"))
}

#[test]
fn demo_lands_every_kept_record_and_archives_every_decision() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path().join("demo");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["demo", "--duration", "8", "--appliances", "2", "--fault", "sink-outage", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let kept_readings = number_after(&stdout, "produced ", "; kept ");
    let kept_frames = number_after(&stdout, "produced ", "sensor readings and ");
    let kept_frames_after = {
        let line = stdout.lines().find(|line| line.starts_with("produced ")).unwrap();
        let kept = &line[line.find("; kept ").unwrap()..];
        number_after(kept, "; kept ", "sensor readings and ")
    };
    assert!(kept_readings > 0 && kept_frames > 0 && kept_frames_after > 0, "{stdout}");
    let landed_readings = number_after(&stdout, "landed sensor:", "landed sensor:");
    let landed_frames = number_after(&stdout, "landed media:", "landed media:");
    assert_eq!(landed_readings, kept_readings, "{stdout}");
    assert_eq!(landed_frames, kept_frames_after, "{stdout}");

    let manifest = |dataset: &str| {
        Manifest::read(&dir.join("sink/manifests").join(dataset).join("manifest.json")).unwrap().unwrap()
    };
    let samples = |dataset: &str| -> u64 { manifest(dataset).shards.iter().map(|shard| shard.samples).sum() };
    assert_eq!(samples("sensor"), landed_readings);
    assert_eq!(samples("media"), landed_frames);
    let files =
        |dataset: &str| manifest(dataset).shards.iter().map(|shard| shard.path.clone()).collect::<Vec<_>>();
    if let Some(rows) = support::harness::python_read("parquet", &files("sensor")) {
        assert_eq!(rows.len() as u64, landed_readings, "pyarrow reads every landed reading");
    }
    if let Some(frames) = support::harness::python_read("webdataset", &files("media")) {
        assert_eq!(frames.len() as u64, landed_frames, "webdataset reads every landed frame");
    }

    let answered = number_after(&stdout, "decisions answered", ": ");
    let archived = number_after(&stdout, "archive: ", "archive: ");
    assert!(answered > 0, "{stdout}");
    assert_eq!(archived, answered, "{stdout}");
    assert!(stdout.contains("verify passed"), "{stdout}");
    assert!(stdout.contains("fault over: core sink restarted"), "{stdout}");
}
