"""Batched BiT inference: a Beam `ModelHandler` for `TagAndEmbedModel`, Arrow record batches out.

Beam's `RunInference` loads the model once per worker process (through `Shared`, or across processes
with `--model_copies`), batches with `BatchElements` at a fixed size and reports the inference batch
latency distribution. Our handler turns one batch of `Decoded` images into ONE `pyarrow.RecordBatch`
of result rows (top-k tags, embeddings) built from flat NumPy arrays: no per-image Python dicts on
the hot path. A batch the model cannot run becomes one `Failure` per image, never a crashed job;
an image whose outputs are not finite (NaN, infinity) becomes a `Failure` `NonFiniteOutput`, never
a result row.
"""

import logging
import os
import threading
import time
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, RunInference

from core.errors import UsageError
from model import DEFAULT_EMBED_MODEL, DEFAULT_TAGS_MODEL  # noqa: F401 (re-exported)
from transforms import counters, progress
from transforms.records import FAILURES, STAGE_INFERENCE, Decoded, Failure, error_text
from transforms.write import results_batch, top_k

NAMESPACE = counters.JOB_NAMESPACE
_LOG = logging.getLogger(__name__)


class InferenceConfig(NamedTuple):
    """Everything a worker needs to load the model and shape its output rows (picklable).

    Built from the job's flags by `from_options`, the one place that maps flags to it."""

    tags_model: str
    embed_model: str
    schema: pa.Schema
    batch_size: int = 16
    precision: str = "float32"
    jit_compile: bool = False
    cache_dir: Optional[str] = None
    top_k: int = 10
    min_score: float = 0.0
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    write_all_scores: bool = False
    log_every_secs: float = 30.0
    categories: bool = False
    categories_min_depth: int = 0
    pca_basis: Optional[str] = None

    @classmethod
    def from_options(cls, opts, schema: Optional[pa.Schema] = None) -> "InferenceConfig":
        """The config for the job's flags (`pipeline.options.JobOptions`); `schema` None is
        enough to load and check the models before the output schema is known."""
        return cls(
            tags_model=opts.tags_model,
            embed_model=opts.embed_model,
            schema=schema,
            batch_size=opts.batch_size,
            precision=opts.precision,
            jit_compile=opts.xla,
            cache_dir=opts.model_cache_dir,
            top_k=opts.top_k,
            min_score=opts.min_score,
            embedding_dtype=opts.embedding_dtype,
            normalize_embeddings=opts.normalize_embeddings,
            write_all_scores=opts.write_all_scores,
            log_every_secs=opts.log_every_secs,
            categories=not opts.no_categories,
            categories_min_depth=opts.categories_min_depth,
            pca_basis=opts.pca_basis,
        )


class ModelError(UsageError, RuntimeError):
    """A model source cannot serve the job (unreachable, corrupt, wrong architecture or head)."""


class ModelInfo(NamedTuple):
    num_classes: int
    embedding_dim: int
    metadata: dict
    group_norm: str = ""  # which GroupNorm the launcher's process runs (for the console header)


# Models loaded in this process, by (sources, precision, ...): the launcher's fail-fast check and an
# in-process runner's workers then share one copy instead of loading twice.
_LOADED = {}
_LOADED_LOCK = threading.Lock()


def _model_key(c: InferenceConfig):
    return (
        c.tags_model,
        c.embed_model,
        c.precision,
        c.jit_compile,
        c.batch_size,
        c.cache_dir,
        c.top_k,
        c.write_all_scores,
    )


def load_model(config: InferenceConfig, cached: bool = True):
    """`TagAndEmbedModel` for `config`, loaded once per process (`cached=False`: a new copy every
    call). It picks the top-k tags itself (on the device) and returns the full scores only when
    the job writes them."""
    from model.bit import TagAndEmbedModel  # TensorFlow is imported where models run only

    key = _model_key(config)
    with _LOADED_LOCK:
        if key not in _LOADED or not cached:
            model = TagAndEmbedModel.load(
                config.tags_model,
                config.embed_model,
                precision=config.precision,
                jit_compile=config.jit_compile,
                batch_size=config.batch_size,
                cache_dir=config.cache_dir,
                top_k=config.top_k,
                keep_scores=config.write_all_scores or not config.top_k,
            )
            _LOG.info(
                "models loaded in this process (pid %d); GroupNorm: %s",
                os.getpid(),
                model.group_norm(),
            )
            if not cached:
                return model
            _LOADED[key] = model
        return _LOADED[key]


def check_models(config: InferenceConfig, keep_loaded: bool = True) -> ModelInfo:
    """Loads both models and checks they fit the job, before any image is read (fail fast).

    Raises `ModelError` with the loader's message. With `keep_loaded`, the model stays cached for
    workers of this process (in-process runner)."""
    from model.labels import imagenet21k

    try:
        model = load_model(config)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"cannot load the models (--tags_model {config.tags_model}, "
            f"--embed_model {config.embed_model}): {error_text(exc)}"
        ) from exc
    labels = imagenet21k()
    if model.num_classes != len(labels):
        raise ModelError(
            f"the tags model {config.tags_model} has {model.num_classes} classes; "
            f"the job tags with the {len(labels)} ImageNet-21k classes (a BiT-M model)"
        )
    info = ModelInfo(
        model.num_classes,
        model.embedding_dim,
        {**model.metadata(), "label_set": labels.version},
        str(model.group_norm()),
    )
    if not keep_loaded:
        with _LOADED_LOCK:
            _LOADED.pop(_model_key(config), None)
    return info


_BASES = {}


def load_pca_basis(config: InferenceConfig):
    """The config's PCA basis (None without one), read once per process. A worker that reads a
    file other than the one the launcher checked (sha256 in the footer metadata) raises
    `ModelError` instead of mixing bases in one output."""
    if not config.pca_basis:
        return None
    from model.pca import load_basis

    with _LOADED_LOCK:
        if config.pca_basis not in _BASES:
            _BASES[config.pca_basis] = load_basis(config.pca_basis)
        basis = _BASES[config.pca_basis]
    want = (config.schema.metadata or {}).get(b"pca_basis_sha256") if config.schema else None
    if want is not None and basis.sha256 != want.decode():
        raise ModelError(
            f"the PCA basis {config.pca_basis} changed since the job started "
            f"(sha256 {basis.sha256}, expected {want.decode()})"
        )
    return basis


def library_versions() -> dict:
    """Versions of the numerical libraries, for summary.json."""
    import PIL
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "pillow": PIL.__version__,
    }


class _Progress:
    """Per-process progress: logs images done and images/s at a steady interval (worker processes;
    an in-process run's launcher shows the job's progress itself, see `transforms.progress`)."""

    def __init__(self, every_secs: float):
        self._every = every_secs
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()
        self._done = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            if self._every > 0 and now - self._last >= self._every and not progress.active():
                self._last = now
                elapsed = now - self._start
                _LOG.info(
                    "inference progress: %d images done, %.1f images/s (this worker)",
                    self._done,
                    self._done / elapsed if elapsed else 0.0,
                )


class NonFiniteOutput(ArithmeticError):
    """The model's outputs for an image are NaN or infinite (a failure row, never a result)."""

    def __init__(self):
        super().__init__(
            "the model's embedding or tag scores for this image are not finite (NaN or infinity)"
        )


def finite_rows(outputs) -> np.ndarray:
    """bool [B]: the images whose embedding and scores (all the model returned) are finite."""
    ok = np.isfinite(outputs.embeddings).all(axis=1)
    for scores in (outputs.top_scores, outputs.scores):
        if scores is not None:
            ok &= np.isfinite(scores).all(axis=1)
    return ok


def select_rows(outputs, rows: np.ndarray):
    """The model outputs (`model.bit.Outputs`) of the images `rows` selects."""
    return type(outputs)(*(None if a is None else a[rows] for a in outputs))


def postprocess(
    batch: Sequence[Decoded],
    outputs,
    config: InferenceConfig,
    labels,
    hierarchy=None,
    basis=None,
) -> pa.RecordBatch:
    """Model outputs (`model.bit.Outputs`) of one batch -> one Arrow batch of result rows
    (ARCHITECTURE.md, "Outputs"). The top-k tags come from the model when it chose them (the job's
    model does), else from the full scores.

    `hierarchy` (`model.wordnet.Hierarchy`) gives the categories column, `basis`
    (`model.pca.PcaBasis`) the reduced embeddings: the projection of the embedding as written
    (normalised and cast as configured), so readers can reproduce it from the file."""
    want = min(config.top_k, len(labels.wnids))
    if outputs.top_indices is not None and outputs.top_indices.shape[1] >= want:
        indices, top_scores = outputs.top_indices[:, :want], outputs.top_scores[:, :want]
    elif outputs.scores is not None:
        indices, top_scores = top_k(outputs.scores, config.top_k)
    else:
        raise ValueError(f"the model gave neither its top-{want} tags nor all scores")
    embeddings = outputs.embeddings
    if config.normalize_embeddings:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, 1e-12)
    reduced = None
    if basis is not None:
        reduced = basis.project(embeddings.astype(config.embedding_dtype).astype(np.float32))
    return results_batch(
        keys=[d.key for d in batch],
        sources=[d.source for d in batch],
        source_offsets=[d.source_offset for d in batch],
        source_lengths=[d.source_length for d in batch],
        widths=np.fromiter((d.width for d in batch), np.int32, len(batch)),
        heights=np.fromiter((d.height for d in batch), np.int32, len(batch)),
        top_indices=indices,
        top_scores=top_scores,
        labels=labels,
        embeddings=embeddings,
        schema=config.schema,
        min_score=config.min_score,
        all_scores=outputs.scores if config.write_all_scores else None,
        hierarchy=hierarchy,
        categories_min_depth=config.categories_min_depth,
        embeddings_reduced=reduced,
    )


class BitModelHandler(ModelHandler[Decoded, pa.RecordBatch | Failure, Any]):
    """Loads `TagAndEmbedModel` once per worker and runs it on fixed-size batches of `Decoded`."""

    def __init__(self, config: InferenceConfig, model_copies: Optional[int] = None):
        super().__init__(
            min_batch_size=config.batch_size,
            max_batch_size=config.batch_size,
            model_copies=model_copies,
        )
        self._config = config
        self._labels = None
        self._hierarchy = None
        self._basis = None
        self._progress = None

    def _load_shaping_data(self):
        """Labels, WordNet hierarchy and PCA basis of this process (a model shared across
        processes is loaded by one of them only, so run_inference calls this too)."""
        from model.labels import imagenet21k

        self._labels = imagenet21k()
        if self._config.categories:
            from model.wordnet import imagenet21k_hierarchy

            self._hierarchy = imagenet21k_hierarchy()
        self._basis = load_pca_basis(self._config)

    def load_model(self):
        """The model for this worker. With `--model_copies N` > 1, Beam calls this once per copy,
        all in the one process that hosts the shared copies: each call loads its own copy (the
        per-process cache would hand out one model N times)."""
        self._load_shaping_data()
        return load_model(self._config, cached=self.model_copies() == 1)

    def run_inference(
        self, batch: Sequence[Decoded], model, inference_args=None
    ) -> Iterable[pa.RecordBatch | Failure]:
        if self._labels is None:
            self._load_shaping_data()
        if self._progress is None:
            self._progress = _Progress(self._config.log_every_secs)
        try:
            images = np.stack([d.pixels for d in batch])
            outputs = model(images)
            finite = finite_rows(outputs)
            kept = [d for d, ok in zip(batch, finite) if ok]
            rows = None
            if kept:
                rows = postprocess(
                    kept,
                    outputs if len(kept) == len(batch) else select_rows(outputs, finite),
                    self._config,
                    self._labels,
                    self._hierarchy,
                    self._basis,
                )
        except Exception as exc:  # noqa: BLE001
            # One failure row per image: the job goes on and the user learns why.
            _LOG.warning("inference failed for a batch of %d images: %s", len(batch), exc)
            return [Failure(d.key, d.source, STAGE_INFERENCE, error_text(exc)) for d in batch]
        self._progress.add(len(batch))
        failed = [
            Failure(d.key, d.source, STAGE_INFERENCE, error_text(NonFiniteOutput()))
            for d, ok in zip(batch, finite)
            if not ok
        ]
        if failed:
            _LOG.warning(
                "%d images of a batch of %d gave non-finite outputs", len(failed), len(batch)
            )
        return ([rows] if rows is not None else []) + failed

    def get_num_bytes(self, batch: Sequence[Decoded]) -> int:
        return sum(d.pixels.nbytes for d in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class _SplitOutputs(beam.DoFn):
    """Routes record batches to the main output and failures to the FAILURES tag, with counters."""

    def __init__(self):
        self._inferred = counters.INFERRED_IMAGES.metric()
        self._failed = counters.INFERENCE_FAILURES.metric()

    def process(self, element):
        if isinstance(element, Failure):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES, element)
        else:
            self._inferred.inc(element.num_rows)
            yield element


class InferTagsAndEmbeddings(beam.PTransform):
    """PCollection[Decoded] -> (PCollection[pa.RecordBatch] of results, PCollection[Failure])."""

    def __init__(self, config: InferenceConfig, model_copies: Optional[int] = None):
        super().__init__()
        self._handler = BitModelHandler(config, model_copies=model_copies)

    def expand(self, decoded):
        outputs = (
            decoded
            | "RunInference" >> RunInference(self._handler)
            | "Split" >> beam.ParDo(_SplitOutputs()).with_outputs(FAILURES, main="results")
        )
        return outputs.results, outputs[FAILURES]
