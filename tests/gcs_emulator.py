"""A local GCS emulator for tests, with fault injection.

tests/conftest.py makes the fixture available to every test module::

    def test_x(gcs_emulator):
        bucket = gcs_emulator.new_bucket()
        gcs_emulator.upload(f"gs://{bucket}/a.bin", b"...")

The session-scoped fixture runs `gcp-storage-emulator` (in memory) in a subprocess on
127.0.0.1 on a free port, sets `STORAGE_EMULATOR_HOST` for this process and its children
(google-cloud-storage, Beam's GcsIO and gcsfs all honour it), and stops it at the end.
`fail_next(n, status)` makes the next `n` requests fail with `status` (503, 429, ...), for
retry tests (the emulator is shared: consume the faults you inject). Helpers talk to the JSON API
with urllib, independent of the clients under test.

Generation preconditions: `gcp-storage-emulator` ignores `ifGenerationMatch`; this wrapper
enforces it as Cloud Storage does (HTTP 412 when the object's live generation is not the one
asked for, `0` meaning "does not exist") on uploads, downloads, metadata reads, patches and
deletes. The server answers one request at a time, so a check and the write it guards are atomic,
which is what `core/claim.py` relies on. (For a resumable upload the check is made when the upload
starts, not when it completes.)
"""

from __future__ import annotations

import email.parser
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

_CONTROL_PATH = "/_faults"


class GcsEmulator:
    """Handle on a running emulator: endpoint, bucket and object helpers, fault injection."""

    def __init__(self, endpoint: str, process: subprocess.Popen | None = None):
        self.endpoint = endpoint.rstrip("/")
        self.process = process

    # -- raw HTTP ----------------------------------------------------------------------
    def _request(self, method, path, data=None, headers=None, timeout=10):
        req = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers=headers or {}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def _json(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        out = self._request(method, path, data, {"Content-Type": "application/json"})
        return json.loads(out) if out else None

    # -- buckets and objects -----------------------------------------------------------
    def create_bucket(self, name: str) -> str:
        self._json("POST", "/storage/v1/b?project=test-project", {"name": name})
        return name

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name (so tests sharing the session don't collide)."""
        return self.create_bucket(f"{prefix}-{uuid.uuid4().hex[:12]}")

    def upload(self, gs_path: str, data: bytes) -> None:
        bucket, name = _split(gs_path)
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request(
            "POST",
            f"/upload/storage/v1/b/{bucket}/o?{query}",
            data,
            {"Content-Type": "application/octet-stream"},
        )

    def upload_file(self, gs_path: str, local_path: str | os.PathLike) -> None:
        self.upload(gs_path, Path(local_path).read_bytes())

    def read(self, gs_path: str) -> bytes:
        bucket, name = _split(gs_path)
        return self._request(
            "GET",
            f"/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media",
        )

    def list(self, gs_prefix: str) -> list[str]:
        """`gs://` URIs of all objects whose name starts with the prefix, sorted."""
        bucket, prefix = _split(gs_prefix, object_optional=True)
        names, token = [], None
        while True:
            q = {"prefix": prefix}
            if token:
                q["pageToken"] = token
            out = self._json("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(q)}")
            names += [f"gs://{bucket}/{item['name']}" for item in out.get("items", [])]
            token = out.get("nextPageToken")
            if not token:
                return sorted(names)

    def wipe(self) -> None:
        """Delete all buckets and objects."""
        self._request("GET", "/wipe")

    # -- fault injection ---------------------------------------------------------------
    def fail_next(self, count: int, status: int = 503) -> None:
        """Make the next `count` API requests fail with HTTP `status`."""
        self._json("POST", _CONTROL_PATH, {"count": count, "status": status})

    @property
    def faults(self) -> dict:
        """{"remaining": faults not yet served, "injected": total served so far}."""
        return self._json("GET", _CONTROL_PATH)


def _split(gs_path: str, object_optional: bool = False) -> tuple[str, str]:
    if not gs_path.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {gs_path}")
    bucket, _, name = gs_path[5:].partition("/")
    if not name and not object_optional:
        raise ValueError(f"no object name in {gs_path}")
    return bucket, name


_OBJECT_PATH = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/([^/]+)$")
_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")


def _object_of(url, body: bytes, content_type: str) -> tuple[str | None, str | None]:
    """(bucket, object name) a JSON API request is about, or (None, None)."""
    found = _OBJECT_PATH.match(url.path)
    if found:
        return found.group(1), urllib.parse.unquote(found.group(2))
    found = _UPLOAD_PATH.match(url.path)
    if not found:
        return None, None
    name = urllib.parse.parse_qs(url.query).get("name", [None])[0]
    if name is None and content_type.startswith("multipart/"):
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        name = json.loads(message.get_payload()[0].get_payload()).get("name")
    elif name is None and content_type.startswith("application/json") and body:
        name = json.loads(body).get("name")
    return found.group(1), name


def start_emulator(timeout: float = 30.0) -> GcsEmulator:
    """Start the emulator subprocess on a free 127.0.0.1 port and wait until it answers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # The child binds port 0 and prints "PORT <n>" once listening.
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"GCS emulator did not start (said {line!r})")
    emulator = GcsEmulator(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            emulator._request("GET", "/", timeout=2)
            return emulator
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_emulator(emulator)
                raise RuntimeError("GCS emulator did not become ready") from exc
            time.sleep(0.1)


def stop_emulator(emulator: GcsEmulator) -> None:
    if emulator.process and emulator.process.poll() is None:
        emulator.process.terminate()
        try:
            emulator.process.wait(5)
        except subprocess.TimeoutExpired:
            emulator.process.kill()
            emulator.process.wait()


_shared: dict = {"emulator": None, "users": 0, "previous_host": None}


@pytest.fixture(scope="session")
def gcs_emulator():
    """A running in-memory GCS emulator; `STORAGE_EMULATOR_HOST` points at it meanwhile.

    One emulator per test process, even when several modules import this fixture (pytest then
    sees several session fixtures); tests should use `new_bucket()` to stay independent.
    """
    if _shared["emulator"] is None:
        try:
            _shared["emulator"] = start_emulator()
        except Exception as e:  # a dependency of the tests that does not start is a failure
            pytest.fail(f"GCS emulator could not start: {type(e).__name__}: {e}")
        _shared["previous_host"] = os.environ.get("STORAGE_EMULATOR_HOST")
    emulator = _shared["emulator"]
    _shared["users"] += 1
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
    try:
        yield emulator
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            previous = _shared["previous_host"]
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous
            stop_emulator(emulator)
            _shared["emulator"] = None


# -- the emulator process --------------------------------------------------------------
def _serve() -> None:
    """Run gcp-storage-emulator in memory with a fault-injecting request handler."""
    import logging
    import threading
    from functools import partial
    from http import server as http_server

    from gcp_storage_emulator import exceptions as emu_exceptions
    from gcp_storage_emulator import server as emu
    from gcp_storage_emulator.storage import Storage

    logging.disable(logging.CRITICAL)
    lock = threading.Lock()
    state = {"remaining": 0, "status": 503, "injected": 0}

    class Handler(emu.RequestHandler):
        def _precondition_failed(self) -> bool:
            """Enforce `ifGenerationMatch` (see the module docstring); True when answered 412."""
            url = urllib.parse.urlsplit(self.path)
            want = urllib.parse.parse_qs(url.query).get("ifGenerationMatch")
            if not want:
                return False
            body = emu._read_raw_data(self) or b""
            self.rfile = io.BytesIO(body)  # the emulator reads the body again
            if "Transfer-Encoding" in self.headers:
                del self.headers["Transfer-Encoding"]
            del self.headers["Content-Length"]
            self.headers["Content-Length"] = str(len(body))
            bucket, name = _object_of(url, body, self.headers.get("Content-Type") or "")
            if bucket is None:
                return False
            try:
                live = str(storage.get_file_obj(bucket, name)["generation"])
            except emu_exceptions.NotFound:
                live = "0"
            if live == want[0]:
                return False
            message = f"ifGenerationMatch {want[0]}: the live generation is {live}"
            out = json.dumps({"error": {"code": 412, "message": message}}).encode()
            self._reply(412, out)
            return True

        def _control(self, method):
            if method == "POST":
                body = json.loads(emu._read_raw_data(self) or b"{}")
                with lock:
                    state["remaining"] = int(body.get("count", 0))
                    state["status"] = int(body.get("status", 503))
            with lock:
                out = json.dumps({k: state[k] for k in ("remaining", "injected")}).encode()
            self._reply(200, out)

        def _reply(self, status, body, extra_headers=()):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for k, v in extra_headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _maybe_fault(self, method) -> bool:
            if self.path.split("?")[0] == _CONTROL_PATH:
                self._control(method)
                return True
            with lock:
                if state["remaining"] <= 0:
                    return False
                state["remaining"] -= 1
                state["injected"] += 1
                status = state["status"]
            emu._read_raw_data(self)  # drain the body so the client sees the response
            body = json.dumps({"error": {"code": status, "message": "injected fault"}})
            headers = [("Retry-After", "0")] if status == 429 else []
            self._reply(status, body.encode(), headers)
            return True

        def do_GET(self):
            self._maybe_fault("GET") or self._precondition_failed() or super().do_GET()

        def do_POST(self):
            self._maybe_fault("POST") or self._precondition_failed() or super().do_POST()

        def do_PUT(self):
            self._maybe_fault("PUT") or self._precondition_failed() or super().do_PUT()

        def do_DELETE(self):
            self._maybe_fault("DELETE") or self._precondition_failed() or super().do_DELETE()

        def do_PATCH(self):
            self._maybe_fault("PATCH") or self._precondition_failed() or super().do_PATCH()

    storage = Storage(use_memory_fs=True)

    # One request at a time: the emulator's storage is not thread-safe. HTTP/1.0 closes
    # every connection after its response, so concurrent clients just queue.
    class Server(http_server.HTTPServer):
        request_queue_size = 128

    httpd = Server(("127.0.0.1", 0), partial(Handler, storage))
    print(f"PORT {httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    _serve()
