"""The job through Beam's portable job API, as Flink, Spark and Dataflow Runner v2 run it.

Beam's own Python job service and a worker pool run as two separate processes on 127.0.0.1; the job
is submitted with `--runner PortableRunner --environment_type EXTERNAL`, so the graph travels as a
pipeline proto, DoFns are pickled, side inputs (the known-key file, the duplicate-key losers)
and counters cross process boundaries. It must give the same rows and the same summary counts as
the in-process run of the same inputs.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.main import run
from tests import corpus, jobs

REPO = pathlib.Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240
COUNTS = (
    "inputs",
    "results",
    "failures",
    "skipped",
    "accounted",
    "failures_by_stage",
    "failures_by_type",
    "counters",
)

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Ends the process group started for `proc` (the service and any workers it forked)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # workers forked by the pool live in the same group and may outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def worker_env() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    # the pool starts each SDK worker as `python -c ...`: the first python on PATH must be ours
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(
        NO_GCE_CHECK="true",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


@pytest.fixture
def portable_services(tmp_path):
    """(job port, worker pool port) of Beam's job service and worker pool, stopped afterwards."""
    job_port, pool_port = free_port(), free_port()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("job_service", "worker_pool")}
    procs = []
    try:
        for name, cmd, port in (
            (
                "job_service",
                ["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
                job_port,
            ),
            (
                "worker_pool",
                ["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
                pool_port,
            ),
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", *cmd],
                cwd=REPO,
                env=worker_env(),
                stdout=logs[name],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(proc)
            wait_for_port(port, proc, name)
        yield job_port, pool_port
    finally:
        for proc in procs:
            stop(proc)
        for log in logs.values():
            log.close()


def write_inputs(root: pathlib.Path) -> tuple:
    """Two TFRecord shards: 12 images, one key in both shards, one broken image; plus earlier
    results that know two of the keys."""
    images = [corpus.make_jpeg(48 + 8 * (i % 3), 40, seed=i) for i in range(12)]
    inputs = root / "in"
    inputs.mkdir()
    corpus.write_tfrecord(
        inputs / "a-00000-of-00002.tfrecord",
        [(f"k{i:02d}", images[i]) for i in range(6)] + [("bad", b"not a jpeg")],
    )
    corpus.write_tfrecord(
        inputs / "a-00001-of-00002.tfrecord",
        [(f"k{i:02d}", images[i]) for i in range(6, 12)] + [("k03", images[0])],
    )
    earlier = root / "earlier"
    earlier.mkdir()
    corpus.write_results_keys(earlier / "results-00000-of-00001.parquet", ["k01", "k07", "gone"])
    return inputs / "*.tfrecord", earlier / "results-*.parquet"


def job_args(inputs, skip, output, models):
    """tests/jobs.py's command line at 32 px, skipping the keys of the earlier results `skip`."""
    return jobs.job_args(inputs, output, models, "--skip_keys_from", str(skip), image_size=32)


def rows(output: pathlib.Path, kind: str) -> list:
    tables = [pq.read_table(f) for f in sorted(output.glob(f"{kind}-*.parquet"))]
    assert tables, f"no {kind} files in {output}"
    table = pa.concat_tables(tables)
    return sorted(table.to_pylist(), key=lambda r: (r["key"], r.get("source") or ""))


def test_portable_runner_matches_the_in_process_run(models, portable_services, tmp_path):
    job_port, pool_port = portable_services
    inputs, skip = write_inputs(tmp_path)
    local = run(job_args(inputs, skip, tmp_path / "local", models), save_main_session=False)
    assert (local["results"], local["failures"], local["skipped"]) == (10, 2, 2)

    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        *job_args(inputs, skip, tmp_path / "portable", models),
        "--runner",
        "PortableRunner",
        "--job_endpoint",
        f"localhost:{job_port}",
        "--environment_type",
        "EXTERNAL",
        "--environment_config",
        f"localhost:{pool_port}",
    ]
    job = subprocess.run(
        cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert job.returncode == 0, job.stderr[-4000:]

    portable = json.loads((tmp_path / "portable" / "summary.json").read_text())
    assert {k: portable[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
    assert rows(tmp_path / "portable", "results") == rows(tmp_path / "local", "results")
    assert rows(tmp_path / "portable", "failures") == rows(tmp_path / "local", "failures")
