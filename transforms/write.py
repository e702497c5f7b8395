"""Parquet output of the job (docs/output-schema.md): Arrow batches, Beam writers; the schemas are
`core.schema`'s.

Rows are built column-wise from flat NumPy arrays (no per-row Python objects), so building a batch
costs far less than writing it. Files are written by `ParquetSink`, a Beam `FileBasedSink` (as
Beam's `WriteToParquetBatched`, plus writer options Beam does not expose): every shard is written to
a temporary file and renamed when the write is finalised, so a run that dies half-way leaves no
complete-looking `results-*` / `failures-*` file behind.

Settings, and why:
- zstd (Arrow's default level 1): measured on 2,000 rows of non-negative (ReLU-pooled-like) 6144-d
  float32 embeddings, zstd files are ~92% of the raw size, snappy and lz4 ~100% (they gain nothing
  on float mantissas), at about the same write speed; zstd also compresses the string columns
  better. float16 embeddings: zstd ~91%, snappy 100%.
- Row groups of about `ROW_GROUP_BYTES` (64 MiB in memory, ~2,700 rows of 6144-d float32
  embeddings): big enough for efficient column scans, small enough for a reader to hold one.
- Dictionary encoding for the repetitive string columns only (source, tag and category wnids and
  labels, failure stage and error), not for keys or numbers (pyarrow's default is every column):
  a dictionary of float embeddings or unique keys never pays off, and trying it cost ~0.2 CPU ms an
  image (a quarter of the job's CPU outside the model at 224 px) and ~4% larger files.
- Standard (compliant) Parquet list layout (Beam's default is the legacy one; pyarrow's default
  is compliant), so every reader sees plain lists, and list items are named "element" in the Arrow
  schema, so `pq.read_schema(file)` equals the schema written.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from core.schema import failures_schema
from transforms.gcs import GcsDoFn
from transforms.records import Failure

__all__ = [
    "CODEC",
    "ROW_GROUP_BYTES",
    "SHARD_NAME_TEMPLATE",
    "FILE_NAME_SUFFIX",
    "KINDS",
    "top_k",
    "results_batch",
    "failures_batch",
    "RebatchTables",
    "dictionary_columns",
    "ParquetSink",
    "WriteParquet",
    "BatchFailures",
]

CODEC = "zstd"
ROW_GROUP_BYTES = 64 * 1024 * 1024
MAX_ROW_GROUP_ROWS = 1024 * 1024  # pyarrow's own cap
SHARD_NAME_TEMPLATE = "-SSSSS-of-NNNNN"
FILE_NAME_SUFFIX = ".parquet"
KINDS = ("results", "failures")


# ----------------------------------------------------------------------------------------- top-k


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of each row: (indices int32 [B, k], scores [B, k]), descending.

    Ties are broken by the lower class index, exactly (also at the k-th place, where a plain
    argpartition would pick an arbitrary tied class), so output is deterministic across runs.
    NaN scores rank below every number. k is clipped to the number of classes.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, K], got shape {scores.shape}")
    b, n = scores.shape
    k = max(0, min(int(k), n))
    if k == 0 or b == 0:
        return np.zeros((b, k), np.int32), np.zeros((b, k), scores.dtype)
    neg = -scores
    if np.isnan(neg).any():
        neg = np.where(np.isnan(neg), np.inf, neg)
    if k < n:
        cand = np.argpartition(neg, k - 1, axis=1)[:, :k]
    else:
        cand = np.broadcast_to(np.arange(n), (b, n)).copy()
    cand_neg = np.take_along_axis(neg, cand, axis=1)
    if k < n:
        # The k-th value t: every class above t is in `cand`; classes equal to t may have been
        # chosen arbitrarily. Redo the (rare) rows where some tied class was left out.
        t = cand_neg.max(axis=1, keepdims=True)
        ties_all = np.count_nonzero(neg == t, axis=1)
        ties_cand = np.count_nonzero(cand_neg == t, axis=1)
        bad = np.nonzero(ties_all > ties_cand)[0]
        if bad.size:
            nb, tb = neg[bad], t[bad]
            need = k - np.count_nonzero(nb < tb, axis=1, keepdims=True)
            eq = nb == tb
            keep = (nb < tb) | (eq & (np.cumsum(eq, axis=1) <= need))
            cand[bad] = np.nonzero(keep)[1].reshape(bad.size, k)  # ascending index per row
            cand_neg[bad] = np.take_along_axis(nb, cand[bad], axis=1)
    # Sort by (score desc, index asc): order by index first, then a stable sort by score.
    by_index = np.argsort(cand, axis=1, kind="stable")
    cand = np.take_along_axis(cand, by_index, axis=1)
    cand_neg = np.take_along_axis(cand_neg, by_index, axis=1)
    order = np.argsort(cand_neg, axis=1, kind="stable")
    indices = np.take_along_axis(cand, order, axis=1).astype(np.int32)
    return indices, np.take_along_axis(scores, indices, axis=1)


# --------------------------------------------------------------------------------- record batches

_LABEL_CACHE: dict = {}  # label-set version -> (wnids, labels) Arrow arrays


def _label_arrays(labels) -> tuple[pa.Array, pa.Array]:
    """(wnids, labels) as Arrow string arrays, converted once per label-set version (take() is
    then cheap); a label set without a `version` (hand-made in tests) is converted every time."""
    version = getattr(labels, "version", None)
    hit = _LABEL_CACHE.get(version) if version else None
    if hit is not None:
        return hit
    wnids = pa.array(np.asarray(labels.wnids, dtype=object), pa.string())
    names = pa.array(np.asarray(labels.labels, dtype=object), pa.string())
    if len(wnids) != len(names):
        raise ValueError(f"label set has {len(wnids)} wnids but {len(names)} labels")
    if version:
        _LABEL_CACHE[version] = (wnids, names)
    return wnids, names


def _fixed_size_list(values: np.ndarray, field: pa.Field, what: str, rows: int) -> pa.Array:
    """[B, D] NumPy -> fixed_size_list<T>[D] without a copy when dtype and layout already fit."""
    typ = field.type
    width, value_type = typ.list_size, typ.value_type
    values = np.asarray(values)
    if values.shape != (rows, width):
        raise ValueError(f"{what} must be [{rows}, {width}], got {values.shape}")
    # The NumPy dtype of an Arrow type without pandas (to_pandas_dtype imports pandas, which the
    # runtime lock does not install).
    dtype = pa.array([], type=value_type).to_numpy(zero_copy_only=False).dtype
    flat = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), type=typ)


def _is_descending(scores: np.ndarray) -> bool:
    return scores.shape[1] < 2 or bool(np.all(scores[:, 1:] <= scores[:, :-1]))


def _categories(hierarchy, offsets, classes, scores, min_depth, typ) -> pa.Array:
    """The `categories` list column of a batch (see `model.wordnet.Hierarchy.roll_up`)."""
    rolled = hierarchy.roll_up(offsets, classes, scores, min_depth=min_depth)
    wnids, names = _label_arrays(hierarchy)
    take = pa.array(rolled.ids)
    values = pa.StructArray.from_arrays(
        [wnids.take(take), names.take(take), pa.array(rolled.scores)], fields=list(typ.value_type)
    )
    return pa.ListArray.from_arrays(pa.array(rolled.offsets), values, type=typ)


def results_batch(
    keys: Sequence[str],
    sources: Sequence[str],
    widths,
    heights,
    top_indices: np.ndarray,
    top_scores: np.ndarray,
    labels,
    embeddings: np.ndarray,
    schema: pa.Schema,
    min_score: float = 0.0,
    all_scores: Optional[np.ndarray] = None,
    hierarchy=None,
    categories_min_depth: int = 0,
    embeddings_reduced: Optional[np.ndarray] = None,
    source_offsets: Optional[Sequence[Optional[int]]] = None,
    source_lengths: Optional[Sequence[Optional[int]]] = None,
) -> pa.RecordBatch:
    """One `results` record batch of B rows, built column-wise from NumPy arrays.

    top_indices int [B, k] and top_scores float32 [B, k] are the top-k tags (as from `top_k`);
    tags scoring below `min_score` (and NaN) are dropped, so rows can have fewer than k tags. Tags
    are re-sorted (score descending, index ascending) if the caller's are not. `labels` has
    `.wnids` / `.labels` indexable by class index. embeddings [B, D] are cast to the schema's
    dtype; all_scores [B, K] is required iff the schema has a `scores` column.
    `hierarchy` (a `model.wordnet.Hierarchy` over the same label set) is required iff the schema
    has a `categories` column: the kept tags rolled up the WordNet hierarchy, dropping synsets
    shallower than `categories_min_depth`; embeddings_reduced [B, N] iff it has
    `embedding_reduced`. source_offsets / source_lengths: where each image's bytes are in its
    source file (None items, or None for all: unknown, written as nulls).
    """
    b = len(keys)
    top_indices = np.asarray(top_indices)
    top_scores = np.asarray(top_scores, dtype=np.float32)
    if top_indices.ndim != 2 or top_indices.shape != top_scores.shape or top_indices.shape[0] != b:
        raise ValueError(
            f"top_indices {top_indices.shape} and top_scores {top_scores.shape} "
            f"must both be [{b}, k]"
        )
    spans = [
        pa.nulls(b, pa.int64()) if values is None else pa.array(values, pa.int64())
        for values in (source_offsets, source_lengths)
    ]
    if (
        len(sources) != b
        or len(widths) != b
        or len(heights) != b
        or any(len(a) != b for a in spans)
    ):
        raise ValueError(
            "keys, sources, source offsets and lengths, widths and heights must have the same "
            "length"
        )
    if not _is_descending(top_scores):
        # Row-wise lexsort, the last key primary: score descending, then index ascending.
        order = np.lexsort((top_indices, -top_scores))
        top_indices = np.take_along_axis(top_indices, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)

    keep = top_scores >= np.float32(min_score)  # False for NaN
    offsets = np.zeros(b + 1, np.int32)
    np.cumsum(np.count_nonzero(keep, axis=1), out=offsets[1:])
    flat_index = top_indices[keep].astype(np.int32)  # row-major: each row's order is kept
    flat_score = top_scores[keep]
    wnids, names = _label_arrays(labels)
    if flat_index.size and (flat_index.min() < 0 or flat_index.max() >= len(wnids)):
        raise ValueError(f"tag index out of range [0, {len(wnids)})")
    take = pa.array(flat_index)
    tags_type = schema.field("tags").type
    tag_values = pa.StructArray.from_arrays(
        [take, wnids.take(take), names.take(take), pa.array(flat_score)],
        fields=list(tags_type.value_type),
    )
    tags = pa.ListArray.from_arrays(pa.array(offsets), tag_values, type=tags_type)

    columns = [
        pa.array(keys, pa.string()),
        pa.array(sources, pa.string()),
        *spans,
        pa.array(np.asarray(widths, dtype=np.int32)),
        pa.array(np.asarray(heights, dtype=np.int32)),
        tags,
    ]
    if "categories" in schema.names:
        if hierarchy is None:
            raise ValueError("schema has a 'categories' column: pass the WordNet hierarchy")
        columns.append(
            _categories(
                hierarchy,
                offsets,
                flat_index,
                flat_score,
                categories_min_depth,
                schema.field("categories").type,
            )
        )
    columns.append(_fixed_size_list(embeddings, schema.field("embedding"), "embeddings", b))
    if "embedding_reduced" in schema.names:
        if embeddings_reduced is None:
            raise ValueError("schema has an 'embedding_reduced' column: pass embeddings_reduced")
        columns.append(
            _fixed_size_list(
                embeddings_reduced, schema.field("embedding_reduced"), "embeddings_reduced", b
            )
        )
    elif embeddings_reduced is not None:
        raise ValueError("embeddings_reduced given, but the schema has no 'embedding_reduced'")
    if "scores" in schema.names:
        if all_scores is None:
            raise ValueError("schema has a 'scores' column (write_all_scores): pass all_scores")
        columns.append(_fixed_size_list(all_scores, schema.field("scores"), "all_scores", b))
    elif all_scores is not None:
        raise ValueError("all_scores given but the schema has no 'scores' column")
    if columns[0].null_count:
        raise ValueError("key must not be null")
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def failures_batch(
    failures: Iterable[Failure], schema: Optional[pa.Schema] = None
) -> pa.RecordBatch:
    """`failures` record batch from `Failure` records."""
    schema = schema if schema is not None else failures_schema()
    failures = list(failures)
    if failures:
        keys, sources, stages, errors = zip(
            *((f.key, f.source, f.stage, f.error) for f in failures)
        )
    else:
        keys = sources = stages = errors = ()
    columns = [pa.array(c, pa.string()) for c in (keys, sources, stages, errors)]
    if columns[0].null_count:
        raise ValueError("failure key must not be null")
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# ------------------------------------------------------------------------------------ Beam writers


class RebatchTables(GcsDoFn):
    """Record batches / tables in, `pa.Table`s of about `row_group_bytes` out (one row group each).

    `ParquetSink` writes each element with one `write_table` call, i.e. one row group
    per element: inference batches (tens of rows) would give tiny row groups. Buffers within a
    bundle and concatenates without copying (`pa.Table.from_batches`). Empty inputs are dropped.
    """

    def __init__(self, schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES):
        self._schema = schema
        self._row_group_bytes = int(row_group_bytes)

    def start_bundle(self):
        self._batches, self._rows, self._bytes = [], 0, 0

    def _flush(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._rows, self._bytes = [], 0, 0
        return table

    def process(self, element: pa.RecordBatch | pa.Table):
        batches = element.to_batches() if isinstance(element, pa.Table) else [element]
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if not batch.schema.equals(self._schema, check_metadata=False):
                raise ValueError(
                    f"record batch schema does not match the output schema:\n"
                    f"{batch.schema}\nvs.\n{self._schema}"
                )
            self._batches.append(batch)
            self._rows += batch.num_rows
            self._bytes += batch.nbytes
            if self._bytes >= self._row_group_bytes or self._rows >= MAX_ROW_GROUP_ROWS:
                yield self._flush()

    def finish_bundle(self):
        if self._batches:
            yield GlobalWindows.windowed_value(self._flush())


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the string columns worth a dictionary: every string column, at any depth
    (list items are `<name>.list.element`), except `key`, which is unique per row."""

    def walk(name: str, typ: pa.DataType):
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            yield name
        elif pa.types.is_struct(typ):
            for field in typ:
                yield from walk(f"{name}.{field.name}", field.type)
        elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
            yield from walk(f"{name}.list.element", typ.value_type)

    return [
        path for field in schema if field.name != "key" for path in walk(field.name, field.type)
    ]


class _OpenParquet(NamedTuple):
    writer: pq.ParquetWriter
    handle: object  # the file object FileBasedSink.open gave


class ParquetSink(FileBasedSink):
    """Beam file sink writing each `pa.Table` element as one row group of a Parquet file.

    The same as Beam's `WriteToParquetBatched` sink (temporary files renamed at finalisation), with
    the job's writer settings: codec, compliant list layout, dictionaries for `dictionary_columns`.
    """

    def __init__(
        self,
        file_path_prefix: str,
        schema: pa.Schema,
        codec: str,
        num_shards: int,
        shard_name_template: str = SHARD_NAME_TEMPLATE,
        file_name_suffix: str = FILE_NAME_SUFFIX,
    ):
        super().__init__(
            file_path_prefix,
            coder=None,
            file_name_suffix=file_name_suffix,
            num_shards=num_shards,
            shard_name_template=shard_name_template,
            mime_type="application/x-parquet",
            compression_type=CompressionTypes.UNCOMPRESSED,  # Parquet compresses its pages
        )
        self._schema = schema
        self._codec = codec

    def writer_options(self) -> dict:
        """Keyword arguments of `pq.ParquetWriter` (besides the file and schema)."""
        return {
            "compression": self._codec,
            "use_compliant_nested_type": True,
            "use_dictionary": dictionary_columns(self._schema),
        }

    def open(self, temp_path) -> _OpenParquet:
        """The writer and the file under it, kept together: a sink may hold several open files."""
        handle = super().open(temp_path)
        return _OpenParquet(pq.ParquetWriter(handle, self._schema, **self.writer_options()), handle)

    def write_record(self, open_file: _OpenParquet, table: pa.Table):
        open_file.writer.write_table(table)

    def close(self, open_file: _OpenParquet):
        open_file.writer.close()  # writes the footer; the file object is ours to close
        open_file.handle.close()

    def display_data(self):
        return {**super().display_data(), "codec": self._codec}


class WriteParquet(beam.PTransform):
    """PCollection of `pa.RecordBatch` / `pa.Table` -> `OUTPUT/<kind>-SSSSS-of-NNNNN.parquet`.

    `output_prefix_path` is the output directory (local or gs://). `num_shards` 0 lets the runner
    decide (one file per bundle); N > 0 gives exactly N files. An empty PCollection still gives
    max(1, N) valid, empty files with the schema (Beam's finalisation writes empty shards up to
    that count unless the sink skips them; ours does not), so loaders and accounting always find
    `results-*` and `failures-*`. Files from an earlier run in the same directory are not removed.
    The schema's metadata is written to every file's footer, empty ones included.
    """

    def __init__(
        self,
        output_prefix_path: str,
        kind: str,
        schema: pa.Schema,
        num_shards: int = 0,
        codec: str = CODEC,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {num_shards}")
        self._prefix = FileSystems.join(output_prefix_path, kind)
        self._schema = schema
        self._num_shards = int(num_shards)
        self._codec = codec
        self._row_group_bytes = row_group_bytes

    def sink(self) -> ParquetSink:
        """The file sink with the job's settings (also used by bench/parquet_write.py)."""
        return ParquetSink(self._prefix, self._schema, self._codec, self._num_shards)

    def expand(self, pcoll):
        return (
            pcoll
            | "Rebatch" >> beam.ParDo(RebatchTables(self._schema, self._row_group_bytes))
            | "Write" >> beam.io.Write(self.sink())
        )


class BatchFailures(beam.PTransform):
    """PCollection of `Failure` -> `failures` record batches (BatchElements then failures_batch)."""

    def __init__(self, max_batch_size: int = 10_000, schema: Optional[pa.Schema] = None):
        super().__init__()
        self._max_batch_size = max_batch_size
        self._schema = schema

    def expand(self, pcoll):
        schema = self._schema
        return (
            pcoll
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._max_batch_size)
            | "ToRecordBatch" >> beam.Map(failures_batch, schema)
        )
