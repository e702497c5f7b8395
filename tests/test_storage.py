"""core/storage.py: the same open_file for local paths and gs:// (emulator)."""

import socket
import time

import pytest

from core import storage

DATA = bytes(range(256)) * 1000


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_and_gcs_read_same_bytes(gcs_emulator, tmp_path):
    local = tmp_path / "blob.bin"
    local.write_bytes(DATA)
    bucket = gcs_emulator.new_bucket()
    remote = f"gs://{bucket}/dir/blob.bin"
    gcs_emulator.upload(remote, DATA)

    for path in (str(local), f"file://{local}", remote):
        with storage.open_file(path) as f:
            assert f.read() == DATA, path
        assert storage.exists(path) and storage.size(path) == len(DATA)
    assert not storage.exists(f"gs://{bucket}/dir/missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.open_file(f"gs://{bucket}/dir/missing.bin").read()


def test_gcs_write_then_read(gcs_emulator):
    remote = f"gs://{gcs_emulator.new_bucket()}/out/x.bin"
    with storage.open_file(remote, "wb") as f:
        f.write(DATA)
    assert gcs_emulator.read(remote) == DATA


def test_filesystem_is_cached_and_uses_emulator(gcs_emulator):
    fs, fs_path = storage.get_filesystem("gs://b/o")
    assert fs_path == "b/o"
    assert storage.get_filesystem("gs://other/x")[0] is fs
    assert fs._location == gcs_emulator.endpoint
    assert fs.credentials.token == "anon"


@pytest.mark.parametrize("status,count", [(503, 2), (429, 1)])
def test_transient_errors_are_retried(gcs_emulator, status, count):
    remote = f"gs://{gcs_emulator.new_bucket()}/r.bin"
    gcs_emulator.upload(remote, DATA)
    before = gcs_emulator.faults["injected"]
    gcs_emulator.fail_next(count, status)
    with storage.open_file(remote) as f:
        assert f.read() == DATA
    assert gcs_emulator.faults == {"remaining": 0, "injected": before + count}


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError, match="cannot reach Cloud Storage"):
        storage.open_file("gs://bucket/object.bin")
    assert time.monotonic() - start < 15


def test_anonymous_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    assert storage._gcs_token() == "anon"
    (tmp_path / "application_default_credentials.json").write_text("{}")
    assert storage._gcs_token() == "google_default"
