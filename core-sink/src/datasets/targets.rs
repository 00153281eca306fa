//! One writer thread per storage target. A target is a directory standing for a mount point (a
//! Lustre OST pool, a disk, an NFS/BeeGFS path); its thread owns the shards open on it, writes
//! them sequentially through a 1 MiB buffer, and publishes a finished shard: fsync, sha256 read
//! back, atomic rename from its hidden in-progress name, fsync of the directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sha2::{Digest as _, Sha256};

pub use super::format::{OwnedSeriesRow, Sample, SeriesReport, ShardFormat};
use super::format::{ShardWriter, WRITE_BUFFER_BYTES};
use super::typed::TypedColumn;

/// Commands queued per target; the coordinator waits when a target falls behind.
const TARGET_QUEUE_MAX: usize = 1024;

pub struct Published {
    pub bytes: u64,
    pub sha256: String,
    pub report: SeriesReport,
}

enum Command {
    Open {
        shard: u64,
        hidden: PathBuf,
        published: PathBuf,
        format: ShardFormat,
        known_columns: Vec<TypedColumn>,
    },
    Append {
        shard: u64,
        sample: Sample,
    },
    Seal {
        shard: u64,
        reply: SyncSender<Result<Published, String>>,
    },
    Abort {
        shard: u64,
    },
}

struct OpenShard {
    hidden: PathBuf,
    published: PathBuf,
    writer: Option<Box<dyn ShardWriter>>,
    /// The first error; the shard is then failed and sealing reports it.
    error: Option<String>,
}

/// Handle to a target's writer thread.
pub struct Target {
    pub index: usize,
    pub directory: PathBuf,
    commands: SyncSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Target {
    pub fn start(index: usize, directory: PathBuf) -> std::io::Result<Target> {
        let (commands, receiver) = sync_channel(TARGET_QUEUE_MAX);
        let thread =
            std::thread::Builder::new().name(format!("target-{index}")).spawn(move || run(receiver))?;
        Ok(Target { index, directory, commands, thread: Some(thread) })
    }

    fn send(&self, command: Command) {
        // The thread only exits when this handle is dropped.
        let _ = self.commands.send(command);
    }

    pub fn open(
        &self,
        shard: u64,
        hidden: PathBuf,
        published: PathBuf,
        format: ShardFormat,
        known_columns: Vec<TypedColumn>,
    ) {
        self.send(Command::Open { shard, hidden, published, format, known_columns });
    }

    pub fn append(&self, shard: u64, sample: Sample) {
        self.send(Command::Append { shard, sample });
    }

    /// Finishes, syncs and publishes the shard; blocks until done.
    pub fn seal(&self, shard: u64) -> Result<Published, String> {
        let (reply, answer) = sync_channel(1);
        self.send(Command::Seal { shard, reply });
        answer.recv().unwrap_or_else(|_| Err("target thread stopped".into()))
    }

    /// Drops the shard and its in-progress file.
    pub fn abort(&self, shard: u64) {
        self.send(Command::Abort { shard });
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let (dead, _) = sync_channel(1);
        drop(std::mem::replace(&mut self.commands, dead));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(commands: Receiver<Command>) {
    let mut shards: HashMap<u64, OpenShard> = HashMap::new();
    while let Ok(command) = commands.recv() {
        match command {
            Command::Open { shard, hidden, published, format, known_columns } => {
                let opened = open_writer(&hidden, format, &known_columns);
                let (writer, error) = match opened {
                    Ok(writer) => (Some(writer), None),
                    Err(error) => (None, Some(format!("create {}: {error}", hidden.display()))),
                };
                shards.insert(shard, OpenShard { hidden, published, writer, error });
            }
            Command::Append { shard, sample } => {
                if let Some(open) = shards.get_mut(&shard)
                    && open.error.is_none()
                    && let Err(error) = open.writer.as_mut().expect("no error means a writer").append(sample)
                {
                    open.error = Some(format!("write {}: {error}", open.hidden.display()));
                }
            }
            Command::Seal { shard, reply } => {
                let result = match shards.remove(&shard) {
                    Some(open) => seal(open),
                    None => Err(format!("shard {shard} is not open")),
                };
                let _ = reply.send(result);
            }
            Command::Abort { shard } => {
                if let Some(open) = shards.remove(&shard) {
                    drop(open.writer);
                    let _ = std::fs::remove_file(&open.hidden);
                }
            }
        }
    }
    for (_, open) in shards {
        drop(open.writer);
        let _ = std::fs::remove_file(&open.hidden);
    }
}

fn open_writer(
    hidden: &Path,
    format: ShardFormat,
    known_columns: &[TypedColumn],
) -> Result<Box<dyn ShardWriter>, String> {
    if let Some(directory) = hidden.parent() {
        std::fs::create_dir_all(directory).map_err(|error| error.to_string())?;
    }
    let file = File::create(hidden).map_err(|error| error.to_string())?;
    format.create(file, known_columns)
}

fn seal(mut open: OpenShard) -> Result<Published, String> {
    let result = (|| {
        if let Some(error) = open.error.take() {
            return Err(error);
        }
        let (file, report) = open
            .writer
            .take()
            .expect("no error means a writer")
            .finish()
            .map_err(|error| format!("finish {}: {error}", open.hidden.display()))?;
        durable::sync_file(&file, &open.hidden).map_err(|error| error.to_string())?;
        drop(file);
        let (bytes, sha256) =
            digest(&open.hidden).map_err(|error| format!("read back {}: {error}", open.hidden.display()))?;
        durable::rename_into_place(&open.hidden, &open.published).map_err(|error| error.to_string())?;
        Ok(Published { bytes, sha256, report })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&open.hidden);
    }
    result
}

fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; WRITE_BUFFER_BYTES];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    let _ = file.flush();
    Ok((bytes, hex(&hasher.finalize())))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
