"""ResNetV2 (TF) against the float64 NumPy reference on random checkpoints in the BiT layout."""

import numpy as np
import pytest
import tensorflow as tf

from model.checkpoint import Architecture
from model.resnet import ResNetV2
from tests.bit_checkpoints import checkpoint_shapes, random_weights
from tests.numpy_reference import forward

TINY = (1, 1, 1, 1)


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


def build(units, width, num_classes, dtype=tf.float32, seed=0):
    weights = random_weights(units, width, num_classes, seed=seed)
    net = ResNetV2(units=units, width=width, num_classes=num_classes, dtype=dtype)
    net.load_weights(weights)
    return net, weights


def images(b, h, w, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("hw", [(224, 224), (97, 61)])
def test_matches_numpy_reference(width, num_classes, hw):
    net, weights = build(TINY, width, num_classes, seed=width)
    x = images(2, *hw)
    pre, logits = tf.function(net)(x)
    ref_pre, ref_logits = forward(weights, x)
    assert pre.shape == (2, 2048 * width) and pre.dtype == tf.float32
    assert rel_err(pre, ref_pre) <= 1e-4
    if num_classes is None:
        assert logits is None
    else:
        assert logits.shape == (2, num_classes)
        assert rel_err(logits, ref_logits) <= 1e-4


def test_two_units_per_block_matches_reference():
    """Units after unit01 have no projection and an identity shortcut."""
    net, weights = build((2, 2, 1, 1), 1, 5)
    x = images(1, 64, 64)
    pre, logits = net(x)
    ref_pre, ref_logits = forward(weights, x)
    assert rel_err(pre, ref_pre) <= 1e-4 and rel_err(logits, ref_logits) <= 1e-4


def test_weight_standardization_is_done_at_load():
    net, weights = build(TINY, 1, None)
    kernel = net.root_block.standardized_conv2d.kernel.numpy().astype(np.float64)
    assert np.allclose(kernel.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    assert np.allclose(kernel.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_variable_names_follow_checkpoint_scopes():
    net = ResNetV2(units=TINY, width=1, num_classes=7)
    names = {v.name.rsplit(":", 1)[0] for v in net.variables}
    assert names == set(checkpoint_shapes(TINY, 1, 7))


def test_full_r50x1_with_21k_head():
    units = (3, 4, 6, 3)
    weights = random_weights(units, 1, 21843)
    net = ResNetV2(units=units, width=1, num_classes=21843)
    net.load_weights(weights)
    assert net.num_parameters == 68_256_659
    assert sum(w.size for w in weights.values()) == 68_256_659
    pre, logits = tf.function(net)(images(1, 64, 64))
    assert pre.shape == (1, 2048) and logits.shape == (1, 21843)
    assert np.all(np.isfinite(logits))


def test_architecture_round_trips_and_arguments_are_keywords():
    arch = Architecture(TINY, 1, 3)
    net = ResNetV2(**arch._asdict())
    assert net.architecture == arch and net.checkpoint_shapes() == arch.expected_shapes()
    with pytest.raises(TypeError):
        ResNetV2(TINY, 1, 3)  # positional arguments are refused


@pytest.mark.parametrize(
    "mutate, key",
    [
        (
            lambda w: w.pop("resnet/block2/unit01/b/group_norm/beta"),
            "resnet/block2/unit01/b/group_norm/beta",
        ),
        (
            lambda w: w.__setitem__(
                "resnet/block5/unit01/a/group_norm/gamma", np.ones(3, np.float32)
            ),
            "resnet/block5/unit01/a/group_norm/gamma",
        ),
        (
            lambda w: w.__setitem__(
                "resnet/block3/unit01/c/standardized_conv2d/kernel",
                np.ones((1, 1, 256, 5), np.float32),
            ),
            "resnet/block3/unit01/c/standardized_conv2d/kernel",
        ),
        (lambda w: w.pop("resnet/head/conv2d/bias"), "resnet/head/conv2d/bias"),
    ],
    ids=["missing", "extra", "misshaped", "missing-head-bias"],
)
def test_loading_errors_name_the_key(mutate, key):
    weights = random_weights(TINY, 1, 4)
    mutate(weights)
    net = ResNetV2(units=TINY, width=1, num_classes=4)
    with pytest.raises(ValueError, match=key):
        net.load_weights(weights)


def test_head_in_checkpoint_but_not_in_model_is_an_error():
    net = ResNetV2(units=TINY, width=1, num_classes=None)
    with pytest.raises(ValueError, match="resnet/head/conv2d"):
        net.load_weights(random_weights(TINY, 1, 4))


def test_bfloat16_close_to_float32():
    """bf16 (8-bit mantissa) compounds through the net: measured ~1e-2 relative on this tiny net."""
    weights = random_weights(TINY, 1, 10)
    x = images(2, 96, 96)
    outs = {}
    for dtype in (tf.float32, tf.bfloat16):
        net = ResNetV2(units=TINY, width=1, num_classes=10, dtype=dtype)
        net.load_weights(weights)
        outs[dtype] = [t.numpy() for t in tf.function(net)(x)]
    err_pre = rel_err(outs[tf.bfloat16][0], outs[tf.float32][0])
    err_logits = rel_err(outs[tf.bfloat16][1], outs[tf.float32][1])
    print(f"bfloat16 vs float32 relative error: pre_logits {err_pre:.2e}, logits {err_logits:.2e}")
    assert outs[tf.bfloat16][0].dtype == np.float32
    assert err_pre <= 5e-2 and err_logits <= 5e-2


def test_xla_compiled_forward_matches_reference():
    """Under jit_compile=True, GroupNorm statistics take the XLA path (XLA has no EuclideanNorm)."""
    net, weights = build(TINY, 1, 10)
    x = images(2, 64, 48)
    pre, logits = tf.function(net, jit_compile=True, autograph=False)(x)
    ref_pre, ref_logits = forward(weights, x)
    assert rel_err(pre, ref_pre) <= 1e-4 and rel_err(logits, ref_logits) <= 1e-4


def test_channel_moments_paths_match_float64():
    """Two-stage TF reductions (default float32 path) and the fused XLA version: same moments."""
    from model import group_norm

    x = np.random.default_rng(3).normal(0.5, 2.0, (2, 13, 9, 64)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref_mean, ref_sq = x64.mean(axis=(1, 2)), (x64**2).mean(axis=(1, 2))
    for moments in (group_norm._channel_moments, group_norm._channel_moments_xla):
        mean, mean_sq = moments(tf.constant(x))
        np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean_sq.numpy(), ref_sq, rtol=1e-5)
