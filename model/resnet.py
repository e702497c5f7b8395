"""BiT ResNet-v2 (GroupNorm + Weight Standardization) as a plain `tf.Module`.

Read top-down, like timm's `resnetv2.py`: building blocks (standardized conv, GroupNorm+ReLU),
bottleneck unit, root block (stem), head, the model, weight loading. GroupNorm itself lives in
`model.group_norm`.

Sub-modules and variables are named after the checkpoint scopes (`root_block`,
`block1/unit01/a/standardized_conv2d/kernel`, ...), so loading is a name-to-name copy: each
variable's name is its checkpoint key, and the key -> shape table of an official `.npz`
(`model.checkpoint.Architecture.expected_shapes`, the one layout table of the project) checks
the file. Weight standardization is applied once, at load: the variables hold standardized kernels
and the forward pass never recomputes it (it cost ~60 ms per call on 2 CPU cores for R50x1).
Convolutions use explicit symmetric padding + VALID (BiT's padding; oneDNN folds the pad).
Layout, operations and forward pass: docs/checkpoint-format.md.
"""

import numpy as np
import tensorflow as tf

from model.checkpoint import (  # noqa: F401 (WS_EPS, standardize_kernel re-exported)
    WS_EPS,
    Architecture,
    parameter_value,
    standardize_kernel,
    validate,
)
from model.group_norm import group_norm_relu

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def _pad(x, before, after):
    return tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])


# ---- building blocks ---------------------------------------------------------------------------


class StandardizedConv2D(tf.Module):
    """Checkpoint scope `standardized_conv2d`: holds the already standardized HWIO kernel.

    Symmetric explicit zero padding ((k-1)//2 before, the rest after) then a VALID conv: BiT's
    padding, which differs from TF 'SAME' at stride 2.
    """

    def __init__(self, *, kernel_size, cin, cout, stride=1, dtype=tf.float32):
        super().__init__(name="standardized_conv2d")
        self.stride = stride
        self.pad = ((kernel_size - 1) // 2, kernel_size - 1 - (kernel_size - 1) // 2)
        with self.name_scope:
            self.kernel = tf.Variable(
                tf.zeros([kernel_size, kernel_size, cin, cout], dtype),
                name="kernel",
                trainable=False,
            )

    def __call__(self, x):
        if self.pad != (0, 0):
            x = _pad(x, *self.pad)
        return tf.nn.conv2d(x, self.kernel, self.stride, "VALID")


class GroupNormReLU(tf.Module):
    """Checkpoint scope `group_norm` (gamma, beta [C], float32); always followed by ReLU in BiT."""

    def __init__(self, *, channels, fused=True):
        super().__init__(name="group_norm")
        self.fused = fused
        with self.name_scope:
            self.gamma = tf.Variable(tf.ones([channels]), name="gamma", trainable=False)
            self.beta = tf.Variable(tf.zeros([channels]), name="beta", trainable=False)

    def __call__(self, x):
        return group_norm_relu(x, self.gamma, self.beta, fused=self.fused)


class SubUnit(tf.Module):
    """Scope `a`/`b`/`c` of a unit: pre-activation relu(GN(x)), then a standardized conv; `a` may
    also hold the projection shortcut (scope `a/proj`)."""

    def __init__(
        self,
        name,
        *,
        cin,
        cout,
        kernel_size,
        stride=1,
        proj_out=None,
        proj_stride=1,
        dtype=tf.float32,
        fused=True,
    ):
        super().__init__(name=name)
        with self.name_scope:
            self.group_norm = GroupNormReLU(channels=cin, fused=fused)
            self.standardized_conv2d = StandardizedConv2D(
                kernel_size=kernel_size, cin=cin, cout=cout, stride=stride, dtype=dtype
            )
            self.proj = None
            if proj_out is not None:  # 1x1 projection shortcut with the unit's stride
                with tf.name_scope("proj"):
                    self.proj = StandardizedConv2D(
                        kernel_size=1, cin=cin, cout=proj_out, stride=proj_stride, dtype=dtype
                    )


class Unit(tf.Module):
    """Pre-activation bottleneck `unitNN`; the stride sits on the 3x3 conv (and the projection)."""

    def __init__(self, name, *, cin, cmid, cout, stride, dtype=tf.float32, fused=True):
        super().__init__(name=name)
        needs_proj = stride != 1 or cin != cout
        with self.name_scope:
            self.a = SubUnit(
                "a",
                cin=cin,
                cout=cmid,
                kernel_size=1,
                proj_out=cout if needs_proj else None,
                proj_stride=stride,
                dtype=dtype,
                fused=fused,
            )
            self.b = SubUnit(
                "b", cin=cmid, cout=cmid, kernel_size=3, stride=stride, dtype=dtype, fused=fused
            )
            self.c = SubUnit("c", cin=cmid, cout=cout, kernel_size=1, dtype=dtype, fused=fused)

    def __call__(self, x):
        pre = self.a.group_norm(x)
        shortcut = self.a.proj(pre) if self.a.proj is not None else x
        h = self.a.standardized_conv2d(pre)
        h = self.b.standardized_conv2d(self.b.group_norm(h))
        h = self.c.standardized_conv2d(self.c.group_norm(h))
        return h + shortcut


class RootBlock(tf.Module):
    """Scope `root_block`: pad 3, WS conv 7x7/2, zero pad 1, max-pool 3x3/2 VALID (no GN/ReLU)."""

    def __init__(self, *, cout, dtype=tf.float32):
        super().__init__(name="root_block")
        with self.name_scope:
            self.standardized_conv2d = StandardizedConv2D(
                kernel_size=7, cin=3, cout=cout, stride=2, dtype=dtype
            )

    def __call__(self, x):
        x = self.standardized_conv2d(x)
        # Zero padding (not -inf) before the pool: conv outputs can be negative; BiT does this.
        return tf.nn.max_pool2d(_pad(x, 1, 1), 3, 2, "VALID")


class Head(tf.Module):
    """Scope `head/conv2d`: the checkpoint's [1, 1, C, K] kernel is stored reshaped to [C, K]."""

    def __init__(self, *, cin, num_classes, dtype=tf.float32):
        super().__init__(name="head")
        with self.name_scope, tf.name_scope("conv2d"):
            self.kernel = tf.Variable(
                tf.zeros([cin, num_classes], dtype), name="kernel", trainable=False
            )
            self.bias = tf.Variable(tf.zeros([num_classes]), name="bias", trainable=False)

    def __call__(self, pre_logits):
        logits = tf.matmul(tf.cast(pre_logits, self.kernel.dtype), self.kernel)
        return tf.cast(logits, tf.float32) + self.bias


# ---- the model -------------------------------------------------------------------------------


class ResNetV2(tf.Module):
    """BiT ResNet-v2 for any units per block, integer width and optional head, any input H, W.

    `ResNetV2(units=(3, 4, 6, 3), width=1, num_classes=21843)` (keywords only; from a checkpoint:
    `ResNetV2(**checkpoint.architecture._asdict())`). `dtype` is the compute dtype of convolutions
    and activations (float32, bfloat16 or float16; GN statistics stay float32).
    `fused_group_norm=False` keeps GroupNorm in TensorFlow ops even where the fused CPU kernel
    applies (benchmarks, tests).
    `__call__(x)`: float NHWC in [-1, 1] -> `(pre_logits [B, 2048*width] float32,
    logits [B, K] float32 or None)`. Not itself a `tf.function`: callers wrap it.
    """

    def __init__(
        self,
        *,
        units,
        width=1,
        num_classes=None,
        dtype=tf.float32,
        fused_group_norm=True,
        name="resnet",
    ):
        super().__init__(name=name)
        self.units = tuple(int(u) for u in units)
        self.width = int(width)
        self.num_classes = int(num_classes) if num_classes else None
        self.compute_dtype = _DTYPES[dtype] if isinstance(dtype, str) else tf.as_dtype(dtype)
        if self.compute_dtype not in _DTYPES.values():
            raise ValueError(f"unsupported compute dtype {self.compute_dtype.name}")
        wf, dt, fused = self.width, self.compute_dtype, fused_group_norm
        with self.name_scope:
            self.root_block = RootBlock(cout=64 * wf, dtype=dt)
            cin = 64 * wf
            self.blocks = []
            for b, n in enumerate(self.units, start=1):
                cmid = 64 * wf * 2 ** (b - 1)
                with tf.name_scope(f"block{b}"):
                    block = [
                        Unit(
                            f"unit{u:02d}",
                            cin=cin if u == 1 else 4 * cmid,
                            cmid=cmid,
                            cout=4 * cmid,
                            stride=2 if (u == 1 and b > 1) else 1,
                            dtype=dt,
                            fused=fused,
                        )
                        for u in range(1, n + 1)
                    ]
                self.blocks.append(block)
                cin = 4 * cmid
            self.group_norm = GroupNormReLU(channels=cin, fused=fused)
            self.head = (
                Head(cin=cin, num_classes=self.num_classes, dtype=dt) if self.num_classes else None
            )
        self.feature_dim = cin

    @property
    def architecture(self):
        return Architecture(self.units, self.width, self.num_classes)

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

    # ---- weight loading ----------------------------------------------------------------------

    def checkpoint_shapes(self):
        """Key -> shape this model expects from an official checkpoint (head kernel 4-D, as stored).

        The one layout table, `Architecture.expected_shapes()`."""
        return self.architecture.expected_shapes()

    @property
    def num_parameters(self):
        return self.architecture.num_params

    def load_weights(self, weights):
        """Strict copy of a checkpoint dict: any missing, unexpected or misshaped key is a
        `CheckpointError` (a ValueError) naming it. Each variable's name is its checkpoint key."""
        validate({k: np.shape(v) for k, v in weights.items()}, self.architecture)
        variables = {v.name.rsplit(":", 1)[0]: v for v in self.variables}
        if set(variables) != set(weights):  # the network and the layout table disagree: a bug
            raise AssertionError(
                f"ResNetV2 variables do not follow the checkpoint layout: "
                f"{sorted(set(variables) ^ set(weights))[:5]}"
            )
        for key, variable in variables.items():
            variable.assign(tf.cast(parameter_value(key, weights[key]), variable.dtype))
