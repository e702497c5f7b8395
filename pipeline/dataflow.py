"""Google Cloud Dataflow launcher: friendly flags in, the right Beam/Dataflow options out.

    python -m pipeline.dataflow --project P --region R --bucket gs://B \\
        --input 'gs://B/shards/*.tfrecord' --output gs://B/tags/2024-06-01 [job flags] \\
        [--cpu_only] [--container_image IMG] [--machine_type g2-standard-8] \\
        [--gpu_type nvidia-l4] \\
        [--max_num_workers N] [--no_xla] [--dry_run_job_file job.json]

(`./run.sh dataflow ...` runs exactly this.) Every other flag, the job's own (`--top_k`,
`--batch_size`, ...) and Beam's (`--job_name`, `--num_workers`, `--worker_zone`,
`--service_account_email`, ...), is passed through unchanged; a Beam flag given explicitly always
wins over the defaults added here.

What the defaults are and why (GPU mode, the default):
- `--runner DataflowRunner --experiments use_runner_v2`: GPUs and custom containers need Runner v2.
- `--dataflow_service_options worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver`:
  one L4 per worker VM, with Google installing the driver on the host (mounted into the container).
- `--machine_type g2-standard-8`: the G2 family is the only one that takes L4s (8 vCPU, 32 GB).
- `--sdk_container_image REGION-docker.pkg.dev/P/bit-tagger/bit-tagger-gpu:latest` (`Dockerfile` in
  the repo root): CUDA-enabled TensorFlow plus this project, so workers start without pip installs.
- `--experiments no_use_multiple_sdk_containers`: Dataflow otherwise starts one SDK process per vCPU
  (8 on a g2-standard-8), and each process would load its own R101x3 onto the single GPU: 8 copies
  of ~1.7 GB of weights plus 8 TensorFlow runtimes each reserving GPU memory, so out-of-memory or at
  best 8 processes time-slicing one GPU. With one SDK process per VM the model is loaded once and
  owns the GPU (Beam's `Shared` model in RunInference), while
- `--number_of_worker_harness_threads N` (N = the machine's vCPUs, 4..16) lets that one process
  decode N bundles at once: Pillow's decoder/resizer and TensorFlow release the GIL, so decoding
  overlaps inference; concurrent batches on the GPU are bounded by N x one batch of activations.
- `--disk_size_gb 50`: the GPU image is ~10 GB; the 25 GB boot disk Dataflow gives batch workers
  that use Dataflow Shuffle is too tight for pulling and unpacking it.
- `--xla` (unless `--no_xla`): XLA fuses GroupNorm and weight standardisation into few GPU kernels;
  float32 numerics stay float32 (only summation order changes). `--precision` is left at the job's
  default (float32): bfloat16 is roughly 2x faster on an L4 but changes embeddings by ~1e-2
  relative, so it is an explicit choice (`--precision bfloat16`), never a silent default; do not mix
  precisions in one embedding index.

CPU-only mode (`--cpu_only`): no accelerator, `--machine_type n2-highmem-8`, the stock Beam
container (Beam picks `apache/beam_python3.11_sdk:<version>`) with this project shipped by
`--setup_file` (workers pip-install it at start), or your `--container_image`. One SDK process per
VM too: it keeps one model in memory and TensorFlow's thread pools already use every core.

`--dry_run_job_file PATH` writes the Dataflow job description (the JSON the service would receive)
without staging or submitting anything; tests use `build_job_description` the same way with a
stand-in `ModelInfo`, so they need neither models nor network.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from core.args import integer
from core.errors import ArgumentParser, UsageError, exit_code
from core.text import PrintableFormatter

_LOG = logging.getLogger(__name__)

GPU_MACHINE_TYPE = "g2-standard-8"
CPU_MACHINE_TYPE = "n2-highmem-8"
GPU_TYPE = "nvidia-l4"
GPU_DISK_SIZE_GB = 50
IMAGE_REPOSITORY = "bit-tagger"  # Artifact Registry repository (docker format) in the job's project
IMAGE_NAME = "bit-tagger-gpu"
PROG = "python -m pipeline.dataflow"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Machine families that take GPUs, and which accelerator types each accepts.
_GPU_FAMILIES = {
    "g2": ("nvidia-l4",),
    "n1": ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100", "nvidia-tesla-p4"),
    "a2": ("nvidia-tesla-a100", "nvidia-a100-80gb"),
    "a3": ("nvidia-h100-80gb", "nvidia-h100-mega-80gb"),
}


def default_container_image(project: str, region: str) -> str:
    """Where docs/dataflow.md ("Running on Dataflow") pushes the GPU image (Artifact Registry)."""
    return f"{region}-docker.pkg.dev/{project}/{IMAGE_REPOSITORY}/{IMAGE_NAME}:latest"


class _Parser(ArgumentParser):
    """Errors raise `UsageError` (so `dataflow_args` can be called as a function); `main` reports
    it as one line, exit 2."""

    def error(self, message):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Submit the BiT tagging job to Google Cloud Dataflow (GPU workers by default).",
        epilog="Every other flag is passed on: the job's own (python -m pipeline --help) and any "
        "Beam/Dataflow flag (--job_name, --num_workers, --worker_zone, --network, "
        "--service_account_email, ...). A Beam flag given explicitly wins over the defaults "
        "described in pipeline/dataflow.py.",
    )
    parser.add_argument("--project", required=True, help="Google Cloud project that runs the job.")
    parser.add_argument(
        "--region",
        required=True,
        help="Dataflow region, e.g. us-central1 (must offer the chosen GPU).",
    )
    parser.add_argument(
        "--bucket",
        required=True,
        help="gs://BUCKET[/prefix] for Dataflow's temp/ and staging/ files.",
    )
    parser.add_argument(
        "--cpu_only",
        action="store_true",
        default=False,
        help=f"No GPU: {CPU_MACHINE_TYPE} workers, stock Beam container + "
        "setup.py (or --container_image).",
    )
    parser.add_argument(
        "--container_image",
        default=None,
        help="SDK container image for the workers (default in GPU mode: "
        + default_container_image("PROJECT", "REGION")
        + ").",
    )
    parser.add_argument(
        "--machine_type",
        default=None,
        help=f"Worker machine type (default {GPU_MACHINE_TYPE} with a GPU, "
        f"{CPU_MACHINE_TYPE} with --cpu_only).",
    )
    parser.add_argument(
        "--gpu_type",
        default=GPU_TYPE,
        help="Accelerator type, one per worker (nvidia-l4 goes with g2-* machines, "
        "nvidia-tesla-t4 with n1-*).",
    )
    parser.add_argument(
        "--max_num_workers",
        type=integer(1, 100_000),
        default=None,
        help="Autoscaling ceiling (also your GPU quota in the region). Default: Dataflow's.",
    )
    parser.add_argument(
        "--no_xla", action="store_true", default=False, help="Do not add --xla in GPU mode."
    )
    parser.add_argument(
        "--dry_run_job_file",
        default=None,
        help="Write the Dataflow job description JSON here and exit; nothing is "
        "staged or submitted (the models are still checked in this process).",
    )
    return parser


def _given(args: Sequence[str], *flags: str) -> bool:
    """Whether any of `flags` appears in `args` (as `--flag value` or `--flag=value`)."""
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def _values(args: Sequence[str], flag: str) -> List[str]:
    """All values given to a repeatable `flag` in `args`."""
    found = []
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            found.append(args[i + 1])
        elif a.startswith(flag + "="):
            found.append(a[len(flag) + 1 :])
    return found


def _vcpus(machine_type: str) -> int:
    """vCPUs of a predefined (`g2-standard-8`) or custom (`custom-8-32768`) machine type, else 8."""
    custom = re.match(r"^(?:[a-z0-9]+-)?custom-(\d+)-\d+", machine_type)
    if custom:
        return int(custom.group(1))
    predefined = re.search(r"-(\d+)$", machine_type)
    return int(predefined.group(1)) if predefined else 8


def worker_threads(machine_type: str) -> int:
    """Harness threads of the single SDK process: one per vCPU, at least 4, at most 16."""
    return max(4, min(16, _vcpus(machine_type)))


def _check_gpu_machine(machine_type: str, gpu_type: str) -> None:
    family = machine_type.split("-", 1)[0]
    if family in _GPU_FAMILIES:
        if gpu_type not in _GPU_FAMILIES[family]:
            raise UsageError(
                f"--machine_type {machine_type} cannot take --gpu_type {gpu_type}; "
                f"{family}-* machines take {', '.join(_GPU_FAMILIES[family])}"
            )
    elif family not in ("custom",):
        raise UsageError(
            f"--machine_type {machine_type}: the {family} family takes no GPUs; use "
            f"{GPU_MACHINE_TYPE} (nvidia-l4) or n1-standard-8 (nvidia-tesla-t4), "
            "or pass --cpu_only"
        )


def split_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(launcher flags, everything else) from the command line."""
    return _parser().parse_known_args(list(argv))


def dataflow_args(argv: Sequence[str]) -> List[str]:
    """Translates the launcher's command line into the job's full Beam command line (pure)."""
    args, rest = split_args(argv)
    if _given(rest, "--runner") and _values(rest, "--runner")[-1:] != ["DataflowRunner"]:
        raise UsageError(
            "pipeline.dataflow always uses --runner DataflowRunner; for other runners "
            "run `python -m pipeline --runner ...` (see docs/dataflow.md)"
        )
    name = args.bucket[len("gs://") :] if args.bucket.startswith("gs://") else args.bucket
    name = name.strip("/")
    if not re.match(r"^[a-z0-9][a-z0-9._-]{2,}(/|$)", name):
        raise UsageError(f"--bucket {args.bucket}: expected gs://BUCKET[/prefix]")
    bucket = "gs://" + name
    gpu = not args.cpu_only
    machine_type = args.machine_type or (GPU_MACHINE_TYPE if gpu else CPU_MACHINE_TYPE)
    if gpu:
        _check_gpu_machine(machine_type, args.gpu_type)
    image = args.container_image or (
        default_container_image(args.project, args.region) if gpu else None
    )

    out = ["--runner", "DataflowRunner", "--project", args.project, "--region", args.region]
    if not _given(rest, "--temp_location"):
        out += ["--temp_location", f"{bucket}/tmp"]
    if not _given(rest, "--staging_location"):
        out += ["--staging_location", f"{bucket}/staging"]
    out += [
        "--experiments",
        "use_runner_v2",
        "--experiments",
        "no_use_multiple_sdk_containers",
        "--machine_type",
        machine_type,
    ]
    if not _given(rest, "--number_of_worker_harness_threads"):
        out += ["--number_of_worker_harness_threads", str(worker_threads(machine_type))]
    if args.max_num_workers is not None:
        out += ["--max_num_workers", str(args.max_num_workers)]
    if image and not _given(rest, "--sdk_container_image", "--worker_harness_container_image"):
        out += ["--sdk_container_image", image]
    if not image and not _given(rest, "--setup_file", "--sdk_container_image"):
        setup_file = os.path.join(REPO_ROOT, "setup.py")
        if not os.path.isfile(setup_file):
            raise UsageError(
                f"no {setup_file}: run from a checkout of the project, or pass --container_image"
            )
        out += ["--setup_file", setup_file]
    if gpu:
        if not any(
            v.startswith("worker_accelerator=") for v in _values(rest, "--dataflow_service_options")
        ):
            out += [
                "--dataflow_service_options",
                f"worker_accelerator=type:{args.gpu_type};count:1;install-nvidia-driver",
            ]
        if not _given(rest, "--disk_size_gb"):
            out += ["--disk_size_gb", str(GPU_DISK_SIZE_GB)]
        if not args.no_xla and not _given(rest, "--xla"):
            out += ["--xla"]
    return out + rest


def build_job_description(
    beam_argv: Sequence[str], model_info=None, graph_builder: Optional[Callable] = None
) -> dict:
    """The Dataflow job description (dict) of `beam_argv`, built offline: nothing staged or sent.

    How (docs/dataflow-job-description.md): `dry_run` set before the Pipeline
    exists (so validation does not probe GCS), translate with `p.run()`, then the same
    `create_job_description` that `create_job` runs, with an anonymous client and staging disabled
    (`_staging_disabled`). `model_info` stands in for
    loading the models (tests); None loads them here, as a real launch does. `graph_builder(p, opts,
    model_info)` defaults to the job's `pipeline.graph.build`.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        PipelineOptions,
        SetupOptions,
        TestOptions,
    )
    from apache_beam.runners.dataflow.internal import apiclient

    from pipeline.options import JobOptions

    options = PipelineOptions(list(beam_argv))
    options.view_as(TestOptions).dry_run = True
    options.view_as(SetupOptions).save_main_session = False
    opts = options.view_as(JobOptions)
    if model_info is None:
        from pipeline.main import describe_models

        model_info = describe_models(opts, keep_loaded=False)
    if graph_builder is None:
        from pipeline.graph import build as graph_builder

    p = beam.Pipeline(options=options)
    graph_builder(p, opts, model_info)
    job = p.run().job

    job_options = job.options
    job_options.view_as(TestOptions).dry_run = False
    cloud = job_options.view_as(GoogleCloudOptions)
    no_auth, cloud.no_auth = cloud.no_auth, True
    try:
        client = apiclient.DataflowApplicationClient(job_options, job.root_staging_location)
    finally:
        cloud.no_auth = no_auth
    with _staging_disabled(client):
        client.create_job_description(job)
    return json.loads(job.json())


@contextlib.contextmanager
def _staging_disabled(client):
    """The seam of the offline job description: while active, `client` (a Beam
    `DataflowApplicationClient`, whose `create_job_description` uploads the pipeline proto and the
    packages through `stage_file_with_retry`) uploads nothing. Only this one client object is
    changed (an instance attribute shadows the method), and only inside the `with`."""
    client.stage_file_with_retry = lambda *args, **kwargs: None
    try:
        yield client
    finally:
        del client.stage_file_with_retry


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; exit codes as `python -m pipeline` (`core.errors`)."""
    handler = logging.StreamHandler()  # messages with user data: control characters escaped
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        _parser().print_help()
        return 0
    return exit_code(lambda: _launch(argv), PROG)


def _launch(argv: List[str]) -> None:
    args, _ = split_args(argv)
    beam_argv = dataflow_args(argv)
    _LOG.info("Dataflow options: %s", " ".join(beam_argv))
    if args.dry_run_job_file:
        description = build_job_description(beam_argv)
        with open(args.dry_run_job_file, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        _LOG.info("wrote the job description to %s (nothing submitted)", args.dry_run_job_file)
        return
    from pipeline import main as job_main

    # The project is installed on the workers (container or --setup_file): no main session.
    job_main.run(beam_argv, save_main_session=False)


if __name__ == "__main__":
    sys.exit(main())
