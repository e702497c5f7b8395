"""Command-line options of the job: a Beam `PipelineOptions` subclass with `--snake_case` flags.

Every Beam flag (`--runner`, `--direct_num_workers`, Dataflow's `--project` ...) works with these.
"""

import argparse

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from core import args
from core.errors import UsageError
from core.names import key_text
from transforms.entries import DEFAULT_MAX_INPUT_BYTES, IMAGE_EXTS
from transforms.infer import DEFAULT_EMBED_MODEL, DEFAULT_TAGS_MODEL
from transforms.read import TAR_EXTS, TFRECORD_EXTS

# Ranges of the numeric flags (a value outside is a usage error, exit 2, before anything runs).
MAX_TOP_K = 21843  # the ImageNet-21k classes
MAX_IMAGE_SIZE = 2048
MAX_BATCH_SIZE = 4096
MAX_SHARDS = 100_000
MAX_THREADS = 256
MAX_MODEL_COPIES = 64

_fraction = args.number(0.0, 1.0)
_non_negative = args.integer(0)
_positive = args.integer(1)


class JobOptions(PipelineOptions):
    """The tagging job's own flags (docs/options.md is generated from them: `./run.sh docs`).

    No flag is argparse-`required`: Beam parses every registered options class for every pipeline
    in the process, so `pipeline.main.run` checks `--input` and `--output` itself."""

    @classmethod
    def _add_argparse_args(cls, parser):
        inputs, outputs, preprocessing, models = (
            parser.add_argument_group(title)
            for title in ("inputs", "outputs", "preprocessing", "models")
        )
        inputs.add_argument(
            "--input",
            default=None,
            help="Comma-separated globs or folders of inputs, local or gs:// "
            "(e.g. 'gs://bucket/shards/*.tfrecord,~/photos/'). A folder means "
            "its files, recursively, whose extension --input_format reads; "
            "other files there (.txt, .json sidecars) are skipped and counted. A glob "
            "matching nothing is an error (exit 2), not an empty run.",
        )
        inputs.add_argument(
            "--input_format",
            default="auto",
            choices=["auto", "tfrecord", "webdataset", "images"],
            help="Input format; 'auto' decides per file by its extension: "
            f"{' '.join(TFRECORD_EXTS)} or -NNNNN-of-NNNNN shards are tfrecord, "
            f"{' '.join(TAR_EXTS)} webdataset, {' '.join(IMAGE_EXTS)} images; "
            "compressed shards (.gz .bz2 .xz .zst ...) are decompressed.",
        )
        inputs.add_argument(
            "--key_feature",
            default="image/encoded",
            help="tf.train.Example feature holding the encoded image (TFRecord inputs).",
        )
        inputs.add_argument(
            "--max_input_bytes",
            type=_positive,
            default=DEFAULT_MAX_INPUT_BYTES,
            help="Size limit of one input: an image file, a TFRecord record or a tar image "
            "member. A larger one is a failure row (stage read, InputTooLargeError) and its "
            "bytes are never read into memory. Default 268435456 (256 MiB).",
        )
        inputs.add_argument(
            "--skip_keys_from",
            default=None,
            help="Comma-separated globs of earlier results-*.parquet files (local or "
            "gs://): images whose key is there are skipped before decoding "
            "(incremental nightly runs). Earlier failures are retried: matched "
            "failures-*.parquet and samples.parquet files of this job are left out with a "
            "warning; any other file that is not a results file is an error (exit 2). "
            "Workers look keys up in one sorted file of 16-byte digests, by 4 KiB blocks: "
            "their memory does not grow with the known keys.",
        )

        outputs.add_argument(
            "--output",
            default=None,
            help="Output directory (local or gs://) for results-*.parquet, "
            "failures-*.parquet and summary.json. Claimed by the run (a second run into "
            "it exits 2 naming the first) and written through a staging folder, "
            "summary.json last.",
        )
        outputs.add_argument(
            "--overwrite",
            action="store_true",
            default=False,
            help="Replace an earlier run's results-*, failures-*, summary.json, "
            "samples.parquet and report.html in --output when this run commits. Without "
            "it the job refuses to start on an output holding a run; a run that fails "
            "leaves the earlier one as it was.",
        )
        outputs.add_argument(
            "--num_shards",
            type=args.integer(0, MAX_SHARDS),
            default=0,
            help="Number of results/failures files; 0 lets the runner decide.",
        )
        outputs.add_argument(
            "--top_k",
            type=args.integer(1, MAX_TOP_K),
            default=10,
            help="Number of tags kept per image (highest sigmoid scores first).",
        )
        outputs.add_argument(
            "--min_score",
            type=_fraction,
            default=0.0,
            help="Drop tags with a sigmoid score below this (0 keeps all top_k).",
        )
        outputs.add_argument(
            "--embedding_dtype",
            default="float32",
            choices=["float32", "float16"],
            help="Storage type of the embedding column (float16 halves it).",
        )
        outputs.add_argument(
            "--normalize_embeddings",
            action="store_true",
            default=False,
            help="L2-normalise embeddings (cosine search with a dot product).",
        )
        outputs.add_argument(
            "--write_all_scores",
            action="store_true",
            default=False,
            help="Also write all 21,843 sigmoid scores per image (float16 column "
            "'scores', ~44 KB a row). Without it the model picks the top-k on the device "
            "and only k scores an image come back.",
        )
        outputs.add_argument(
            "--no_categories",
            action="store_true",
            default=False,
            help="Do not write the 'categories' column (the tags rolled up the "
            "WordNet 3.0 noun hierarchy, for keyword search).",
        )
        outputs.add_argument(
            "--categories_min_depth",
            type=_non_negative,
            default=0,
            help="Drop categories shallower than this (depth: longest hypernym path "
            "from 'entity' = 0): 4 drops entity, physical_entity, abstraction, object and "
            "whole; 5 also artifact, living_thing and food.",
        )
        outputs.add_argument(
            "--pca_basis",
            default=None,
            help="PCA basis file from './run.sh fit_pca' (local or gs://; on Dataflow it "
            "must be on gs://): also write 'embedding_reduced' (centred, projected, "
            "L2-normalised). A missing or corrupt basis, or one whose input dimension is "
            "not the embed model's, is an error (exit 2) before any image is read.",
        )
        outputs.add_argument(
            "--max_failure_rate",
            type=_fraction,
            default=1.0,
            help="Exit with code 3 when failures / inputs exceeds this (for alerting). "
            "The outputs are written either way.",
        )

        preprocessing.add_argument(
            "--image_size",
            type=args.integer(8, MAX_IMAGE_SIZE),
            default=224,
            help="Images are resized to SIZE x SIZE before the model (BiT: 224).",
        )
        preprocessing.add_argument(
            "--resize",
            default="squash",
            choices=["squash", "center_crop"],
            help="'squash': bilinear resize to a square, as BiT evaluates; "
            "'center_crop': resize the short side, then crop the centre.",
        )
        preprocessing.add_argument(
            "--max_image_pixels",
            type=_positive,
            default=178956970,
            help="Refuse images with more pixels than this (decompression bombs).",
        )
        preprocessing.add_argument(
            "--decode_threads",
            type=args.integer(0, MAX_THREADS),
            default=0,
            help="Decode each batch in this many threads, one batch ahead of "
            "inference (overlaps decoding with the model); 0 decodes inline. On 2 cores "
            "it measured no gain (decoding is ~5%% of the job's CPU); try 2-4 on bigger "
            "machines and GPUs.",
        )

        models.add_argument(
            "--tags_model",
            default=DEFAULT_TAGS_MODEL,
            help="Tags model: BiT .npz checkpoint (local or gs://), TF Hub handle or "
            "SavedModel directory, with a 21,843-class ImageNet-21k head.",
        )
        models.add_argument(
            "--embed_model",
            default=DEFAULT_EMBED_MODEL,
            help="Embedding model (its pre-logits are the embedding); same kinds of "
            "source. The same source as --tags_model runs one forward pass.",
        )
        models.add_argument(
            "--model_cache_dir",
            default=None,
            help="Local cache for downloaded checkpoints (default ~/.cache/bit_tagger "
            "or $BIT_CACHE_DIR); written atomically, size- and sha256-checked.",
        )
        models.add_argument(
            "--batch_size",
            type=args.integer(1, MAX_BATCH_SIZE),
            default=16,
            help="Images per model call (fixed; the last batch is padded), so the model "
            "is traced once.",
        )
        models.add_argument(
            "--precision",
            default="float32",
            choices=["float32", "bfloat16", "float16"],
            help="Compute precision; bfloat16/float16 are for GPUs (bfloat16 also runs "
            "on CPUs with AVX512_BF16).",
        )
        models.add_argument(
            "--xla",
            action="store_true",
            default=False,
            help="Compile the model with XLA (jit_compile); helps on GPUs, measured "
            "slower on a 2-vCPU CPU.",
        )
        models.add_argument(
            "--model_copies",
            type=args.integer(1, MAX_MODEL_COPIES),
            default=None,
            help="Exact number of model copies per machine, shared across its "
            "processes (default: one per worker process). Each copy is loaded separately "
            "(e.g. 2 on one GPU overlap one copy's host work with the other's compute).",
        )
        models.add_argument(
            "--log_every_secs",
            type=args.number(0.0),
            default=30.0,
            help="Interval of the progress line when stderr is not a terminal (a live "
            "bar is shown when it is); 0 turns the periodic line off.",
        )
        models.add_argument(
            "--log_level",
            default=None,
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="Show every log line at this level, third-party ones included "
            "(-v = INFO, -vv = DEBUG). Default: the job's own lines and all "
            "warnings, without TensorFlow/Beam start-up noise.",
        )


def job_flags(options: PipelineOptions) -> dict:
    """The job's own flags and their values (plus the runner), for summary.json."""
    parser = argparse.ArgumentParser(add_help=False)
    JobOptions._add_argparse_args(parser)
    values = options.get_all_options()
    # A path that is not UTF-8 (surrogates from argv) as its escaped key text, so summary.json
    # and the report hold valid text (core/names.py).
    flags = {
        a.dest: key_text(v) if isinstance(v := values.get(a.dest), str) else v
        for a in parser._actions
    }
    flags["runner"] = str(options.view_as(StandardOptions).runner or "in-process (FnApiRunner)")
    return flags


class _FlagParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def check_flags(argv: list) -> None:
    """`UsageError` (one line, exit 2) for a job flag with a value of the wrong type or out of its
    range, before Beam parses the command line (Beam would print its whole usage block)."""
    parser = _FlagParser(add_help=False, allow_abbrev=False)
    JobOptions._add_argparse_args(parser)
    parser.parse_known_args(list(argv))
