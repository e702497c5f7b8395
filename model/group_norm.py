"""GroupNorm + ReLU for BiT: which implementation runs, and the TensorFlow-ops version.

BiT's GroupNorm: 32 groups, eps 1e-5, statistics per sample and group over H, W and the group's
(contiguous) channels with the population variance, then per-channel `gamma * x_hat + beta`; in
BiT it is always followed by ReLU, so the two are one operation here.

Two implementations, chosen at trace time by `group_norm_relu`:
- the fused CPU kernel `BitGroupNormRelu` (`model.kernels`, float32 NHWC): one read of each sample
  for its statistics and the apply while it is in cache. Used on a CPU-only process, in float32,
  outside XLA, when the kernel builds;
- `group_norm_relu_tf`, TensorFlow ops, everywhere else (GPU, XLA, bfloat16/float16, no kernel).

Why it looks like this (measured, docs/performance.md): the textbook
"reshape to groups + `tf.nn.moments`" ran the whole R50x1 at 0.52x Keras ResNet50V2's images/s on
2 CPU cores; one pass of mean and mean of squares folded into a per-(sample, channel) scale and
shift, `relu(x * a + b)`, reached 0.77x; the fused kernel 0.86-0.88x.
"""

import tensorflow as tf

GROUPS = 32
GN_EPS = 1e-5


def group_norm_relu(x, gamma, beta, fused=True):
    """relu(GroupNorm(x)) for NHWC `x` (32 groups, eps 1e-5); statistics in float32.

    The fused kernel where it applies (`fused` and float32 on a CPU-only process outside XLA),
    else `group_norm_relu_tf`.
    """
    library = _fused_kernel(x) if fused else None
    if library is not None:
        return library.bit_group_norm_relu(x, gamma, beta, groups=GROUPS, epsilon=GN_EPS)
    return group_norm_relu_tf(x, gamma, beta)


def group_norm_implementation(dtype=tf.float32, jit_compile=False):
    """Which GroupNorm a float `dtype` model traced now uses: for metadata and benchmark tables."""
    if tf.as_dtype(dtype) == tf.float32 and not jit_compile and not _visible_gpus():
        from model import kernels

        loaded, description = kernels.status()
        if loaded:
            return f"fused CPU kernel ({description})"
        return f"TensorFlow ops (fused kernel unavailable: {description})"
    return "TensorFlow ops"


def _fused_kernel(x):
    """The loaded kernel library when it applies to `x` (decided at trace time), else None."""
    if x.dtype != tf.float32 or in_xla_context() or _visible_gpus():
        return None
    from model import kernels

    return kernels.load()


def _visible_gpus():
    """A GPU would run the model: the CPU-only kernel would force copies to the host: not used."""
    return bool(tf.config.list_logical_devices("GPU"))


def in_xla_context():
    """Whether ops built now land in an XLA cluster (tracing under `tf.function(jit_compile=True)`).

    The one import from TensorFlow internals in the project (the helper TF's own ops use); checked
    against TF 2.21, and False if a future TF moves it.
    """
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415 - TF-internal
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


# ---- the TensorFlow-ops version --------------------------------------------------------------


def group_norm_relu_tf(x, gamma, beta):
    """relu(GroupNorm(x)) from TensorFlow ops (GPU, XLA, bf16/fp16, or when the kernel is missing).

    Two passes over x, convolutions left to oneDNN/cuDNN: (1) per-channel mean and mean of squares
    over H, W with two-stage TF reductions (`_channel_moments`, one read of x per moment); (2) one
    small XLA function: group mean/var from those ([B, C], tiny), var = E[x^2] - E[x]^2 clamped at
    0, gamma/beta/rstd/mean folded into one per-(sample, channel) scale and shift, and
    relu(x * a + b) in one fused read and write.
    Measured (the 49 GN shapes of R50x1 at batch 16): 3x faster than channel moments in XLA or
    one-stage `reduce_mean`, 2.6x faster than the grouped reshape + `tf.nn.moments`. Whole R50x1 on
    2 CPU cores: ~0.77x Keras ResNet50V2's img/s with this, ~0.88x with the fused kernel.
    """
    return _normalize_relu(x, *_channel_moments(x), gamma, beta)


def _channel_moments(x):
    """Per-(sample, channel) mean and mean of squares over H, W of NHWC `x`, in float32.

    float32 outside XLA (the default CPU path): plain TF (Eigen) reductions in two stages, first
    over H on the `[B, H, W*C]` view (a long contiguous preserved inner dimension, which Eigen
    vectorises and runs near memory speed), then over W on the small `[B, W, C]` result. One-stage
    reductions over axes (1, 2) keep only C inside and ran ~3x slower, XLA's fused reduction as
    slow. The sum of squares comes from `reduce_euclidean_norm` (squares in registers, no x^2
    temporary); XLA has no kernel for it, so inside an XLA cluster (`jit_compile=True` callers),
    and for bfloat16/float16 (where XLA fuses the cast to float32), the fused XLA version is used.
    """
    if x.dtype != tf.float32 or in_xla_context():
        return _channel_moments_xla(x)
    batch, height, width, channels = tf.unstack(tf.shape(x))
    rows = tf.reshape(x, [batch, height, width * channels])
    mean_h = tf.reshape(tf.reduce_mean(rows, axis=1), [batch, width, channels])
    norm_h = tf.reshape(tf.math.reduce_euclidean_norm(rows, axis=1), [batch, width, channels])
    mean = tf.reduce_mean(mean_h, axis=1)
    mean_sq = tf.square(tf.math.reduce_euclidean_norm(norm_h, axis=1)) / tf.cast(
        height * width, tf.float32
    )
    return mean, mean_sq


@tf.function(jit_compile=True, autograph=False)
def _channel_moments_xla(x):
    """`_channel_moments` as one fused XLA read of x (square and cast fused: no temporary)."""
    x = tf.cast(x, tf.float32)
    return tf.reduce_mean(x, axis=[1, 2]), tf.reduce_mean(tf.square(x), axis=[1, 2])


@tf.function(jit_compile=True, autograph=False)
def _normalize_relu(x, channel_mean, channel_mean_sq, gamma, beta):
    """Group statistics from the [B, C] channel moments, folded into relu(x * a + b): one pass.

    E[x^2] - E[x]^2 loses precision when a group's mean is large against its spread: clamped at 0
    (an exact per-channel-moments version was 5-8% slower).
    """
    batch, channels = tf.shape(channel_mean)[0], tf.shape(channel_mean)[1]
    per_group = channels // GROUPS
    mean = tf.reduce_mean(
        tf.reshape(channel_mean, [batch, GROUPS, per_group]), axis=2, keepdims=True
    )
    mean_sq = tf.reduce_mean(
        tf.reshape(channel_mean_sq, [batch, GROUPS, per_group]), axis=2, keepdims=True
    )
    rstd = tf.math.rsqrt(tf.maximum(mean_sq - tf.square(mean), 0.0) + GN_EPS)  # [B, G, 1]
    a = tf.reshape(gamma, [GROUPS, per_group]) * rstd  # [B, G, C/G]
    b = tf.reshape(beta, [GROUPS, per_group]) - mean * a
    a = tf.cast(tf.reshape(a, [batch, 1, 1, channels]), x.dtype)
    b = tf.cast(tf.reshape(b, [batch, 1, 1, channels]), x.dtype)
    return tf.nn.relu(x * a + b)
