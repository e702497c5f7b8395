"""core/schema.py: the results and failures schemas, as docs/output-schema.md lists them."""

import pyarrow as pa
import pytest

from core.schema import failures_schema, results_schema

META = {"embed_model": "gs://bit_models/BiT-M-R101x3.npz", "image_size": "224", "top_k": "10"}


def test_results_schema_matches_design():
    s = results_schema(6144)
    assert s.names == [
        *("key", "source", "source_offset", "source_length"),
        *("width", "height", "tags", "embedding"),
    ]
    assert s.field("key").type == pa.string() and not s.field("key").nullable
    assert s.field("source").type == pa.string()
    for name in ("source_offset", "source_length"):  # null where unknown (compressed shards)
        assert s.field(name).type == pa.int64() and s.field(name).nullable
    assert s.field("width").type == pa.int32() and s.field("height").type == pa.int32()
    tags = s.field("tags").type
    assert pa.types.is_list(tags) and not pa.types.is_large_list(tags)
    assert tags.value_field.name == "element"  # what compliant Parquet readers give back
    assert tags.value_type == pa.struct(
        [
            ("index", pa.int32()),
            ("wnid", pa.string()),
            ("label", pa.string()),
            ("score", pa.float32()),
        ]
    )
    emb = s.field("embedding").type
    assert pa.types.is_fixed_size_list(emb)
    assert emb.list_size == 6144 and emb.value_type == pa.float32()
    assert s.metadata is None


def test_results_schema_options():
    s = results_schema(8, "float16", write_all_scores=True, num_classes=21843, metadata=META)
    assert s.field("embedding").type.value_type == pa.float16()
    assert s.field("embedding").type.list_size == 8
    assert s.names[-1] == "scores"
    assert pa.types.is_fixed_size_list(s.field("scores").type)
    assert s.field("scores").type.value_type == pa.float16()
    assert s.field("scores").type.list_size == 21843
    assert {k.decode(): v.decode() for k, v in s.metadata.items()} == META
    with pytest.raises(ValueError):
        results_schema(8, "bfloat16")
    with pytest.raises(TypeError):
        results_schema(8, metadata={"image_size": 224})


def test_failures_schema():
    s = failures_schema()
    assert s.names == ["key", "source", "stage", "error"]
    assert all(f.type == pa.string() for f in s)
    assert not s.field("key").nullable and s.field("source").nullable


def test_lists_use_the_compliant_item_name_and_categories_their_struct():
    s = results_schema(4, categories=True, reduced_dim=2)
    assert s.names == [
        *("key", "source", "source_offset", "source_length", "width", "height"),
        *("tags", "categories", "embedding", "embedding_reduced"),
    ]
    categories = s.field("categories").type
    assert categories.value_field.name == "element"
    assert [f.name for f in categories.value_type] == ["wnid", "label", "score"]
    reduced = s.field("embedding_reduced").type
    assert reduced.list_size == 2 and reduced.value_type == pa.float32()
    with pytest.raises(ValueError):
        results_schema(4, reduced_dim=0)
