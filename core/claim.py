"""Exclusive claims: one holder at a time of a job's `--output` or of an index directory, released
when the holder dies, however it dies.

- **Local directory**: the file `DIR/.claim`, locked with `flock(LOCK_EX | LOCK_NB)`. The kernel
  drops the lock when the holding process exits (kill -9 included), so a dead run's claim never
  blocks its rerun. The file says who holds it (JSON: what, host, pid, start time) and is removed
  on release. The directory is created if needed (and removed again on release if the claim
  created it and nothing else was put in it).
- **gs:// prefix**: the object `PREFIX/.claim`, created only where there is none
  (`ifGenerationMatch=0`), holding the same JSON plus `ttl_seconds`. A thread of the holding
  process rewrites it every `renew_seconds` (each rewrite conditional on the generation it wrote
  last). A claim not rewritten for `ttl_seconds` (by the object's `updated` time, against the
  claimant's clock: clocks must agree within a minute or so) has expired: its holder is gone, and
  the next claimant replaces it, conditionally on the expired generation, so of two claimants one
  wins. A holder that could not renew in time, or whose claim someone else replaced, has lost it:
  `Claim.check()` raises `ClaimLostError` (the job checks before it commits its outputs).

A second claimant gets `ClaimedError`, whose message names the holder. A path that cannot hold a
claim (an existing file, a read-only directory, no credentials) gives `ClaimError` naming it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from core.errors import UsageError

_LOG = logging.getLogger(__name__)

CLAIM_FILE = ".claim"
TTL_SECONDS = 300.0
RENEW_SECONDS = 60.0


class ClaimError(UsageError):
    """The path cannot be claimed (it is a file, read-only, unreachable, ...): a set-up error."""


class ClaimedError(ClaimError):
    """Someone else holds the claim; `holder` says who (what, host, pid, started)."""

    def __init__(self, path: str, holder: dict, hint: str = ""):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is claimed by {describe(holder)}{hint}")


class ClaimLostError(ClaimError):
    """The holder lost its claim (not renewed in time, or replaced by another claimant)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict) -> str:
    """'a bit-tagger run (host h, pid 12, started 2024-06-01 02:15:03 UTC)'."""
    if not holder:
        return "another process (who is not recorded yet: the claim was just taken)"
    what = holder.get("what") or "another process"
    facts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    facts.append(f"started {holder.get('started', '?')}")
    return f"{what} ({', '.join(facts)})"


def is_gcs(path: str) -> bool:
    return path.startswith(("gs://", "gcs://"))


class Claim:
    """A held claim; a context manager that releases it. `token` is unique to this claim (the
    job uses it as its run id)."""

    def __init__(self, path: str, holder: dict):
        self.path, self.holder, self.token = path, holder, holder["token"]

    def check(self) -> None:
        """Raises `ClaimLostError` when this process no longer holds the claim."""

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(
    path: str,
    what: str,
    *,
    ttl_seconds: float = TTL_SECONDS,
    renew_seconds: float | None = None,
) -> Claim:
    """Claims the directory or gs:// prefix `path` for this process (see the module docstring).

    `what` names the holder in a second claimant's error ("a bit-tagger run")."""
    path = path.rstrip("/")
    holder = {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _iso(_now()),
        "token": uuid.uuid4().hex,
    }
    if is_gcs(path):
        renew = renew_seconds if renew_seconds is not None else min(RENEW_SECONDS, ttl_seconds / 5)
        return _GcsClaim.take(path, holder, ttl_seconds, renew)
    return _LocalClaim.take(path, holder)


# ------------------------------------------------------------------------------------ local


class _LocalClaim(Claim):
    def __init__(self, path: str, holder: dict, fd: int, created_dir: bool):
        super().__init__(path, holder)
        self._fd, self._created_dir = fd, created_dir

    @classmethod
    def take(cls, directory: str, holder: dict) -> _LocalClaim:
        directory = directory[len("file://") :] if directory.startswith("file://") else directory
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ClaimError(f"{directory} is a file, not a directory")
        created = not os.path.exists(directory)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ClaimError(f"cannot create the directory {directory}: {e.strerror}") from e
        path = os.path.join(directory, CLAIM_FILE)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ClaimError(f"cannot write to {directory}: {e.strerror} ({path})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                found = _read_fd(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise ClaimedError(directory, found) from None
                raise ClaimError(f"cannot lock {path}: {e.strerror}") from e
            # The previous holder unlinks the file on release: a lock on an unlinked file is no
            # claim. Keep the lock only if the path still names the file we locked.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        data = json.dumps(holder).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            os.close(fd)
            raise ClaimError(f"cannot write to {directory}: {e.strerror} ({path})") from e
        return cls(directory, holder, fd, created)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(os.path.join(self.path, CLAIM_FILE))  # while still locked (see take)
        except OSError as e:
            _LOG.warning("could not remove the claim file in %s: %s", self.path, e)
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            try:
                os.rmdir(self.path)  # only if empty: a run that did not start leaves nothing
            except OSError:
                pass


def _read_fd(fd: int) -> dict:
    try:
        found = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# ------------------------------------------------------------------------------------- gs://

_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def _client():
    """A google-cloud-storage client: anonymous against `STORAGE_EMULATOR_HOST` (tests), else
    the default Google credentials (writing a claim needs them)."""
    from google.cloud import storage

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    key = (os.getpid(), emulator)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            if emulator and emulator != "default":
                _CLIENTS[key] = storage.Client.create_anonymous_client()
            else:
                import google.auth.exceptions

                try:
                    _CLIENTS[key] = storage.Client()
                except google.auth.exceptions.DefaultCredentialsError as e:
                    raise ClaimError(
                        f"no Google credentials to write to Cloud Storage ({e}); run "
                        "`gcloud auth application-default login` or set "
                        "GOOGLE_APPLICATION_CREDENTIALS"
                    ) from e
        return _CLIENTS[key]


def _split(path: str) -> tuple[str, str]:
    bucket, _, prefix = path.split("://", 1)[1].partition("/")
    return bucket, f"{prefix}/{CLAIM_FILE}" if prefix else CLAIM_FILE


def _api_errors() -> tuple:
    """What a Cloud Storage request can fail with that is not a bug (requests' errors are
    OSErrors; google.auth's are raised for token refresh failures)."""
    import google.auth.exceptions
    from google.api_core import exceptions

    return exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError, OSError


class _GcsClaim(Claim):
    def __init__(self, path, holder, bucket, name, generation, ttl, renew):
        super().__init__(path, holder)
        self._bucket, self._name, self._generation = bucket, name, generation
        self._ttl, self._renew = ttl, renew
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"claim {path}", daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, path: str, holder: dict, ttl: float, renew: float) -> _GcsClaim:
        from google.api_core import exceptions

        bucket_name, name = _split(path)
        holder = {**holder, "ttl_seconds": ttl}
        data = json.dumps(holder).encode()
        try:
            bucket = _client().bucket(bucket_name)
            for _ in range(5):
                blob = bucket.blob(name)
                try:
                    blob.upload_from_string(data, "application/json", if_generation_match=0)
                    return cls(path, holder, bucket, name, blob.generation, ttl, renew)
                except exceptions.PreconditionFailed:
                    pass
                current = bucket.get_blob(name)
                if current is None:
                    continue  # released meanwhile: try again
                found = _holder_of(current)
                if found.get("token") == holder["token"]:  # a retried upload had succeeded
                    return cls(path, holder, bucket, name, current.generation, ttl, renew)
                expires = current.updated + datetime.timedelta(
                    seconds=_number(found.get("ttl_seconds"), TTL_SECONDS)
                )
                if expires > _now():
                    hint = (
                        f"; the claim expires at {_iso(expires)} unless its holder renews it"
                        f" ({path}/{CLAIM_FILE})"
                    )
                    raise ClaimedError(path, found, hint)
                _LOG.warning("taking over the expired claim on %s of %s", path, describe(found))
                blob = bucket.blob(name)
                try:
                    blob.upload_from_string(
                        data, "application/json", if_generation_match=current.generation
                    )
                    return cls(path, holder, bucket, name, blob.generation, ttl, renew)
                except exceptions.PreconditionFailed:
                    continue  # another claimant was faster
        except exceptions.Forbidden as e:
            raise ClaimError(f"cannot write to {path}: permission denied ({e.message})") from e
        except exceptions.NotFound as e:
            raise ClaimError(f"cannot write to {path}: no such bucket ({e.message})") from e
        raise ClaimError(f"{path}: could not claim it, its claim keeps changing hands")

    def _keep(self) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(self._renew):
            blob = self._bucket.blob(self._name)
            renewed = {**self.holder, "renewed": _iso(_now())}
            try:
                blob.upload_from_string(
                    json.dumps(renewed).encode(),
                    "application/json",
                    if_generation_match=self._generation,
                )
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                self._lost = "another process replaced it (it had expired)"
                _LOG.error("lost the claim on %s: %s", self.path, self._lost)
                return
            except _api_errors() as e:  # retried at the next tick; check() sees the expiry
                _LOG.warning("could not renew the claim on %s (will retry): %s", self.path, e)
                continue
            self._generation, self._renewed = blob.generation, time.monotonic()

    def check(self) -> None:
        if self._lost is None and time.monotonic() - self._renewed > self._ttl:
            self._lost = f"not renewed for {self._ttl:g} s (it expired)"
        if self._lost is not None:
            raise ClaimLostError(f"lost the claim on {self.path}: {self._lost}")

    def release(self) -> None:
        if self._stop.is_set():
            return
        from google.api_core import exceptions

        self._stop.set()
        self._thread.join()
        if self._lost is not None:
            return
        try:
            self._bucket.blob(self._name).delete(if_generation_match=self._generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            pass  # lost meanwhile: nothing of ours to remove
        except _api_errors() as e:
            _LOG.warning(
                "could not remove the claim on %s (it expires in %g s): %s", self.path, self._ttl, e
            )


def _holder_of(blob) -> dict:
    """The JSON a claim object holds ({} when unreadable: the claim still counts)."""
    from google.api_core import exceptions

    try:
        found = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
    except (exceptions.PreconditionFailed, exceptions.NotFound, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _number(value, default: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if 0 < value < float("inf") else default
