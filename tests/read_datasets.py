#!/usr/bin/env python3
"""Read Tributary dataset files with the stock Python readers and print what they see.

Usage:
    python3 tests/read_datasets.py webdataset SHARD.tar [SHARD.tar ...]
    python3 tests/read_datasets.py parquet FILE.parquet [FILE.parquet ...]

webdataset: iterates the shards in order with `webdataset.WebDataset` (no decoding, raw bytes)
and prints one JSON object per sample: {"key": ..., "files": {extension: sha256 hex}}.

parquet: reads each file with `pyarrow.parquet.read_table` and prints one JSON object per row:
{"device", "lane", "seq", "index", "key", "timestamp_us", "content_type", "payload_sha256"}.

Exit status: 0 on success, 1 when a file cannot be read, 2 on a usage error. Messages go to
stderr as `read_datasets: <what failed>: <why>`.

Needs `pip install pyarrow webdataset` (webdataset 1.x runs without torch: it falls back to
stand-in classes when torch is missing).
"""

import hashlib
import json
import sys
from pathlib import Path

SERIES_COLUMNS = ["device", "lane", "seq", "index", "key", "timestamp_us", "content_type", "payload"]
# Rows converted to Python objects at a time, so memory stays bounded by the batch and not the file.
PARQUET_BATCH_ROWS = 4096


def fail(message, status=1):
    print(f"read_datasets: {message}", file=sys.stderr)
    sys.exit(status)


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def emit(record):
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")


def read_webdataset(paths):
    try:
        import webdataset as wds
    except ImportError as error:
        fail(f"cannot import webdataset: {error} (pip install webdataset)")
    # Local files as file:// URLs so that no path is taken for another scheme (webdataset opens
    # "pipe:..." through a shell). A list is not brace-expanded.
    urls = [Path(path).resolve().as_uri() for path in paths]
    for path in paths:
        if not Path(path).is_file():
            fail(f"webdataset shard {path}: not a file")
    # shardshuffle=False keeps shard order; no node or worker splitting (those read the RANK and
    # WORLD_SIZE environment of distributed training); empty_check=False lets an empty shard
    # print nothing instead of raising; the default handler re-raises every error.
    dataset = wds.WebDataset(
        urls,
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
    )
    for sample in dataset:
        files = {}
        for name, value in sample.items():
            if name.startswith("__"):
                continue
            if not isinstance(value, (bytes, bytearray)):
                fail(f"sample {sample.get('__key__')!r}: {name} is {type(value).__name__}, expected raw bytes")
            files[name] = sha256_hex(value)
        emit({"key": sample["__key__"], "files": files})


def read_parquet(paths):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        fail(f"cannot import pyarrow: {error} (pip install pyarrow)")
    for path in paths:
        if not Path(path).is_file():
            fail(f"parquet file {path}: not a file")
        table = pq.read_table(path)
        if table.column_names != SERIES_COLUMNS:
            fail(f"parquet file {path}: columns {table.column_names}, expected {SERIES_COLUMNS}")
        timestamp_type = table.schema.field("timestamp_us").type
        if not (pa.types.is_timestamp(timestamp_type) and timestamp_type.unit == "us" and timestamp_type.tz == "UTC"):
            fail(f"parquet file {path}: timestamp_us is {timestamp_type}, expected timestamp[us, tz=UTC]")
        # Integers are printed as pyarrow sees them; the timestamp as its microsecond count.
        table = table.set_column(
            SERIES_COLUMNS.index("timestamp_us"),
            "timestamp_us",
            table.column("timestamp_us").cast(pa.int64()),
        )
        for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                payload = row.pop("payload")
                if not isinstance(payload, bytes):
                    fail(f"parquet file {path}: payload is {type(payload).__name__}, expected bytes")
                row["payload_sha256"] = sha256_hex(payload)
                emit(row)


def main(argv):
    if len(argv) < 3 or argv[1] not in ("webdataset", "parquet"):
        fail("usage: read_datasets.py webdataset SHARD.tar [...] | parquet FILE.parquet [...]", status=2)
    kind, paths = argv[1], argv[2:]
    try:
        if kind == "webdataset":
            read_webdataset(paths)
        else:
            read_parquet(paths)
        sys.stdout.flush()
    except SystemExit:
        raise
    except Exception as error:  # Any reader error is a failed read, reported in one line.
        fail(f"{kind} {' '.join(paths)}: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main(sys.argv)
