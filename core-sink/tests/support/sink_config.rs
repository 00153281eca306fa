//! Loading a sink config written from a few sections, for the config tests.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;

/// Writes `<base>/sink.toml` with the required top-level keys and then `sections`, and loads it.
pub fn load_sink_config(
    base: &Path,
    sections: &str,
) -> Result<core_sink::SinkConfig, core_sink::config::ConfigError> {
    let text = format!(
        "listen = \"127.0.0.1:4433\"\nstate_dir = \"state\"\nlanding_dir = \"landing\"\nca_dir = \"ca\"\n\
         server_certificate_dir = \"server\"\n{sections}"
    );
    let path = base.join("sink.toml");
    std::fs::write(&path, text).unwrap();
    core_sink::SinkConfig::load(&path)
}
