"""The output schema of the job (described in docs/output-schema.md): the Arrow schemas of
`results-*.parquet` and `failures-*.parquet`, defined once for the writer (`transforms.write`), the
search index (`search.index`) and the tests.

Lists use the compliant Parquet layout's item name, "element" (`list_type`), so the schema read
back from a file equals the schema written.
"""

from __future__ import annotations

from typing import Mapping, Optional

import pyarrow as pa

_EMBEDDING_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
# Where each image's bytes are in its input (ARCHITECTURE.md, "Outputs"): results written before
# these columns existed lack them, so readers of results treat them as optional.
SPAN_COLUMNS = ("source_offset", "source_length")


# ---------------------------------------------------------------------------------------- schemas


def tag_type() -> pa.StructType:
    """struct<index: int32, wnid: string, label: string, score: float32>, one predicted tag."""
    return pa.struct(
        [
            pa.field("index", pa.int32()),
            pa.field("wnid", pa.string()),
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
        ]
    )


def category_type() -> pa.StructType:
    """struct<wnid: string, label: string, score: float32>, one WordNet category of an image."""
    return pa.struct(
        [
            pa.field("wnid", pa.string()),
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
        ]
    )


def list_type(value_type: pa.DataType, size: int = -1) -> pa.DataType:
    """list / fixed_size_list with items named "element", the compliant Parquet list layout's
    name, so the schema read back from a file equals the schema written (pyarrow's "item" does not).
    """
    return pa.list_(pa.field("element", value_type), size)


def _metadata(metadata: Optional[Mapping[str, str]]) -> Optional[dict]:
    if not metadata:
        return None
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"Parquet footer metadata must be str -> str, got {k!r}: {v!r}")
    return dict(metadata)


def results_schema(
    embedding_dim: int,
    embedding_dtype: str = "float32",
    write_all_scores: bool = False,
    num_classes: int = 21843,
    metadata: Optional[Mapping[str, str]] = None,
    categories: bool = False,
    reduced_dim: Optional[int] = None,
) -> pa.Schema:
    """Schema of `results-*.parquet` (docs/output-schema.md). The optional columns follow the
    arguments: `categories`, `embedding_reduced` (`reduced_dim`), `scores` (`write_all_scores`).
    `source_offset`/`source_length` say where the image's bytes are in `source`'s file (the
    TFRecord record's data, the tar member's data, or the whole file; null in compressed shards).

    `metadata` (models, sha256, image size, preprocessing, label set; str -> str) becomes the
    schema metadata, which pyarrow writes into the Parquet footer's key-value metadata.
    """
    if embedding_dtype not in _EMBEDDING_TYPES:
        raise ValueError(
            f"embedding_dtype must be one of {sorted(_EMBEDDING_TYPES)}, got {embedding_dtype!r}"
        )
    if int(embedding_dim) <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_offset", pa.int64()),
        pa.field("source_length", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("tags", list_type(tag_type())),
    ]
    if categories:
        fields.append(pa.field("categories", list_type(category_type())))
    fields.append(
        pa.field("embedding", list_type(_EMBEDDING_TYPES[embedding_dtype], int(embedding_dim)))
    )
    if reduced_dim is not None:
        if int(reduced_dim) <= 0:
            raise ValueError(f"reduced_dim must be positive, got {reduced_dim}")
        fields.append(pa.field("embedding_reduced", list_type(pa.float32(), int(reduced_dim))))
    if write_all_scores:
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        fields.append(pa.field("scores", list_type(pa.float16(), int(num_classes))))
    return pa.schema(fields, metadata=_metadata(metadata))


def failures_schema(metadata: Optional[Mapping[str, str]] = None) -> pa.Schema:
    """Schema of `failures-*.parquet`: key (not null), source, stage, error."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("error", pa.string()),
        ],
        metadata=_metadata(metadata),
    )
