"""The one way the project opens files outside Beam: local paths and `gs://` through fsspec.

`gs://` uses `gcsfs.core.GCSFileSystem` (the core class: the experimental one first makes a
gRPC call that emulators cannot answer) with, in order:
  - `STORAGE_EMULATOR_HOST` set: that endpoint, anonymous;
  - `GOOGLE_APPLICATION_CREDENTIALS` or a gcloud ADC file, or running on GCE/Dataflow
    (detected from the DMI product name, no network): the default credentials;
  - otherwise anonymous (public buckets such as gs://bit_models).
So Google auth never probes the metadata server off Google Cloud. gcsfs retries 408/429/5xx
and connection errors with exponential back-off (6 attempts, about 30 s at most); an endpoint
that cannot be reached at all fails within `CONNECT_TIMEOUT_S` with `StorageUnavailableError`.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import sys
import threading
import urllib.parse

import fsspec
from fsspec.implementations.local import LocalFileSystem

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0
_DEFAULT_GCS_ENDPOINT = "https://storage.googleapis.com"
# Suffixes of a compressed stream, as Beam's file systems detect them (`CompressionTypes`): the job
# reads such shards decompressed, so offsets in them are offsets into the decompressed stream.
COMPRESSED_EXTS = (".gz", ".bz2", ".deflate", ".zst", ".xz", ".lzma")

_lock = threading.Lock()
_cache: dict[tuple, fsspec.AbstractFileSystem] = {}


class StorageUnavailableError(OSError):
    """The storage endpoint cannot be reached (offline, wrong emulator address, ...)."""


def get_filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path as that filesystem names it) for a local path, `file://` or `gs://` URI."""
    scheme = urllib.parse.urlsplit(path).scheme if "://" in path else ""
    if scheme in ("gs", "gcs"):
        fs = _gcs_filesystem()
        return fs, fs._strip_protocol(path)
    if scheme in ("", "file"):
        fs = _cached(("file",), lambda: LocalFileSystem(auto_mkdir=True))
        return fs, fs._strip_protocol(path)
    return fsspec.core.url_to_fs(path)


def open_file(path: str, mode: str = "rb", **kwargs):
    """Open `path` (local or `gs://`); a file object usable as a context manager."""
    fs, fs_path = get_filesystem(path)
    return fs.open(fs_path, mode, **kwargs)


class NotRegularFileError(OSError):
    """A path is a FIFO, device, socket or folder when it is opened (it was a file when listed)."""


@contextlib.contextmanager
def open_regular_file(path: str, shown: str | None = None):
    """A local file opened for reading without blocking on it, as (`io.FileIO`, size): a FIFO,
    device or socket put where a file was listed is refused (`NotRegularFileError`, naming it as
    `shown`), never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with io.FileIO(fd, closefd=True) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{path if shown is None else shown} is not a regular file")
        yield f, info.st_size


def exists(path: str) -> bool:
    fs, fs_path = get_filesystem(path)
    return fs.exists(fs_path)


def size(path: str) -> int:
    """Size in bytes; FileNotFoundError if missing."""
    fs, fs_path = get_filesystem(path)
    return fs.size(fs_path)


def clear_cache() -> None:
    """Forget cached filesystem instances (tests that change the environment)."""
    with _lock:
        _cache.clear()


# -- internals -------------------------------------------------------------------------
def _cached(key, make):
    key = (os.getpid(),) + key  # a forked worker must not reuse its parent's event loop
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = make()
        return fs


def _gcs_filesystem():
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator and emulator != "default":
        endpoint = emulator if "://" in emulator else f"http://{emulator}"
        token = "anon"
    else:
        endpoint, token = _DEFAULT_GCS_ENDPOINT, _gcs_token()

    def make():
        import aiohttp
        from gcsfs.core import GCSFileSystem

        _check_reachable(endpoint)
        return GCSFileSystem(
            token=token,
            endpoint_url=endpoint,
            # Listings are always fresh: the launcher lists an output the workers have just
            # written (a cached listing would miss files and break the accounting).
            use_listings_cache=False,
            requests_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
            ),
        )

    return _cached(("gs", endpoint, token), make)


def _gcs_token() -> str:
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.path.exists(_adc_path()):
        return "google_default"
    if _on_gce():
        return "google_default"  # metadata server credentials (Dataflow workers)
    return "anon"


def _adc_path() -> str:
    config = os.environ.get("CLOUDSDK_CONFIG")
    if not config:
        if sys.platform == "win32":
            config = os.path.join(os.environ.get("APPDATA", ""), "gcloud")
        else:
            config = os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    return os.path.join(config, "application_default_credentials.json")


def _on_gce() -> bool:
    """Running on a Google Compute Engine VM, decided without touching the network."""
    if os.environ.get("NO_GCE_CHECK", "").lower() in ("1", "true"):
        return False
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def unreachable_reason(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S):
    """None when a TCP connection to host:port opens within `timeout` s, else why not.

    Runs in a thread so that a slow DNS lookup is bounded too (offline machines must fail fast)."""
    result: dict = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if result.get("ok"):
        return None
    return result.get("error") or f"no answer within {timeout:g} s"


def _check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise StorageUnavailableError unless a TCP connection to `endpoint` opens in `timeout` s."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    why = unreachable_reason(url.hostname, port, timeout)
    if why is not None:
        hint = (
            "is the emulator running?"
            if os.environ.get("STORAGE_EMULATOR_HOST")
            else "is the machine offline?"
        )
        raise StorageUnavailableError(f"cannot reach Cloud Storage at {endpoint} ({why}); {hint}")
