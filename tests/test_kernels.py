"""The fused CPU GroupNorm+ReLU kernel (model.kernels): build, numerics, ResNetV2, fallbacks."""

import logging
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from model import kernels
from model.group_norm import GN_EPS, GROUPS, group_norm_implementation, group_norm_relu
from model.resnet import ResNetV2
from tests.bit_checkpoints import random_weights
from tests.numpy_reference import forward, group_norm

needs_compiler = pytest.mark.skipif(
    kernels.compiler() is None, reason="no C++ compiler on this machine"
)


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    """Each test decides the environment; the next load (here or in other modules) looks again."""
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def library():
    lib = kernels.load()
    if lib is None and kernels.compiler() is not None:
        pytest.fail(f"a compiler is here but the kernel did not load: {kernels.status()[1]}")
    if lib is None:
        pytest.skip("no C++ compiler on this machine")
    return lib


def reference(x, gamma, beta):
    return np.maximum(group_norm(x.astype(np.float64), gamma, beta, GROUPS, GN_EPS), 0)


def inputs(shape, seed=0, mean=0.5, std=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, std, shape).astype(np.float32)
    gamma = rng.normal(1.0, 0.5, shape[-1]).astype(np.float32)
    beta = rng.normal(0.0, 0.5, shape[-1]).astype(np.float32)
    return x, gamma, beta


@pytest.mark.parametrize(
    "shape",
    [
        (16, 7, 7, 64),  # more samples than threads: one task per sample
        (1, 9, 13, 64),  # one sample: pixel ranges in parallel, two phases
        (2, 5, 3, 32),  # one channel per group
        (3, 28, 28, 256),  # 8 channels per group, ResNet-sized
        (2, 1, 1, 2048),  # a single pixel
    ],
)
def test_matches_float64_reference(library, shape):
    x, gamma, beta = inputs(shape)
    y = library.bit_group_norm_relu(x, gamma, beta, groups=GROUPS, epsilon=GN_EPS).numpy()
    np.testing.assert_allclose(y, reference(x, gamma, beta), rtol=1e-5, atol=2e-5)


def test_large_mean_against_small_spread_stays_accurate(library):
    """var = E[x^2] - E[x]^2 in double: a mean 50x the spread still gives float32-level results."""
    x, gamma, beta = inputs((2, 14, 14, 128), mean=50.0, std=1.0)
    y = library.bit_group_norm_relu(x, gamma, beta, groups=GROUPS, epsilon=GN_EPS).numpy()
    np.testing.assert_allclose(y, reference(x, gamma, beta), rtol=1e-4, atol=1e-4)


def test_input_that_is_also_used_elsewhere_is_not_overwritten(library):
    """The op may write in place, but only when TF says the input has no other reader."""
    x, gamma, beta = inputs((4, 6, 6, 64), seed=3)
    out = tf.function(lambda t: library.bit_group_norm_relu(t * 1.0, gamma, beta) + t * 1.0)(x)
    np.testing.assert_allclose(out.numpy(), reference(x, gamma, beta) + x, rtol=1e-5, atol=2e-5)


def test_bad_shapes_are_clear_errors(library):
    x, gamma, beta = inputs((2, 4, 4, 48))  # 48 channels do not split into 32 groups
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not split into 32 groups"):
        library.bit_group_norm_relu(x, gamma, beta)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="rank"):
        library.bit_group_norm_relu(x[0], gamma, beta)
    x, gamma, beta = inputs((2, 4, 4, 64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma and beta need 64"):
        library.bit_group_norm_relu(x, gamma[:32], beta)


def test_resnet_uses_the_kernel_and_both_paths_match_the_reference(library):
    units = (1, 1, 1, 1)
    weights = random_weights(units, 1, 10, seed=4)
    x = np.random.default_rng(5).uniform(-1, 1, (3, 64, 48, 3)).astype(np.float32)
    ref_pre, ref_logits = forward(weights, x)
    outs = {}
    for fused in (True, False):
        net = ResNetV2(units=units, width=1, num_classes=10, fused_group_norm=fused)
        net.load_weights(weights)
        fn = tf.function(net, autograph=False)
        ops = {op.type for op in fn.get_concrete_function(x).graph.get_operations()}
        assert ("BitGroupNormRelu" in ops) == fused
        outs[fused] = [t.numpy() for t in fn(x)]
    for pre, logits in outs.values():
        assert np.max(np.abs(pre - ref_pre)) / np.max(np.abs(ref_pre)) <= 1e-4
        assert np.max(np.abs(logits - ref_logits)) / np.max(np.abs(ref_logits)) <= 1e-4
    np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-4, atol=1e-5)
    assert group_norm_implementation().startswith("fused CPU kernel")


@pytest.mark.parametrize("dtype, jit_compile", [(tf.bfloat16, False), (tf.float32, True)])
def test_bfloat16_and_xla_keep_tensorflow_ops(library, dtype, jit_compile):
    """The kernel is float32-only and XLA cannot compile a custom op: those paths keep TF ops."""
    net = ResNetV2(units=(1, 1, 1, 1), width=1, num_classes=None, dtype=dtype)
    net.load_weights(random_weights((1, 1, 1, 1), 1, None))
    fn = tf.function(net, jit_compile=jit_compile, autograph=False)
    graph = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 3], tf.float32)).graph
    assert "BitGroupNormRelu" not in {op.type for op in graph.get_operations()}
    assert group_norm_implementation(dtype, jit_compile) == "TensorFlow ops"


@needs_compiler
def test_build_is_cached_by_source_tf_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.DIR_ENV, str(tmp_path))
    path = kernels.build()
    assert path.parent == tmp_path and path.name.startswith(f"bit_kernels-tf{tf.__version__}-")
    built_at = path.stat().st_mtime_ns
    assert kernels.build() == path and path.stat().st_mtime_ns == built_at  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    monkeypatch.setenv("CXX", kernels.compiler() + " ")  # another compiler spelling: another key
    assert kernels.library_path() != path


def test_no_compiler_falls_back_to_tensorflow_ops(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(kernels.DIR_ENV, str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with caplog.at_level(logging.WARNING, logger="model.kernels"):
        assert kernels.load() is None
    loaded, reason = kernels.status()
    assert not loaded and "no-such-c++" in reason
    assert "not used" in caplog.text and "TensorFlow ops" in caplog.text
    x, gamma, beta = inputs((2, 5, 5, 64))
    np.testing.assert_allclose(
        group_norm_relu(tf.constant(x), gamma, beta).numpy(),
        reference(x, gamma, beta),
        rtol=1e-4,
        atol=1e-4,
    )
    assert group_norm_implementation().startswith("TensorFlow ops (fused kernel unavailable")


def test_compile_error_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(kernels.KernelBuildError, match="failed"):
        kernels.build()
    assert kernels.load() is None and not list(tmp_path.iterdir())


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.load() is None
    assert kernels.DISABLE_ENV in kernels.status()[1]


@needs_compiler
def test_command_line_builds_and_reports():
    done = subprocess.run(
        [sys.executable, "-m", "model.kernels"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "BitGroupNormRelu from" in done.stdout and ".so" in done.stdout
