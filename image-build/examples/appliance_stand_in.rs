//! STAND-IN for the appliance daemon, for image-build's tests only: the real daemon is being
//! written in appliance/. It behaves as tributary-appliance.service expects of the real one
//! (Type=notify, WatchdogSec): it checks that --config names a readable file and that the data
//! partition is mounted, sends READY=1, then WATCHDOG=1 every half watchdog period, forever.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Watchdog period when systemd sets none (keeps the loop bounded in time per iteration).
const WATCHDOG_PERIOD_DEFAULT_USEC: u64 = 30_000_000;

fn notify(message: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let socket = UnixDatagram::unbound()?;
    let path = path.to_string_lossy().into_owned();
    if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
        socket.send_to_addr(message.as_bytes(), &address)?;
    } else {
        socket.send_to(message.as_bytes(), &path)?;
    }
    Ok(())
}

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let config = match arguments.iter().position(|argument| argument == "--config") {
        Some(index) if index + 1 < arguments.len() => arguments[index + 1].clone(),
        _ => {
            eprintln!("appliance stand-in: usage: appliance --config FILE");
            std::process::exit(2);
        }
    };
    if let Err(error) = std::fs::read(&config) {
        eprintln!("appliance stand-in: failed to read {config}: {error}");
        std::process::exit(1);
    }
    if !std::path::Path::new("/var/lib/tributary/identity").is_dir() {
        eprintln!("appliance stand-in: /var/lib/tributary/identity missing: data partition not mounted");
        std::process::exit(1);
    }
    let watchdog_usec: u64 = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(WATCHDOG_PERIOD_DEFAULT_USEC);
    if let Err(error) = notify("READY=1\nSTATUS=stand-in appliance running") {
        eprintln!("appliance stand-in: sd_notify failed: {error}");
        std::process::exit(1);
    }
    println!("appliance stand-in: ready (config {config}, watchdog {watchdog_usec} us)");
    loop {
        std::thread::sleep(Duration::from_micros(watchdog_usec / 2));
        if let Err(error) = notify("WATCHDOG=1") {
            eprintln!("appliance stand-in: watchdog ping failed: {error}");
        }
    }
}
