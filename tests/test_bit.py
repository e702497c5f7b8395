"""TagAndEmbedModel on random .npz checkpoints written to tmp_path, against the NumPy reference."""

import numpy as np
import pytest

from model import resnet
from model.bit import DEFAULT_EMBED_MODEL, DEFAULT_TAGS_MODEL, Outputs, TagAndEmbedModel
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
    hub = pytest.importorskip("model.hub")
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
