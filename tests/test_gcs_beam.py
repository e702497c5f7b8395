"""Beam's own FileSystems and WriteToParquetBatched on gs:// against the GCS emulator."""

import io
import subprocess
import sys

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.gcs import configure_beam_gcs


def test_configure_is_a_noop_without_emulator(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert configure_beam_gcs() is False


def test_importing_transforms_configures_nothing_a_file_dofn_setup_does():
    """No import side effect: a fresh process with an emulator configured keeps Beam's credential
    cache untouched until a DoFn that touches files is set up."""
    code = "; ".join(
        [
            "import os",
            "os.environ['STORAGE_EMULATOR_HOST'] = 'http://127.0.0.1:9'",
            "import transforms, transforms.read, transforms.write, transforms.decode",
            "from apache_beam.internal.gcp.auth import _Credentials",
            "print(_Credentials._credentials_init)",
            "transforms.read._ReadShard('auto', 'image/encoded').setup()",
            "print(_Credentials._credentials_init, _Credentials._credentials)",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["False", "True None"]


def test_filesystems_match_open_create_rename_delete(beam_gcs):
    root = f"gs://{beam_gcs.new_bucket()}"
    beam_gcs.upload(f"{root}/in/a.bin", b"A" * 10)
    beam_gcs.upload(f"{root}/in/b.bin", b"B" * 20)
    beam_gcs.upload(f"{root}/other.txt", b"x")

    [result] = FileSystems.match([f"{root}/in/*.bin"])
    assert sorted((m.path, m.size_in_bytes) for m in result.metadata_list) == [
        (f"{root}/in/a.bin", 10),
        (f"{root}/in/b.bin", 20),
    ]
    with FileSystems.open(f"{root}/in/b.bin") as f:
        assert f.read() == b"B" * 20

    with FileSystems.create(f"{root}/out/summary.json") as f:
        f.write(b'{"results": 2}')
    assert beam_gcs.read(f"{root}/out/summary.json") == b'{"results": 2}'

    FileSystems.rename([f"{root}/out/summary.json"], [f"{root}/out/final.json"])
    assert beam_gcs.list(f"{root}/out/") == [f"{root}/out/final.json"]
    FileSystems.delete([f"{root}/out/final.json"])
    FileSystems.delete([f"{root}/in/"])  # a "directory": everything under the prefix
    assert beam_gcs.list(f"{root}/") == [f"{root}/other.txt"]


def test_filesystems_retries_transient_errors(beam_gcs):
    path = f"gs://{beam_gcs.new_bucket()}/a.bin"
    beam_gcs.upload(path, b"payload")
    beam_gcs.fail_next(2, 503)
    with FileSystems.open(path) as f:
        assert f.read() == b"payload"
    assert beam_gcs.faults["remaining"] == 0


def test_write_to_parquet_batched(beam_gcs):
    out = f"gs://{beam_gcs.new_bucket()}/out"
    schema = pa.schema([("key", pa.string()), ("v", pa.int32())])
    tables = [
        pa.table({"key": ["a", "b"], "v": pa.array([1, 2], pa.int32())}, schema=schema),
        pa.table({"key": ["c"], "v": pa.array([3], pa.int32())}, schema=schema),
    ]
    with beam.Pipeline() as p:  # WriteToParquetBatched takes pyarrow Tables (not RecordBatches)
        _ = (
            p
            | beam.Create(tables)
            | beam.io.WriteToParquetBatched(
                f"{out}/results", schema=schema, file_name_suffix=".parquet", num_shards=2
            )
        )

    files = beam_gcs.list(f"{out}/")  # temp files renamed into place, temp dir removed
    assert files == [f"{out}/results-0000{i}-of-00002.parquet" for i in range(2)]
    table = pa.concat_tables(pq.read_table(io.BytesIO(beam_gcs.read(f))) for f in files)
    assert sorted(table.column("key").to_pylist()) == ["a", "b", "c"]
