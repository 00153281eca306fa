#!/usr/bin/env python3
"""Read Tributary dataset files with the stock Python readers and print what they see.

Usage:
    python3 tests/read_datasets.py webdataset SHARD.tar [SHARD.tar ...]
    python3 tests/read_datasets.py parquet FILE.parquet [FILE.parquet ...]
    python3 tests/read_datasets.py partitions DATASET_DIR [DATASET_DIR ...]
    python3 tests/read_datasets.py duckdb-average COLUMN DATASET_DIR [DATASET_DIR ...]
    python3 tests/read_datasets.py wids INDEX.json
    python3 tests/read_datasets.py s3-partitions ENDPOINT BUCKET/PREFIX/sensor [...]
    python3 tests/read_datasets.py s3-webdataset ENDPOINT BUCKET/PREFIX/media/wids-index.json
    python3 tests/read_datasets.py s3-cat ENDPOINT BUCKET/KEY

webdataset: iterates the shards in order with `webdataset.WebDataset` (no decoding, raw bytes)
and prints one JSON object per sample: {"key": ..., "files": {extension: sha256 hex}}.

parquet: reads each file with `pyarrow.parquet.read_table` and prints one JSON object per row:
{"device", "lane", "seq", "index", "key", "timestamp_us", "content_type", "payload_sha256",
"typed"}, where "typed" maps each typed column (the columns after the fixed ones) to its value,
null cells left out.

partitions: opens each DATASET_DIR (a target's `sensor/` directory) as one `pyarrow.dataset`
with Hive partitioning, the schemas of all files unified (a later shard may have more typed
columns), and prints one JSON object per row: {"device", "key", "date", "timestamp_us",
"typed"}; fails if a row's `date` partition is not its timestamp's UTC date.

duckdb-average: runs `SELECT device, avg(COLUMN), count(*) ... GROUP BY device` in DuckDB over
every `*.parquet` below the DATASET_DIRs (`hive_partitioning`, `union_by_name`) and prints one
JSON object per device: {"device", "average", "rows"}.

wids: opens the shard index with `wids.ShardListDataset`, reads every sample by index (no
decoding) and prints {"key", "files": {extension: sha256 hex}, "shard"} per sample.

s3-partitions: as partitions, each dataset directory read straight from an S3-compatible bucket
through `pyarrow.fs.S3FileSystem` (ENDPOINT like `http://127.0.0.1:9000`, credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region AWS_REGION or us-east-1).

s3-webdataset: reads the wids index from the bucket with boto3 and iterates its shards (in
index order) with `webdataset.WebDataset` over `pipe:` URLs that run `s3-cat`, printing what
webdataset prints.

s3-cat: writes one object of the bucket to stdout (boto3; what the `pipe:` URLs run).

Exit status: 0 on success, 1 when a file cannot be read, 2 on a usage error. Messages go to
stderr as `read_datasets: <what failed>: <why>`.

Needs `pip install pyarrow webdataset duckdb wids` (webdataset 1.x runs without torch: it falls
back to stand-in classes when torch is missing; wids imports `torch.distributed` and
`torch.utils.data.Dataset` at the top, for its distributed sampler and base class only, so without
torch this script gives it empty generic stand-ins rather than make CI install torch).
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


def read_webdataset(paths, urls=None):
    try:
        import webdataset as wds
    except ImportError as error:
        fail(f"cannot import webdataset: {error} (pip install webdataset)")
    if urls is None:
        # Local files as file:// URLs so that no path is taken for another scheme (webdataset
        # opens "pipe:..." through a shell). A list is not brace-expanded.
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
        if table.column_names[: len(SERIES_COLUMNS)] != SERIES_COLUMNS:
            fail(f"parquet file {path}: columns {table.column_names}, expected {SERIES_COLUMNS} first")
        typed_columns = table.column_names[len(SERIES_COLUMNS) :]
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
                typed = {name: row.pop(name) for name in typed_columns}
                row["typed"] = {name: value for name, value in typed.items() if value is not None}
                emit(row)


def read_partitions(directories, filesystem=None):
    try:
        import pyarrow as pa
        import pyarrow.dataset as ds
    except ImportError as error:
        fail(f"cannot import pyarrow: {error} (pip install pyarrow)")
    import datetime

    for directory in directories:
        if filesystem is None and not Path(directory).is_dir():
            fail(f"dataset directory {directory}: not a directory")
        files = ds.dataset(directory, format="parquet", partitioning="hive", filesystem=filesystem)
        schema = pa.unify_schemas([fragment.physical_schema for fragment in files.get_fragments()] or [files.schema])
        partition = pa.schema([pa.field("date", pa.string())])
        dataset = ds.dataset(
            directory,
            format="parquet",
            partitioning=ds.partitioning(partition, flavor="hive"),
            schema=pa.unify_schemas([schema, partition]),
            filesystem=filesystem,
        )
        typed_columns = [name for name in dataset.schema.names if name not in SERIES_COLUMNS and name != "date"]
        columns = ["device", "key", "date", "timestamp_us"] + typed_columns
        for batch in dataset.to_batches(columns=columns, batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                timestamp = row.pop("timestamp_us")
                if timestamp.date().isoformat() != row["date"]:
                    fail(f"dataset {directory}: row {row['key']!r} at {timestamp} is in partition date={row['date']}")
                row["timestamp_us"] = (timestamp - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)
                typed = {name: row.pop(name) for name in typed_columns}
                row["typed"] = {name: value for name, value in typed.items() if value is not None}
                emit(row)


def duckdb_average(column, directories):
    try:
        import duckdb
    except ImportError as error:
        fail(f"cannot import duckdb: {error} (pip install duckdb)")
    if not column.isidentifier():
        fail(f"column {column!r}: expected an identifier", status=2)
    globs = [str(Path(directory) / "**" / "*.parquet") for directory in directories]
    connection = duckdb.connect()
    rows = connection.execute(
        f"SELECT device, avg({column}), count(*) FROM read_parquet(?, hive_partitioning = true, union_by_name = true) "
        "GROUP BY device ORDER BY device",
        [globs],
    ).fetchall()
    for device, average, count in rows:
        emit({"device": device, "average": average, "rows": count})


def read_wids(index):
    try:
        import torch  # noqa: F401
    except ImportError:
        # wids imports `torch.distributed` (for its distributed sampler, unused here) and
        # subclasses `torch.utils.data.Dataset[T]`: generic stand-ins are all it needs.
        import types
        import typing

        T = typing.TypeVar("T")
        torch = types.ModuleType("torch")
        torch.distributed = types.ModuleType("torch.distributed")
        torch.utils = types.ModuleType("torch.utils")
        torch.utils.data = types.ModuleType("torch.utils.data")

        class Dataset(typing.Generic[T]):
            pass

        class Sampler(typing.Generic[T]):
            pass

        torch.utils.data.Dataset = Dataset
        torch.utils.data.Sampler = Sampler
        for name, module in [
            ("torch", torch),
            ("torch.distributed", torch.distributed),
            ("torch.utils", torch.utils),
            ("torch.utils.data", torch.utils.data),
        ]:
            sys.modules[name] = module
    try:
        import wids
    except ImportError as error:
        fail(f"cannot import wids: {error} (pip install wids)")
    import tempfile

    if not Path(index).is_file():
        fail(f"wids index {index}: not a file")
    with tempfile.TemporaryDirectory() as cache:
        # A cache directory of our own: wids links local shards into it and leaves lock files.
        dataset = wids.ShardListDataset(str(Path(index).resolve()), cache_dir=cache, transformations=[])
        for position in range(len(dataset)):
            sample = dataset[position]
            files = {}
            for name, value in sample.items():
                if name.startswith("__"):
                    continue
                data = value.read() if hasattr(value, "read") else value
                files[name.lstrip(".")] = sha256_hex(data)
            emit({"key": sample["__key__"], "files": files, "shard": sample["__shard__"]})
        dataset.close()


def split_bucket_path(path):
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        fail(f"{path!r}: expected BUCKET/KEY", status=2)
    return bucket, key


def s3_credentials():
    import os

    return os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_REGION", "us-east-1")


def s3_client(endpoint):
    try:
        import boto3
    except ImportError as error:
        fail(f"cannot import boto3: {error} (pip install boto3)")
    key_id, secret, region = s3_credentials()
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region)


def s3_partitions(endpoint, directories):
    try:
        import pyarrow.fs
    except ImportError as error:
        fail(f"cannot import pyarrow: {error} (pip install pyarrow)")
    scheme, _, address = endpoint.partition("://")
    key_id, secret, region = s3_credentials()
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=key_id, secret_key=secret, region=region, scheme=scheme, endpoint_override=address
    )
    read_partitions(directories, filesystem=filesystem)


def s3_cat(endpoint, path):
    bucket, key = split_bucket_path(path)
    body = s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"]
    for piece in iter(lambda: body.read(1 << 20), b""):
        sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()


def s3_webdataset(endpoint, index_path):
    import posixpath
    import shlex

    bucket, key = split_bucket_path(index_path)
    index = json.loads(s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())
    directory = posixpath.dirname(key)
    script = shlex.quote(str(Path(__file__).resolve()))
    urls = []
    for shard in index["shardlist"]:
        # URLs in the index are relative to it.
        shard_key = posixpath.normpath(posixpath.join(directory, shard["url"]))
        urls.append(f"pipe:{shlex.quote(sys.executable)} {script} s3-cat {shlex.quote(endpoint)} {shlex.quote(bucket + '/' + shard_key)}")
    read_webdataset([], urls=urls)


def main(argv):
    kinds = ("webdataset", "parquet", "partitions", "duckdb-average", "wids", "s3-partitions", "s3-webdataset", "s3-cat")
    two_arguments = ("duckdb-average", "s3-partitions", "s3-webdataset", "s3-cat")
    if len(argv) < 3 or argv[1] not in kinds or (argv[1] in two_arguments and len(argv) < 4):
        fail(
            "usage: read_datasets.py webdataset SHARD.tar [...] | parquet FILE.parquet [...] | "
            "partitions DIR [...] | duckdb-average COLUMN DIR [...] | wids INDEX.json | "
            "s3-partitions ENDPOINT BUCKET/PREFIX/sensor [...] | s3-webdataset ENDPOINT BUCKET/KEY | "
            "s3-cat ENDPOINT BUCKET/KEY",
            status=2,
        )
    kind, paths = argv[1], argv[2:]
    try:
        if kind == "webdataset":
            read_webdataset(paths)
        elif kind == "parquet":
            read_parquet(paths)
        elif kind == "partitions":
            read_partitions(paths)
        elif kind == "duckdb-average":
            duckdb_average(paths[0], paths[1:])
        elif kind == "s3-partitions":
            s3_partitions(paths[0], paths[1:])
        elif kind == "s3-webdataset":
            s3_webdataset(paths[0], paths[1])
        elif kind == "s3-cat":
            s3_cat(paths[0], paths[1])
        else:
            read_wids(paths[0])
        sys.stdout.flush()
    except SystemExit:
        raise
    except Exception as error:  # Any reader error is a failed read, reported in one line.
        fail(f"{kind} {' '.join(paths)}: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main(sys.argv)
