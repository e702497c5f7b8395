"""Independent float64 NumPy forward pass of BiT ResNet-v2, written from docs/checkpoint-format.md.

Takes the raw checkpoint dict (HWIO kernels, not standardized) and images in [-1, 1]; returns
`(pre_logits, logits or None)`. Slow and simple on purpose: the oracle the TF model is tested
against.
"""

import re

import numpy as np


def standardize(w):
    """WS: per output channel, population mean/var over H, W, I; eps 1e-10 inside the sqrt."""
    w = w.astype(np.float64)
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
    return (w - mean) / np.sqrt(var + 1e-10)


def pad(x, before, after):
    return np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


def conv(x, w, stride=1):
    """WS conv: symmetric padding (k-1)//2 before, rest after, then VALID conv via im2col."""
    w = standardize(w)
    kh, kw, cin, cout = w.shape
    x = pad(x, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
    b, h, wd, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((b, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :
            ]
            out += patch @ w[i, j]
    return out


def group_norm(x, gamma, beta, groups=32, eps=1e-5):
    """GN: per sample and group of contiguous channels, population variance over H, W, channels."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(b, h, w, c) * gamma.astype(np.float64) + beta.astype(np.float64)


def max_pool_3x3_s2(x):
    """Zero pad 1 (not -inf), then 3x3 stride-2 VALID max-pool."""
    x = pad(x, 1, 1)
    b, h, w, c = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    out = np.full((b, oh, ow, c), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(
                out, x[:, i : i + 2 * (oh - 1) + 1 : 2, j : j + 2 * (ow - 1) + 1 : 2, :]
            )
    return out


def forward(weights, images):
    """`weights`: checkpoint dict with `resnet/...` keys; `images`: [B, H, W, 3] in [-1, 1]."""
    p = lambda k: weights["resnet/" + k]  # noqa: E731
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    x = np.asarray(images, dtype=np.float64)
    x = conv(x, p("root_block/standardized_conv2d/kernel"), stride=2)
    x = max_pool_3x3_s2(x)
    units = {}
    for key in weights:
        m = re.match(r"resnet/block(\d)/unit(\d\d)/", key)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for b in sorted(units):
        for u in sorted(units[b]):
            s = f"block{b}/unit{u:02d}"
            stride = 2 if (u == 1 and b > 1) else 1
            pre = relu(group_norm(x, p(f"{s}/a/group_norm/gamma"), p(f"{s}/a/group_norm/beta")))
            proj = f"resnet/{s}/a/proj/standardized_conv2d/kernel"
            shortcut = conv(pre, weights[proj], stride) if proj in weights else x
            h = conv(pre, p(f"{s}/a/standardized_conv2d/kernel"))
            h = relu(group_norm(h, p(f"{s}/b/group_norm/gamma"), p(f"{s}/b/group_norm/beta")))
            h = conv(h, p(f"{s}/b/standardized_conv2d/kernel"), stride)
            h = relu(group_norm(h, p(f"{s}/c/group_norm/gamma"), p(f"{s}/c/group_norm/beta")))
            h = conv(h, p(f"{s}/c/standardized_conv2d/kernel"))
            x = h + shortcut
    x = relu(group_norm(x, p("group_norm/gamma"), p("group_norm/beta")))
    pre_logits = x.mean(axis=(1, 2))
    if "resnet/head/conv2d/kernel" not in weights:
        return pre_logits, None
    kernel = p("head/conv2d/kernel").astype(np.float64)
    logits = pre_logits @ kernel.reshape(kernel.shape[-2], kernel.shape[-1]) + p("head/conv2d/bias")
    return pre_logits, logits
