"""Entry point: parse flags, check models and output, run the graph, write `summary.json`.

`run()` follows Beam's examples (`run(argv=None, save_main_session=True, test_pipeline=None)`) so
tests run the real graph; `main()` turns the run's outcome into the process exit code.
"""

import argparse
import contextlib
import logging
import os
import platform
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
)

from core import console
from core.claim import ClaimedError, claim
from core.errors import JobFailed, UsageError, exit_code
from core.outputs import incomplete_message
from pipeline import report
from pipeline.graph import build
from pipeline.options import JobOptions, check_flags, job_flags
from transforms import gcs, infer, outputs, progress, skip
from transforms.read import split_patterns

_LOG = logging.getLogger("pipeline")
PROG = "python -m pipeline"
# Checked by `run` itself: Beam parses every registered options class for every pipeline.
REQUIRED_FLAGS = ("input", "output")


def parser() -> argparse.ArgumentParser:
    """The job's flags as one argparse parser (for `--help` and docs/options.md; Beam parses the
    real command line through `JobOptions`)."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Tag and embed images with BiT: reads image shards, writes Parquet rows of "
        "ImageNet-21k tags (BiT-M R50x1) and embeddings (BiT-M R101x3).",
        epilog="Any Apache Beam pipeline flag is accepted too: --runner (default: an in-process "
        "runner), --direct_num_workers N --direct_running_mode multi_processing to use N "
        "cores locally, Dataflow's --project/--region/--temp_location, ...",
    )
    JobOptions._add_argparse_args(ap)
    return ap


def _in_process(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    direct = options.view_as(DirectOptions)
    return runner is None and direct.direct_running_mode != "multi_processing"


def _make_pipeline(options: PipelineOptions, test_pipeline) -> beam.Pipeline:
    if test_pipeline is not None:
        return test_pipeline
    if options.view_as(StandardOptions).runner is None:
        # Beam's default DirectRunner first tries to download Prism; run in-process instead.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


def describe_models(opts: JobOptions, keep_loaded: bool) -> infer.ModelInfo:
    """Loads both models once before any image is read, so model faults fail fast."""
    return infer.check_models(infer.InferenceConfig.from_options(opts), keep_loaded=keep_loaded)


def check_pca_basis(opts: JobOptions, model: infer.ModelInfo):
    """The `--pca_basis` file, loaded and checked against the embed model (None without one)."""
    if not opts.pca_basis:
        return None
    from model.pca import PcaBasisError, load_basis

    try:
        basis = load_basis(opts.pca_basis)
    except PcaBasisError as exc:
        raise UsageError(f"--pca_basis: {exc}") from exc
    if basis.input_dim != model.embedding_dim:
        raise UsageError(
            f"--pca_basis {opts.pca_basis} reduces {basis.input_dim}-d embeddings, "
            f"but the embed model {opts.embed_model} gives {model.embedding_dim}-d "
            "ones: fit a basis on this model's outputs (./run.sh fit_pca)"
        )
    return basis


def check_skip_sources(opts: JobOptions) -> None:
    """Warns about `--skip_keys_from` files of a run that did not commit (no summary.json next to
    them): their rows are real results, so their keys are skipped, but that run's failures were
    never recorded; its images without a result row are tagged again by this run."""
    if not opts.skip_keys_from:
        return
    folders = sorted(
        {
            path.rsplit("/", 1)[0]
            for pattern in split_patterns(opts.skip_keys_from)
            for path in outputs.list_files(pattern)
        }
    )
    for folder in folders:
        if outputs.run_state(folder) == outputs.INCOMPLETE:
            _LOG.warning(
                "--skip_keys_from: %s; its results are skipped as known keys, its other images "
                "are tagged again",
                incomplete_message(folder),
            )


def _output_path(output: str) -> str:
    output = output.rstrip("/")
    if "://" in output:
        return output
    return os.path.abspath(os.path.expanduser(output))


def run(argv=None, save_main_session=True, test_pipeline=None, console_stream=None) -> dict:
    """Runs the job to completion and returns its summary (also written to OUTPUT/summary.json).

    The run claims OUTPUT first (a second run into it is refused), writes into a staging
    directory under it, and replaces the previous run only when it commits (transforms/outputs.py,
    docs/outputs.md). console_stream: where the live progress bar goes (default stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(parser().format_help())
        return {}
    check_flags(argv)
    gcs.configure_beam_gcs()
    options = PipelineOptions(argv)
    opts = options.view_as(JobOptions)
    missing = [flag for flag in REQUIRED_FLAGS if not getattr(opts, flag)]
    if missing:
        raise UsageError(
            "missing required flag(s): " + ", ".join(f"--{m}" for m in missing) + " (see --help)"
        )
    options.view_as(SetupOptions).save_main_session = save_main_session
    output = _output_path(opts.output)
    try:
        held = claim(output, "a bit-tagger run")
    except ClaimedError as exc:
        raise UsageError(
            f"--output {exc}: wait for it to finish, or choose another --output"
        ) from None
    with held:
        summary = _run_claimed(options, opts, output, held, test_pipeline, console_stream)
    console.summary(summary, output)
    if summary["failure_rate"] > opts.max_failure_rate:
        raise JobFailed(
            f"{summary['failures']} of {summary['inputs']} images failed "
            f"({summary['failure_rate']:.1%}), over --max_failure_rate "
            f"{opts.max_failure_rate:.1%}; see {output}/failures-*.parquet"
        )
    return summary


def _run_claimed(options, opts, output, held, test_pipeline, console_stream) -> dict:
    """The run, once OUTPUT is claimed: every check before anything is written, the graph into
    the staging directory, the commit; the staging directory removed if anything fails."""
    outputs.recover(output)
    if outputs.check_previous(output, overwrite=opts.overwrite):
        _LOG.info("the previous run in %s is replaced when this one commits", output)
    started = time.time()
    model = describe_models(opts, keep_loaded=test_pipeline is not None or _in_process(options))
    _LOG.debug("models ready: %s", model.metadata)
    flags = job_flags(options)
    console.header(
        split_patterns(opts.input), output, flags["runner"], model.metadata, model.group_norm
    )
    basis = check_pca_basis(opts, model)
    check_skip_sources(opts)
    staging = outputs.staging_dir(output, held.token)
    # The known keys' work files go under --temp_location, or into the staging directory (every
    # worker can write there, and a failed run's staging directory is removed whole).
    known_keys_dir = skip.work_dir(options, staging) if opts.skip_keys_from else None
    p = _make_pipeline(options, test_pipeline)
    try:
        build(p, opts, model, basis, output=staging, known_keys_dir=known_keys_dir)
    except ValueError as exc:  # flags the graph cannot be built from (e.g. globs matching nothing)
        raise UsageError(str(exc)) from exc
    outputs.create_staging(output, held.token)
    try:
        summary = _run_graph(p, options, opts, staging, console_stream, started, known_keys_dir)
        summary.update(
            {
                "run_id": held.token,
                "options": flags,
                "models": model.metadata,
                "versions": {
                    "python": platform.python_version(),
                    "apache_beam": beam.__version__,
                    **infer.library_versions(),
                },
            }
        )
        held.check()  # still ours: nobody else took the output over meanwhile
        outputs.commit(output, staging, summary)
    except BaseException as exc:
        if not outputs.committing(staging):
            outputs.discard(staging)
        if outputs.disk_full(exc):
            raise outputs.OutputError(
                f"no space left on the device of {output}: the run's temporary files were "
                "removed; free some space or choose another --output"
            ) from exc
        raise
    try:
        report.write_report(output)
    except report.REPORT_ERRORS as exc:  # the committed outputs are complete without it
        _LOG.warning("could not write %s/report.html: %s", output, exc)
    return summary


def _run_graph(
    p, options, opts, staging: str, console_stream, started: float, known_keys_dir
) -> dict:
    sink = progress.activate(skipping=bool(opts.skip_keys_from)) if _in_process(options) else None
    try:
        with (
            console.LiveProgress(sink, opts.log_every_secs, console_stream)
            if sink
            else contextlib.nullcontext()
        ):
            result = p.run()
            result.wait_until_finish()
    finally:
        progress.deactivate()
        if known_keys_dir:
            skip.remove_work_dir(known_keys_dir)
    return outputs.summarize(staging, result.metrics(), wall_seconds=time.time() - started)


def main(argv: Optional[list] = None) -> int:
    """Console entry point; returns the exit code (`core.errors.exit_code`; docs/outputs.md,
    "Exit codes")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: _run_with_console(argv), PROG)


def _run_with_console(argv: list) -> None:
    """Sets up the console (core/console.py) before TensorFlow is imported: at the default
    verbosity its C++ start-up lines are filtered out of stderr."""
    level, argv = console.split_verbosity(argv)
    if level in ("DEBUG", "INFO"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if level is not None:
        console.configure_logging(level)
        run(argv)
        return
    with console.NativeStderrFilter(console.native_noise()) as native:
        console.configure_logging(None, native.stream)
        try:
            run(argv, console_stream=native.stream)
        finally:
            console.configure_logging(None)  # the filtered stream closes with the filter
