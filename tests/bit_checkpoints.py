"""Small random BiT checkpoints in the official `.npz` layout (docs/checkpoint-format.md section 1).

Tests write these themselves: no real weights can be downloaded here.
"""

import numpy as np


def checkpoint_shapes(units=(1, 1, 1, 1), width=1, num_classes=None):
    """Key -> shape of every array of an official BiT checkpoint with this architecture."""
    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64 * width)}
    cin = 64 * width
    for b, n in enumerate(units, start=1):
        cmid = 64 * width * 2 ** (b - 1)
        cout = 4 * cmid
        for u in range(1, n + 1):
            scope = f"resnet/block{b}/unit{u:02d}"
            shapes[f"{scope}/a/group_norm/gamma"] = (cin,)
            shapes[f"{scope}/a/group_norm/beta"] = (cin,)
            shapes[f"{scope}/a/standardized_conv2d/kernel"] = (1, 1, cin, cmid)
            shapes[f"{scope}/b/group_norm/gamma"] = (cmid,)
            shapes[f"{scope}/b/group_norm/beta"] = (cmid,)
            shapes[f"{scope}/b/standardized_conv2d/kernel"] = (3, 3, cmid, cmid)
            shapes[f"{scope}/c/group_norm/gamma"] = (cmid,)
            shapes[f"{scope}/c/group_norm/beta"] = (cmid,)
            shapes[f"{scope}/c/standardized_conv2d/kernel"] = (1, 1, cmid, cout)
            if u == 1:
                shapes[f"{scope}/a/proj/standardized_conv2d/kernel"] = (1, 1, cin, cout)
            cin = cout
    shapes["resnet/group_norm/gamma"] = (cin,)
    shapes["resnet/group_norm/beta"] = (cin,)
    if num_classes:
        shapes["resnet/head/conv2d/kernel"] = (1, 1, cin, num_classes)
        shapes["resnet/head/conv2d/bias"] = (num_classes,)
    return shapes


def random_weights(units=(1, 1, 1, 1), width=1, num_classes=None, seed=0):
    """Random float32 arrays, plausible scales (GN gamma near 1, small beta, He-scaled kernels)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in checkpoint_shapes(units, width, num_classes).items():
        if key.endswith("/gamma"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif key.endswith("/beta") or key.endswith("/bias"):
            value = 0.1 * rng.standard_normal(shape)
        else:  # HWIO kernel, with a per-output-channel offset so WS has a mean to remove
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in) + 0.01 * rng.standard_normal(
                shape[-1]
            )
        weights[key] = value.astype(np.float32)
    return weights


def write_checkpoint(path, units=(1, 1, 1, 1), width=1, num_classes=None, seed=0):
    """Write a random checkpoint to `path` (np.savez, as the official files); return its weights."""
    weights = random_weights(units, width, num_classes, seed)
    with open(path, "wb") as f:
        np.savez(f, **weights)
    return weights
