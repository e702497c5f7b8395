"""TagAndEmbedModel on random .npz checkpoints written to tmp_path, against the NumPy reference."""

import numpy as np
import pytest

from model import hub, resnet
from model.bit import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_TAGS_MODEL,
    Outputs,
    TagAndEmbedModel,
    top_k_in_graph,
)
from tests.bit_checkpoints import write_checkpoint
from tests.numpy_reference import forward

TINY = (1, 1, 1, 1)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def uint8_images(n, h=64, w=48, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def reference(weights, images):
    return forward(weights, (images.astype(np.float64) - 127.5) / 127.5)


def assert_close(got, ref, rel=1e-4):
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= rel * max(1.0, np.max(np.abs(ref)))


@pytest.fixture
def ckpts(tmp_path):
    tags_path, embed_path = tmp_path / "tags.npz", tmp_path / "embed.npz"
    tags_w = write_checkpoint(tags_path, TINY, 1, num_classes=12, seed=1)
    embed_w = write_checkpoint(embed_path, TINY, 2, num_classes=None, seed=2)
    return str(tags_path), tags_w, str(embed_path), embed_w


def test_two_models_match_reference(ckpts):
    tags_path, tags_w, embed_path, embed_w = ckpts
    model = TagAndEmbedModel.load(tags_path, embed_path)
    images = uint8_images(3)
    out = model(images)
    assert isinstance(out, Outputs)
    assert (model.num_classes, model.embedding_dim) == (12, 4096)
    assert not model.single_pass
    _, ref_logits = reference(tags_w, images)
    ref_embed, _ = reference(embed_w, images)
    assert out.scores.shape == (3, 12) and np.all((out.scores > 0) & (out.scores < 1))
    assert_close(out.scores, sigmoid(ref_logits))
    assert_close(out.embeddings, ref_embed)


def test_same_source_single_pass(ckpts, monkeypatch):
    tags_path, tags_w, _, _ = ckpts
    calls = []
    original = resnet.ResNetV2.__call__
    monkeypatch.setattr(
        resnet.ResNetV2, "__call__", lambda self, x: calls.append(1) or original(self, x)
    )
    model = TagAndEmbedModel.load(tags_path, tags_path)
    images = uint8_images(2, seed=5)
    out = model(images)
    assert model.single_pass and len(calls) == 1  # one network, traced once, giving both outputs
    ref_pre, ref_logits = reference(tags_w, images)
    assert_close(out.scores, sigmoid(ref_logits))
    assert_close(out.embeddings, ref_pre)
    assert model.embedding_dim == 2048


def test_fixed_batch_pads_and_traces_once(ckpts):
    tags_path, _, embed_path, _ = ckpts
    images = uint8_images(7, seed=7)
    plain = TagAndEmbedModel.load(tags_path, embed_path)(images)
    fixed = TagAndEmbedModel.load(tags_path, embed_path, batch_size=3)
    for subset in (images, images[:2], images[4:5]):
        out = fixed(subset)
        assert out.scores.shape[0] == out.embeddings.shape[0] == len(subset)
    out = fixed(images)
    np.testing.assert_allclose(out.scores, plain.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.embeddings, plain.embeddings, rtol=1e-5, atol=1e-5)
    assert fixed._forward.experimental_get_tracing_count() == 1


def test_uint8_mapping_to_minus_one_one(ckpts):
    tags_path, tags_w, _, _ = ckpts
    model = TagAndEmbedModel.load(tags_path, tags_path)
    images = np.zeros((2, 40, 40, 3), np.uint8)
    images[1] = 255
    out = model(images)
    ref_pre, ref_logits = forward(
        tags_w, np.stack([np.full((40, 40, 3), -1.0), np.full((40, 40, 3), 1.0)])
    )
    assert_close(out.embeddings, ref_pre)
    assert_close(out.scores, sigmoid(ref_logits))


def test_tags_model_without_head_is_a_clear_error(ckpts):
    _, _, embed_path, _ = ckpts
    with pytest.raises(ValueError, match="no classification head"):
        TagAndEmbedModel.load(embed_path, embed_path)


def test_rejects_bad_precision_and_bad_images(ckpts):
    tags_path, _, embed_path, _ = ckpts
    with pytest.raises(ValueError, match="precision"):
        TagAndEmbedModel.load(tags_path, embed_path, precision="float64")
    model = TagAndEmbedModel.load(tags_path, tags_path)
    with pytest.raises(ValueError, match="uint8"):
        model(np.zeros((1, 32, 32, 3), np.float32))
    assert model(np.zeros((0, 32, 32, 3), np.uint8)).scores.shape == (0, 12)


def naive_top_k(row, k):
    """The k best of one row by the job's rule: score descending, lower index first, NaN last."""
    order = sorted(range(len(row)), key=lambda i: (np.isnan(row[i]), -np.nan_to_num(row[i]), i))
    return order[:k]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_top_k_in_graph_breaks_ties_by_lower_index_and_puts_nan_last(jit_compile):
    import tensorflow as tf

    scores = np.array(
        [
            [0.5, 1.0, 0.5, 1.0, 0.2, 1.0, 0.5],  # ties at the top and at the k-th place
            [np.nan, 0.1, 0.9, np.nan, 0.9, 0.0, 0.3],  # NaN ranks below every number
            [np.nan] * 7,
            [1.0] * 7,  # saturated sigmoid: every class tied
        ],
        np.float32,
    )
    fn = tf.function(lambda s: top_k_in_graph(s, 4), jit_compile=jit_compile, autograph=False)
    indices, top = (t.numpy() for t in fn(tf.constant(scores)))
    assert indices.dtype == np.int32 and indices.shape == (4, 4)
    for row, got, got_scores in zip(scores, indices, top):
        assert list(got) == naive_top_k(row, 4)
        np.testing.assert_array_equal(got_scores, row[got])  # the original values, NaN kept


def test_top_k_chosen_on_the_device_matches_the_full_scores(ckpts):
    tags_path, _, embed_path, _ = ckpts
    images = uint8_images(5, seed=13)
    full = TagAndEmbedModel.load(tags_path, embed_path, top_k=4, batch_size=2)(images)
    assert full.top_indices.shape == full.top_scores.shape == (5, 4)
    for row, got, got_scores in zip(full.scores, full.top_indices, full.top_scores):
        assert list(got) == naive_top_k(row, 4)
        np.testing.assert_array_equal(got_scores, row[got])
    lean = TagAndEmbedModel.load(tags_path, embed_path, top_k=4, keep_scores=False)(images)
    assert lean.scores is None
    np.testing.assert_array_equal(lean.top_indices, full.top_indices)
    np.testing.assert_allclose(lean.top_scores, full.top_scores, rtol=0, atol=1e-6)
    clipped = TagAndEmbedModel.load(tags_path, tags_path, top_k=50, keep_scores=False)
    assert clipped(images[:1]).top_indices.shape == (1, 12)  # k clipped to the 12 classes
    assert clipped(images[:0]).top_indices.shape == (0, 12)
    plain = TagAndEmbedModel.load(tags_path, embed_path)(images)
    assert plain.top_indices is None and plain.top_scores is None


def test_no_scores_and_no_top_k_is_refused(ckpts):
    tags_path, _, embed_path, _ = ckpts
    with pytest.raises(ValueError, match="needs top_k"):
        TagAndEmbedModel.load(tags_path, embed_path, keep_scores=False)


def test_metadata(ckpts):
    tags_path, _, embed_path, _ = ckpts
    meta = TagAndEmbedModel.load(tags_path, embed_path, precision="bfloat16").metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["tags_model"] == tags_path and meta["embed_model"] == embed_path
    assert len(meta["tags_model_sha256"]) == 64 and len(meta["embed_model_sha256"]) == 64
    assert meta["tags_model_input_range"] == "[-1, 1]" and meta["precision"] == "bfloat16"
    assert "classes=12" in meta["tags_model_architecture"]
    assert DEFAULT_TAGS_MODEL.endswith("BiT-M-R50x1.npz") and DEFAULT_EMBED_MODEL.endswith(
        "BiT-M-R101x3.npz"
    )


def test_group_norm_says_which_implementation_runs(ckpts):
    """float32 on a CPU-only process: the fused kernel where it builds; bf16 and XLA: TF ops."""
    from model import kernels

    tags_path, _, embed_path, _ = ckpts
    fp32 = TagAndEmbedModel.load(tags_path, embed_path).group_norm()
    if kernels.compiler() is not None:
        assert fp32.startswith("fused CPU kernel")
    assert (
        TagAndEmbedModel.load(tags_path, embed_path, precision="bfloat16").group_norm()
        == "TensorFlow ops"
    )
    assert (
        TagAndEmbedModel.load(tags_path, embed_path, jit_compile=True).group_norm()
        == "TensorFlow ops"
    )


def test_bfloat16_and_xla_run_close_to_float32(ckpts):
    tags_path, _, embed_path, _ = ckpts
    images = uint8_images(2, seed=9)
    ref = TagAndEmbedModel.load(tags_path, embed_path)(images)
    xla = TagAndEmbedModel.load(tags_path, embed_path, jit_compile=True)(images)
    np.testing.assert_allclose(
        xla.embeddings, ref.embeddings, rtol=1e-4, atol=1e-4 * np.abs(ref.embeddings).max()
    )
    bf16 = TagAndEmbedModel.load(tags_path, embed_path, precision="bfloat16")(images)
    assert bf16.scores.dtype == np.float32
    assert np.abs(bf16.embeddings - ref.embeddings).max() <= 0.1 * np.abs(ref.embeddings).max()


def test_saved_model_embed_source(ckpts, tmp_path):
    """A SavedModel directory (inputs [0, 1]) in the embed slot gives the same pre-logits."""
    tags_path, _, embed_path, embed_w = ckpts
    net = resnet.ResNetV2(units=TINY, width=2, num_classes=None)
    net.load_weights(embed_w)
    export_dir = hub.export_saved_model(net, str(tmp_path / "embed_sm"), output="pre_logits")
    model = TagAndEmbedModel.load(tags_path, export_dir)
    images = uint8_images(2, seed=11)
    ref_embed, _ = reference(embed_w, images)
    out = model(images)
    assert model.embedding_dim == 4096 and model.metadata()["embed_model_input_range"] == "[0, 1]"
    assert_close(out.embeddings, ref_embed)
