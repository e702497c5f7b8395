"""pipeline/graph.py: which transforms the flags assemble, and the results files' footer.

The graph is only built here, not run (tests/test_main.py and tests/test_infer.py run it).
"""

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PipelineVisitor

from pipeline.graph import build, footer_metadata
from pipeline.options import JobOptions
from transforms.decode import DecodeAndResize
from transforms.infer import ModelInfo

MODEL = ModelInfo(
    num_classes=21843,
    embedding_dim=8,
    metadata={
        "tags_model": "tags.npz",
        "embed_model": "embed.npz",
        "label_set": "imagenet21k-bit-2019",
    },
)


class _Labels(PipelineVisitor):
    def __init__(self):
        self.nodes = {}

    def enter_composite_transform(self, node):
        self.nodes[node.full_label] = node.transform

    def visit_transform(self, node):
        self.nodes[node.full_label] = node.transform


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not decoded while building")
    return str(tmp_path / "*.jpg")


def assemble(inputs, tmp_path, *extra):
    opts = PipelineOptions(["--input", inputs, "--output", str(tmp_path / "out"), *extra]).view_as(
        JobOptions
    )
    p = beam.Pipeline()
    written = build(p, opts, MODEL)
    visitor = _Labels()
    p.visit(visitor)
    return visitor.nodes, written


def test_default_graph(inputs, tmp_path):
    nodes, written = assemble(inputs, tmp_path)
    top = {label for label in nodes if label and "/" not in label}
    assert top == {
        "Read",
        "Decode",
        "Infer",
        "AllFailures",
        "FailureBatches",
        "WriteResults",
        "WriteFailures",
        "Sample",  # report.html's contact sheet
        "ProgressRead",  # live progress of an in-process run
        "ProgressReadFailures",
        "ProgressDone",
        "ProgressFailed",
    }
    decode_steps = [t for label, t in nodes.items() if label.startswith("Decode/")]
    assert any(isinstance(getattr(t, "fn", None), DecodeAndResize) for t in decode_steps)
    assert "Decode/Batch" not in nodes  # decoded inline, no thread pool
    assert all(isinstance(w, beam.pvalue.PCollection) for w in written)


def test_decode_threads_prefetch_and_skip_keys_add_their_steps(inputs, tmp_path):
    nodes, _ = assemble(
        inputs,
        tmp_path,
        "--decode_threads",
        "2",
        "--skip_keys_from",
        str(tmp_path / "old" / "results-*.parquet"),
    )
    assert "SkipKnownKeys" in nodes and "Decode/DecodeAhead" in nodes
    assert "Decode/Batch" in nodes  # prefetching decodes whole batches


def test_input_matching_nothing_fails_while_building(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        assemble(str(tmp_path / "none-*.jpg"), tmp_path)


def test_footer_metadata_records_models_and_preprocessing():
    opts = PipelineOptions(
        ["--image_size", "96", "--resize", "center_crop", "--top_k", "4", "--normalize_embeddings"]
    ).view_as(JobOptions)
    meta = footer_metadata(opts, MODEL)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert {k: meta[k] for k in MODEL.metadata} == MODEL.metadata
    assert (meta["image_size"], meta["top_k"], meta["normalize_embeddings"]) == ("96", "4", "true")
    assert "center_crop" in meta["preprocessing"] and "96x96" in meta["preprocessing"]
    assert meta["embedding_dtype"] == "float32" and meta["min_score"] == "0.0"
