"""pipeline/dataflow.py: the Dataflow job description of the real graph, built offline.

The job is translated exactly as a launch would (docs/dataflow-job-description.md), with a
stand-in `ModelInfo` instead of loading the models, and every network connection refused: the tests
prove the GPU/CPU settings reach the JSON the Dataflow service would receive. `apiclient` is
Beam-internal API: written against apache-beam 2.77.0. Each description of the real graph costs a
few seconds of Beam translation, so each is built once per module.
"""

import json
import socket

import apache_beam as beam
import pytest

from pipeline import dataflow
from tests.jobs import DATAFLOW_LAUNCH
from transforms.infer import ModelInfo

IMAGE = "us-central1-docker.pkg.dev/my-test-project/bit-tagger/bit-tagger-gpu:latest"
ACCELERATOR = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
MODEL_INFO = ModelInfo(
    num_classes=21843,
    embedding_dim=6144,
    metadata={"tags_model": "stand-in", "embed_model": "stand-in"},
)


def _refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:] or kwargs}")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any connection or DNS lookup fails the test (metadata server, GCS, Dataflow, PyPI)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_GCE_CHECK", "true")
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket.socket, "connect_ex", _refuse)
        mp.setattr(socket, "getaddrinfo", _refuse)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Launcher flags with valid-looking names. ReadImages lists --input when the graph is built
    (fail fast), so the input is a local shard; the output stays on gs:// (not touched)."""
    shards = tmp_path_factory.mktemp("shards")
    (shards / "shard-0.tfrecord").write_bytes(b"")
    return [
        *DATAFLOW_LAUNCH,
        *("--input", str(shards / "*.tfrecord")),
        *("--output", "gs://my-test-bucket/tags/run1"),
    ]


def describe(argv, graph_builder=None):
    job = dataflow.build_job_description(dataflow.dataflow_args(argv), MODEL_INFO, graph_builder)
    env = job["environment"]
    return job, env, env["workerPools"][0], env["sdkPipelineOptions"]["options"]


def tiny_graph(p, opts, model_info):
    """Settings are runner-level: where the real graph adds nothing, a tiny one is cheaper."""
    return p | beam.Create([1]) | beam.Map(str)


# Skips Beam's `pip freeze` of the launcher environment (a second each) where it proves nothing.
NO_FREEZE = ["--experiments", "disable_logging_submission_environment"]


@pytest.fixture(scope="module")
def gpu_job(base, no_network):
    return describe(
        base + NO_FREEZE + ["--top_k", "5", "--num_workers", "2", "--max_num_workers", "16"]
    )


@pytest.fixture(scope="module")
def cpu_job(base, no_network):
    return describe(base + NO_FREEZE + ["--cpu_only"])


def test_gpu_job_description(gpu_job):
    job, env, pool, options = gpu_job
    assert job["name"] == "bit-tagger-test"
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(env["experiments"])
    assert "use_multiple_sdk_containers" not in env["experiments"]
    assert env["serviceOptions"] == [ACCELERATOR]
    assert pool["machineType"] == "g2-standard-8"
    assert pool["numThreadsPerWorker"] == 8
    assert pool["diskSizeGb"] == 50
    assert pool["numWorkers"] == 2 and pool["autoscalingSettings"]["maxNumWorkers"] == 16
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    assert env["tempStoragePrefix"].startswith("storage.googleapis.com/my-test-bucket/tmp")
    assert options["staging_location"].startswith("gs://my-test-bucket/staging")


def test_gpu_job_options_reach_the_workers(gpu_job):
    _, _, pool, options = gpu_job
    # The job's own flags travel to the workers, with XLA on and float32 kept.
    assert options["top_k"] == 5 and options["xla"] is True and options["precision"] == "float32"
    assert options["save_main_session"] is False
    # The launcher's own flags do not; the project is inside the container, nothing staged.
    assert not {
        "bucket",
        "cpu_only",
        "container_image",
        "gpu_type",
        "no_xla",
        "dry_run_job_file",
    } & set(options)
    assert "setup_file" not in options
    assert not pool.get("packages")


def test_cpu_only_job_description_has_no_gpu_settings(cpu_job):
    _, env, pool, options = cpu_job
    assert "use_runner_v2" in env["experiments"]
    assert not env.get("serviceOptions")
    assert not any("accelerator" in e for e in env["experiments"])
    assert pool["machineType"] == "n2-highmem-8"
    assert "diskSizeGb" not in pool
    image = pool["workerHarnessContainerImage"]
    assert "docker.pkg.dev" not in image and "beam_python3.11_sdk" in image  # Beam's own
    assert not options.get("xla")
    assert options["setup_file"].endswith("setup.py")
    assert [p["name"] for p in pool["packages"]] == ["workflow.tar.gz"]  # sdist of setup.py


def test_user_flags_win_over_defaults(base):
    _, env, pool, options = describe(
        base
        + [
            "--container_image",
            "europe-docker.pkg.dev/p/r/img:v7",
            "--machine_type",
            "g2-standard-16",
            "--number_of_worker_harness_threads",
            "3",
            "--no_xla",
            "--precision",
            "bfloat16",
            "--experiments",
            "shuffle_mode=service",
        ]
        + NO_FREEZE,
        graph_builder=tiny_graph,
    )
    assert pool["machineType"] == "g2-standard-16"
    assert pool["numThreadsPerWorker"] == 3
    assert pool["workerHarnessContainerImage"] == "europe-docker.pkg.dev/p/r/img:v7"
    assert {"shuffle_mode=service", "use_runner_v2"} <= set(env["experiments"])
    assert options["precision"] == "bfloat16" and not options.get("xla")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--machine_type", "n2-standard-8"], "takes no GPUs"),
        (["--machine_type", "n1-standard-8"], "cannot take --gpu_type nvidia-l4"),
        (["--runner", "FlinkRunner"], "DataflowRunner"),
        (["--bucket", "gs://"], "expected gs://BUCKET"),
        (["--bucket", "gs://b"], "expected gs://BUCKET"),
        (["--max_num_workers", "0"], "argument --max_num_workers: must be an integer between 1"),
        (["--max_num_workers", "many"], "argument --max_num_workers: must be an integer"),
    ],
)
def test_bad_combinations_are_usage_errors(base, extra, message):
    with pytest.raises(dataflow.UsageError, match=message):
        dataflow.dataflow_args(base + extra)
    assert dataflow.main(base + extra) == 2


@pytest.mark.parametrize(
    "machine_type, threads",
    [
        ("g2-standard-4", 4),
        ("g2-standard-8", 8),
        ("g2-standard-32", 16),
        ("n1-standard-2", 4),
        ("n1-custom-12-79872", 12),
        ("custom-6-20480", 6),
    ],
)
def test_worker_threads_follow_vcpus(machine_type, threads):
    assert dataflow.worker_threads(machine_type) == threads


def test_dry_run_job_file_submits_nothing(base, tmp_path, monkeypatch):
    """The command-line path: `--dry_run_job_file` writes the description and submits nothing."""
    real = dataflow.build_job_description
    monkeypatch.setattr(
        dataflow, "build_job_description", lambda argv: real(argv, MODEL_INFO, tiny_graph)
    )
    path = tmp_path / "job.json"
    assert dataflow.main(base + NO_FREEZE + ["--dry_run_job_file", str(path)]) == 0
    job = json.loads(path.read_text())
    assert job["environment"]["serviceOptions"] == [ACCELERATOR]
    assert job["name"] == "bit-tagger-test"


def test_a_missing_launcher_flag_is_one_line_and_exit_2(capsys):
    assert dataflow.main(["--project", "p", "--input", "x", "--output", "gs://b/o"]) == 2
    assert capsys.readouterr().err == (
        f"{dataflow.PROG}: error: the following arguments are required: --region, --bucket\n"
    )
