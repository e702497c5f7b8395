"""transforms/infer.py: the model handler, its failure path, and that path through the whole job.

A batch the model cannot run must become one inference failure row per image of exactly that
batch, and the job must go on with the other batches.
"""

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.schema import results_schema
from model.bit import TagAndEmbedModel
from model.labels import imagenet21k
from pipeline.main import run
from tests.jobs import job_args
from transforms import infer
from transforms.records import STAGE_INFERENCE, Decoded, Failure

NUM_IMAGES = 12
BATCH = 4
POISON = 5  # the image whose batch the model refuses


def solid_pngs(directory: pathlib.Path) -> dict:
    """Image i is one solid grey level 10 * i: its batch's keys can be read back off the pixels."""
    directory.mkdir()
    keys = {}
    for i in range(NUM_IMAGES):
        path = directory / f"img{i:02d}.png"
        Image.new("RGB", (40, 30), (10 * i,) * 3).save(path)
        keys[10 * i] = str(path)
    return keys


class RefusingModel:
    """Wraps TagAndEmbedModel.__call__: raises on the batch holding the POISON image, records it."""

    def __init__(self, monkeypatch):
        self.refused = []
        original = TagAndEmbedModel.__call__

        def call(model, images):
            levels = [int(img[0, 0, 0]) for img in images]
            if 10 * POISON in levels:
                self.refused.append(levels)
                raise RuntimeError("CUDA error: an illegal memory access (simulated)")
            return original(model, images)

        monkeypatch.setattr(TagAndEmbedModel, "__call__", call)


def test_a_batch_the_model_cannot_run_fails_exactly_its_images(models, tmp_path, monkeypatch):
    keys = solid_pngs(tmp_path / "in")
    refusing = RefusingModel(monkeypatch)
    out = tmp_path / "out"
    args = job_args(tmp_path / "in" / "*.png", out, models, batch_size=BATCH, image_size=32)
    summary = run(args, save_main_session=False)

    assert len(refusing.refused) == 1  # the job did not retry or stop: it went on
    failed_keys = {keys[level] for level in refusing.refused[0]}
    assert keys[10 * POISON] in failed_keys and 1 <= len(failed_keys) <= BATCH
    failures = pq.read_table(sorted(out.glob("failures-*.parquet"))).to_pylist()
    assert {f["key"] for f in failures} == failed_keys and len(failures) == len(failed_keys)
    assert all(f["stage"] == STAGE_INFERENCE for f in failures)
    assert all(
        f["error"] == "RuntimeError: CUDA error: an illegal memory access (simulated)"
        for f in failures
    )
    results = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("results-*.parquet"))])
    assert set(results.column("key").to_pylist()) == set(keys.values()) - failed_keys
    assert summary["accounted"] and summary["failures_by_stage"] == {"inference": len(failed_keys)}
    assert summary["counters"]["inference_failures"] == len(failed_keys)
    assert summary["counters"]["inferred_images"] == NUM_IMAGES - len(failed_keys)


def decoded(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Decoded(
            f"k{i}", f"s{i}", 50 + i, 60 + i, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def loaded(models):
    tags, embed = models
    config = infer.InferenceConfig(
        tags_model=tags, embed_model=embed, schema=None, batch_size=BATCH
    )
    info = infer.check_models(config)  # kept loaded: shared with the job run above
    schema = results_schema(
        info.embedding_dim, num_classes=info.num_classes, metadata=info.metadata
    )
    config = config._replace(schema=schema, top_k=3)
    handler = infer.BitModelHandler(config)
    return handler, handler.load_model()


def test_handler_gives_one_record_batch_with_top_k_tags(loaded):
    handler, model = loaded
    batch = decoded(3)
    (rows,) = handler.run_inference(batch, model)
    assert isinstance(rows, pa.RecordBatch) and rows.num_rows == 3
    assert rows.column("key").to_pylist() == ["k0", "k1", "k2"]
    assert rows.column("width").to_pylist() == [50, 51, 52]
    # The job's model picks the top-k itself and does not return all 21,843 scores ...
    assert model(np.stack([d.pixels for d in batch])).scores is None
    # ... so compare with the same network returning every score.
    full = infer.load_model(handler._config._replace(write_all_scores=True))
    scores = full(np.stack([d.pixels for d in batch])).scores
    for row, image_scores in zip(rows.column("tags").to_pylist(), scores):
        top = [t["score"] for t in row]
        np.testing.assert_allclose(top, np.sort(image_scores)[::-1][:3], rtol=1e-6)
        assert all(image_scores[t["index"]] == t["score"] for t in row)
    assert handler.get_num_bytes(batch) == 3 * 32 * 32 * 3


def test_postprocess_gives_the_same_rows_from_the_models_top_k_or_from_all_scores(loaded):
    handler, model = loaded
    batch = decoded(4, seed=1)
    pixels = np.stack([d.pixels for d in batch])
    full = infer.load_model(handler._config._replace(write_all_scores=True))(pixels)
    labels = imagenet21k()
    from_model = infer.postprocess(batch, model(pixels), handler._config, labels)
    from_scores = infer.postprocess(
        batch, full._replace(top_indices=None, top_scores=None), handler._config, labels
    )
    assert from_model.equals(from_scores)


def test_handler_turns_a_failing_batch_into_one_failure_per_image(loaded):
    handler, model = loaded
    batch = decoded(3)
    batch[1] = batch[1]._replace(pixels=np.zeros((16, 16, 3), np.uint8))  # cannot be stacked
    out = handler.run_inference(batch, model)
    assert [type(o) for o in out] == [Failure] * 3
    assert [(f.key, f.source, f.stage) for f in out] == [
        (d.key, d.source, STAGE_INFERENCE) for d in batch
    ]
    assert all(f.error.startswith("ValueError: ") for f in out)


class NaNForSome:
    """The model, with the outputs of the images at `rows` made non-finite (as a diverged or
    damaged model gives them)."""

    def __init__(self, model, rows, field="embeddings"):
        self.model, self.rows, self.field = model, rows, field

    def __call__(self, images):
        out = self.model(images)
        values = getattr(out, self.field).copy()
        values[self.rows, 0] = np.nan if self.field == "embeddings" else np.inf
        return out._replace(**{self.field: values})


@pytest.mark.parametrize("field", ["embeddings", "top_scores"])
def test_an_image_with_non_finite_outputs_is_a_failure_never_a_result(loaded, field):
    handler, model = loaded
    batch = decoded(4, seed=2)
    out = handler.run_inference(batch, NaNForSome(model, [1, 3], field))
    rows = [o for o in out if isinstance(o, pa.RecordBatch)]
    failures = [o for o in out if isinstance(o, Failure)]
    assert len(rows) == 1 and rows[0].column("key").to_pylist() == ["k0", "k2"]
    assert np.isfinite(np.stack(rows[0].column("embedding").to_pylist())).all()
    assert [(f.key, f.source, f.stage) for f in failures] == [
        ("k1", "s1", STAGE_INFERENCE),
        ("k3", "s3", STAGE_INFERENCE),
    ]
    assert all(f.error.startswith("NonFiniteOutput: the model's embedding") for f in failures)
    everything = handler.run_inference(batch, NaNForSome(model, [0, 1, 2, 3], field))
    assert [type(o) for o in everything] == [Failure] * 4


def test_check_models_refuses_a_tags_model_without_the_21k_classes(tmp_path):
    from tests.bit_checkpoints import write_checkpoint

    small = tmp_path / "head7.npz"
    write_checkpoint(small, units=(1, 1, 1, 1), width=1, num_classes=7, seed=3)
    config = infer.InferenceConfig(tags_model=str(small), embed_model=str(small), schema=None)
    with pytest.raises(infer.ModelError, match="7 classes"):
        infer.check_models(config, keep_loaded=False)


def test_unloadable_model_is_a_model_error_naming_the_flag(tmp_path):
    config = infer.InferenceConfig(
        tags_model=str(tmp_path / "missing.npz"),
        embed_model=str(tmp_path / "missing.npz"),
        schema=None,
    )
    with pytest.raises(infer.ModelError, match="--tags_model .*missing.npz"):
        infer.check_models(config, keep_loaded=False)


def test_model_copies_are_separate_models(loaded):
    """Beam loads `--model_copies N` copies through the handler, all in one process: each is its
    own model, while without copies the handler reuses the process's one model."""
    handler, model = loaded
    assert handler.load_model() is model
    copies = infer.BitModelHandler(handler._config, model_copies=2)
    first, second = copies.load_model(), copies.load_model()
    assert first is not second and model not in (first, second)
    pixels = np.stack([d.pixels for d in decoded(2)])
    np.testing.assert_array_equal(first(pixels).top_indices, model(pixels).top_indices)
