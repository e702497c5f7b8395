"""BiT ResNet-v2 (GroupNorm + Weight Standardization) as a plain `tf.Module`.

Read top-down: GroupNorm+ReLU, standardized conv, bottleneck unit, root block, model, loading.
Sub-modules and variables are named after the checkpoint scopes (`root_block`,
`block1/unit01/a/standardized_conv2d/kernel`, ...), so `load_weights` is a strict name-to-name copy
of an official `.npz` (see ../shared/BIT_FORMAT.md). Weight standardization is applied once, at
load: the variables hold standardized kernels and the forward pass never recomputes it.
Speed (../shared/PERF_NOTES.md): GroupNorm + ReLU is one fused compiled op on the CPU
(`model.kernels`, float32) and otherwise float32 channel moments from two-stage TF reductions plus
one small XLA function (group fold + `relu(x * a + b)`); convolutions stay with oneDNN/cuDNN;
explicit padding + VALID convs (oneDNN folds the pad).
"""
import numpy as np
import tensorflow as tf

GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-10
_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def standardize_kernel(kernel):
    """Weight standardization of an HWIO kernel: per output channel, population stats over H, W, I."""
    w = np.asarray(kernel, dtype=np.float64)
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    return ((w - mean) / np.sqrt(var + WS_EPS)).astype(np.float32)


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
    if x.dtype != tf.float32 or _in_xla_context():
        return _channel_moments_xla(x)
    batch, height, width, channels = tf.unstack(tf.shape(x))
    rows = tf.reshape(x, [batch, height, width * channels])
    mean_h = tf.reshape(tf.reduce_mean(rows, axis=1), [batch, width, channels])
    norm_h = tf.reshape(tf.math.reduce_euclidean_norm(rows, axis=1), [batch, width, channels])
    mean = tf.reduce_mean(mean_h, axis=1)
    mean_sq = tf.square(tf.math.reduce_euclidean_norm(norm_h, axis=1)) / tf.cast(height * width, tf.float32)
    return mean, mean_sq


@tf.function(jit_compile=True, autograph=False)
def _channel_moments_xla(x):
    """`_channel_moments` as one fused XLA read of x (square and cast fused: no temporary)."""
    x = tf.cast(x, tf.float32)
    return tf.reduce_mean(x, axis=[1, 2]), tf.reduce_mean(tf.square(x), axis=[1, 2])


def _in_xla_context():
    """Whether ops built now land in an XLA cluster (tracing under `tf.function(jit_compile=True)`)."""
    try:
        from tensorflow.python.ops import control_flow_util  # TF-internal; used by TF's own ops
    except ImportError:
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@tf.function(jit_compile=True, autograph=False)
def _normalize_relu(x, channel_mean, channel_mean_sq, gamma, beta):
    """Group statistics from the [B, C] channel moments, folded into relu(x * a + b): one fused pass."""
    batch, channels = tf.shape(channel_mean)[0], tf.shape(channel_mean)[1]
    per_group = channels // GROUPS
    mean = tf.reduce_mean(tf.reshape(channel_mean, [batch, GROUPS, per_group]), axis=2, keepdims=True)
    mean_sq = tf.reduce_mean(tf.reshape(channel_mean_sq, [batch, GROUPS, per_group]), axis=2, keepdims=True)
    rstd = tf.math.rsqrt(tf.maximum(mean_sq - tf.square(mean), 0.0) + GN_EPS)  # [B, G, 1]
    a = tf.reshape(gamma, [GROUPS, per_group]) * rstd  # [B, G, C/G]
    b = tf.reshape(beta, [GROUPS, per_group]) - mean * a
    a = tf.cast(tf.reshape(a, [batch, 1, 1, channels]), x.dtype)
    b = tf.cast(tf.reshape(b, [batch, 1, 1, channels]), x.dtype)
    return tf.nn.relu(x * a + b)


def group_norm_relu(x, gamma, beta, fused=True):
    """relu(GroupNorm(x)) for NHWC `x` (32 groups, eps 1e-5); statistics in float32.

    On the CPU in float32 outside XLA: the fused `BitGroupNormRelu` kernel (`model.kernels`), one
    read of each sample for its statistics and the apply while it is in cache. Elsewhere (GPU,
    XLA, bfloat16/float16, or no kernel) the TensorFlow-ops version, `group_norm_relu_tf`.
    """
    library = _fused_kernel(x) if fused else None
    if library is not None:
        return library.bit_group_norm_relu(x, gamma, beta, groups=GROUPS, epsilon=GN_EPS)
    return group_norm_relu_tf(x, gamma, beta)


def _fused_kernel(x):
    """The loaded kernel library when it applies to `x` (decided at trace time), else None."""
    if x.dtype != tf.float32 or _in_xla_context() or _visible_gpus():
        return None
    from model import kernels

    return kernels.load()


def group_norm_implementation(dtype=tf.float32, jit_compile=False):
    """Which GroupNorm a float `dtype` model traced now uses: for metadata and benchmark tables."""
    if tf.as_dtype(dtype) == tf.float32 and not jit_compile and not _visible_gpus():
        from model import kernels

        loaded, description = kernels.status()
        if loaded:
            return f"fused CPU kernel ({description})"
        return f"TensorFlow ops (fused kernel unavailable: {description})"
    return "TensorFlow ops"


def _visible_gpus():
    """A GPU would run the model: the CPU-only kernel would force copies to the host, so not used."""
    return bool(tf.config.list_logical_devices("GPU"))


def group_norm_relu_tf(x, gamma, beta):
    """relu(GroupNorm(x)) from TensorFlow ops (GPU, XLA, bf16/fp16, or when the kernel is missing).

    Two passes over x, convolutions left to oneDNN/cuDNN: (1) per-channel mean and mean of squares
    over H, W with two-stage TF reductions (`_channel_moments`, one read of x per moment); (2) one
    small XLA function: group mean/var from those ([B, C], tiny), var = E[x^2] - E[x]^2 clamped at
    0, gamma/beta/rstd/mean folded into one per-(sample, channel) scale and shift, and
    relu(x * a + b) in one fused read and write.
    Measured (the 49 GN shapes of R50x1 at batch 16): 3x faster than channel moments in XLA or
    one-stage `reduce_mean`, 2.6x faster than the grouped reshape of PERF_NOTES. Whole R50x1 on 2
    CPU cores: ~0.77x Keras ResNet50V2's img/s with this, ~0.88x with the fused kernel.
    """
    return _normalize_relu(x, *_channel_moments(x), gamma, beta)


def _pad(x, before, after):
    return tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])


class GroupNormReLU(tf.Module):
    """Checkpoint scope `group_norm` (gamma, beta [C], float32); always followed by ReLU in BiT."""

    def __init__(self, channels, fused=True):
        super().__init__(name="group_norm")
        self.fused = fused
        with self.name_scope:
            self.gamma = tf.Variable(tf.ones([channels]), name="gamma", trainable=False)
            self.beta = tf.Variable(tf.zeros([channels]), name="beta", trainable=False)

    def __call__(self, x):
        return group_norm_relu(x, self.gamma, self.beta, self.fused)


class StandardizedConv2D(tf.Module):
    """Checkpoint scope `standardized_conv2d`: holds the already standardized HWIO kernel.

    Symmetric explicit zero padding ((k-1)//2 before, the rest after) then a VALID conv: BiT's
    padding, which differs from TF 'SAME' at stride 2.
    """

    def __init__(self, kh, cin, cout, stride=1, dtype=tf.float32):
        super().__init__(name="standardized_conv2d")
        self.stride = stride
        self.pad = ((kh - 1) // 2, kh - 1 - (kh - 1) // 2)
        with self.name_scope:
            self.kernel = tf.Variable(tf.zeros([kh, kh, cin, cout], dtype), name="kernel", trainable=False)

    def __call__(self, x):
        if self.pad != (0, 0):
            x = _pad(x, *self.pad)
        return tf.nn.conv2d(x, self.kernel, self.stride, "VALID")


class SubUnit(tf.Module):
    """Scope `a`/`b`/`c` of a unit: pre-activation relu(GN(x)) then a standardized conv."""

    def __init__(self, name, cin, cout, kh, stride=1, proj_out=None, proj_stride=1, dtype=tf.float32,
                 fused=True):
        super().__init__(name=name)
        with self.name_scope:
            self.group_norm = GroupNormReLU(cin, fused)
            self.standardized_conv2d = StandardizedConv2D(kh, cin, cout, stride, dtype)
            self.proj = None
            if proj_out is not None:  # scope a/proj: 1x1 projection shortcut with the unit's stride
                with tf.name_scope("proj"):
                    self.proj = StandardizedConv2D(1, cin, proj_out, proj_stride, dtype)


class Unit(tf.Module):
    """Pre-activation bottleneck `unitNN`; the stride sits on the 3x3 conv (and the projection)."""

    def __init__(self, name, cin, cmid, cout, stride, dtype=tf.float32, fused=True):
        super().__init__(name=name)
        needs_proj = stride != 1 or cin != cout
        with self.name_scope:
            self.a = SubUnit("a", cin, cmid, 1, 1, cout if needs_proj else None, stride, dtype, fused)
            self.b = SubUnit("b", cmid, cmid, 3, stride, dtype=dtype, fused=fused)
            self.c = SubUnit("c", cmid, cout, 1, 1, dtype=dtype, fused=fused)

    def __call__(self, x):
        pre = self.a.group_norm(x)
        shortcut = self.a.proj(pre) if self.a.proj is not None else x
        h = self.a.standardized_conv2d(pre)
        h = self.b.standardized_conv2d(self.b.group_norm(h))
        h = self.c.standardized_conv2d(self.c.group_norm(h))
        return h + shortcut


class RootBlock(tf.Module):
    """Scope `root_block`: pad 3, WS conv 7x7/2, zero pad 1, max-pool 3x3/2 VALID (no GN/ReLU)."""

    def __init__(self, cout, dtype=tf.float32):
        super().__init__(name="root_block")
        with self.name_scope:
            self.standardized_conv2d = StandardizedConv2D(7, 3, cout, 2, dtype)

    def __call__(self, x):
        x = self.standardized_conv2d(x)
        # Zero padding (not -inf) before the pool: conv outputs can be negative; BiT does this.
        return tf.nn.max_pool2d(_pad(x, 1, 1), 3, 2, "VALID")


class Head(tf.Module):
    """Scope `head/conv2d`: the checkpoint's [1, 1, C, K] kernel is stored reshaped to [C, K]."""

    def __init__(self, cin, num_classes, dtype=tf.float32):
        super().__init__(name="head")
        with self.name_scope, tf.name_scope("conv2d"):
            self.kernel = tf.Variable(tf.zeros([cin, num_classes], dtype), name="kernel", trainable=False)
            self.bias = tf.Variable(tf.zeros([num_classes]), name="bias", trainable=False)

    def __call__(self, pre_logits):
        logits = tf.matmul(tf.cast(pre_logits, self.kernel.dtype), self.kernel)
        return tf.cast(logits, tf.float32) + self.bias


class ResNetV2(tf.Module):
    """BiT ResNet-v2 for any units per block, integer width and optional head, any input H, W.

    `ResNetV2(architecture)` or `ResNetV2(units, width, num_classes)`; `dtype` is the compute dtype
    of convolutions and activations (float32, bfloat16 or float16; GN statistics stay float32).
    `fused_group_norm=False` keeps GroupNorm in TensorFlow ops even where the fused CPU kernel
    applies (benchmarks, tests).
    `__call__(x)`: float NHWC in [-1, 1] -> `(pre_logits [B, 2048*width] float32,
    logits [B, K] float32 or None)`. Not itself a `tf.function`: callers wrap it.
    """

    def __init__(self, units, width=None, num_classes=None, dtype=tf.float32, name="resnet",
                 fused_group_norm=True):
        super().__init__(name=name)
        if hasattr(units, "units"):  # an Architecture(units, width, num_classes)
            units, width, num_classes = units.units, units.width, units.num_classes
        self.units = tuple(int(u) for u in units)
        self.width = int(width or 1)
        self.num_classes = int(num_classes) if num_classes else None
        self.compute_dtype = _DTYPES[dtype] if isinstance(dtype, str) else tf.as_dtype(dtype)
        if self.compute_dtype not in _DTYPES.values():
            raise ValueError(f"unsupported compute dtype {self.compute_dtype.name}")
        wf, dt = self.width, self.compute_dtype
        with self.name_scope:
            self.root_block = RootBlock(64 * wf, dt)
            cin = 64 * wf
            self.blocks = []
            for b, n in enumerate(self.units, start=1):
                cmid = 64 * wf * 2 ** (b - 1)
                with tf.name_scope(f"block{b}"):
                    block = [Unit(f"unit{u:02d}", cin if u == 1 else 4 * cmid, cmid, 4 * cmid,
                                  2 if (u == 1 and b > 1) else 1, dt, fused_group_norm)
                             for u in range(1, n + 1)]
                self.blocks.append(block)
                cin = 4 * cmid
            self.group_norm = GroupNormReLU(cin, fused_group_norm)
            self.head = Head(cin, self.num_classes, dt) if self.num_classes else None
        self.feature_dim = cin
        self._slots = self._checkpoint_slots()

    def _checkpoint_slots(self):
        """Checkpoint key -> (variable, conversion from the checkpoint array); the loading contract."""
        slots = {}

        def conv(scope, module):
            slots[f"{scope}/standardized_conv2d/kernel"] = (module.kernel, standardize_kernel)

        def gn(scope, module):
            slots[f"{scope}/group_norm/gamma"] = (module.gamma, None)
            slots[f"{scope}/group_norm/beta"] = (module.beta, None)

        conv("resnet/root_block", self.root_block.standardized_conv2d)
        for b, block in enumerate(self.blocks, start=1):
            for u, unit in enumerate(block, start=1):
                scope = f"resnet/block{b}/unit{u:02d}"
                for sub in ("a", "b", "c"):
                    gn(f"{scope}/{sub}", getattr(unit, sub).group_norm)
                    conv(f"{scope}/{sub}", getattr(unit, sub).standardized_conv2d)
                if unit.a.proj is not None:
                    conv(f"{scope}/a/proj", unit.a.proj)
        gn("resnet", self.group_norm)
        if self.head is not None:
            slots["resnet/head/conv2d/kernel"] = (self.head.kernel, lambda k: k.reshape(k.shape[-2], k.shape[-1]))
            slots["resnet/head/conv2d/bias"] = (self.head.bias, None)
        return slots

    def checkpoint_shapes(self):
        """Key -> shape this model expects from an official checkpoint (head kernel 4-D, as stored)."""
        shapes = {k: tuple(v.shape) for k, (v, _) in self._slots.items()}
        if self.head is not None:
            shapes["resnet/head/conv2d/kernel"] = (1, 1, self.feature_dim, self.num_classes)
        return shapes

    @property
    def num_parameters(self):
        return int(sum(np.prod(v.shape) for v, _ in self._slots.values()))

    def load_weights(self, weights):
        """Strict copy of a checkpoint dict: any missing, unexpected or misshaped key is an error."""
        error = _checkpoint_error()
        expected = self.checkpoint_shapes()
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise error(f"checkpoint is missing {len(missing)} array(s), first: {missing[0]!r}")
        extra = sorted(set(weights) - set(expected))
        if extra:
            raise error(f"checkpoint has {len(extra)} unexpected array(s), first: {extra[0]!r}")
        for key, shape in expected.items():
            got = tuple(np.shape(weights[key]))
            if got != shape:
                raise error(f"checkpoint array {key!r} has shape {got}, expected {shape}")
        for key, (variable, convert) in self._slots.items():
            value = np.asarray(weights[key], dtype=np.float32)
            if convert is not None:
                value = convert(value)
            variable.assign(tf.cast(value, variable.dtype))

    def __call__(self, x):
        x = tf.cast(x, self.compute_dtype)
        x = self.root_block(x)
        for block in self.blocks:
            for unit in block:
                x = unit(x)
        x = self.group_norm(x)
        pre_logits = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])
        logits = self.head(pre_logits) if self.head is not None else None
        return pre_logits, logits


def _checkpoint_error():
    """`model.checkpoint.CheckpointError` (a ValueError) when that module is importable."""
    try:
        from model.checkpoint import CheckpointError
    except ImportError:
        return ValueError
    return CheckpointError
