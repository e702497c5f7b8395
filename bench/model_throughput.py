"""CPU throughput of our BiT R50x1 (`model.resnet.ResNetV2`) against Keras ResNet50V2, same process.

BiT runs twice: as the job runs it (GroupNorm+ReLU in the fused CPU kernel of `model.kernels`) and
with GroupNorm in TensorFlow ops (the fallback when no C++ compiler is there). All random-weight
float32 models run inside `tf.function` on the same constant batch; after warm-up
the rounds alternate (order flipped every round) and medians are reported, because absolute img/s
drift on a shared machine while same-run ratios hold (docs/performance.md). BiT R50x1 costs
~19% more MACs an image than ResNet50V2 (`ARCHS` below; docs/benchmarks.md), so equal speed per
FLOP is a 0.84x raw ratio.

    .venv/bin/python -m bench.model_throughput --rounds 7
    .venv/bin/python -m bench.model_throughput --model r101x3 --batch_size 4 --rounds 3
(the second: the embedding model, fused kernel against TF ops; Keras stays as a yardstick)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from bench.common import alternating, median, result_line, table
from model.checkpoint import Architecture
from model.flops import macs_per_image
from model.group_norm import group_norm_implementation
from model.resnet import ResNetV2
from tests.bit_checkpoints import random_weights

ARCHS = {  # label, units, width, GMACs an image with the 21k head (model.flops)
    name: (label, units, width, macs_per_image(Architecture(units, width, 21843)) / 1e9)
    for name, label, units, width in (
        ("r50x1", "R50x1", (3, 4, 6, 3), 1),
        ("r101x3", "R101x3", (3, 4, 23, 3), 3),
    )
}
KERAS = "Keras ResNet50V2"


def build_models(model="r50x1", precision="float32"):
    """Build the benchmarked models: BiT fused, BiT TF-ops GN, Keras.

    Returns {name: traced fn}, {name: GMACs/img} and the objects to keep alive.
    """
    label, units, width, gmacs = ARCHS[model]
    weights = random_weights(units, width, 21843)
    bit = ResNetV2(units=units, width=width, num_classes=21843, dtype=precision)
    bit.load_weights(weights)
    bit_tf = ResNetV2(
        units=units, width=width, num_classes=21843, dtype=precision, fused_group_norm=False
    )
    bit_tf.load_weights(weights)
    del weights
    keras = tf.keras.applications.ResNet50V2(weights=None)
    names = f"BiT {label} (21k head)", f"BiT {label}, GN in TF ops", KERAS
    calls = (lambda x: bit(x)[1], lambda x: bit_tf(x)[1], lambda x: keras(x, training=False))
    return (
        {name: tf.function(call, autograph=False) for name, call in zip(names, calls)},
        dict(zip(names, (gmacs, gmacs, 3.48))),
        (bit, bit_tf, keras),
    )


def time_batches(fn, x, batches):
    start = time.perf_counter()
    for _ in range(batches):
        out = fn(x)
    out.numpy()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=sorted(ARCHS),
        default="r50x1",
        help="which BiT (the RESULT line's target is for r50x1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="measured rounds (each model once per round)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--batches", type=int, default=2, help="batches per model per round")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args(argv)

    fns, gmacs, _keep = build_models(args.model)
    x = tf.constant(
        np.random.default_rng(0)
        .uniform(-1, 1, (args.batch_size, args.image_size, args.image_size, 3))
        .astype(np.float32)
    )
    names = list(fns)
    n = args.batches * args.batch_size
    timed = {name: lambda f=fns[name]: n / time_batches(f, x, args.batches) for name in names}
    rates = alternating(timed, args.rounds, args.warmup)  # who goes first rotates every round
    med = {name: median(v) for name, v in rates.items()}
    print(
        f"CPU, {os.cpu_count()} cores, TF {tf.__version__}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, float32, "
        f"{args.rounds} rounds x {args.batches} batches "
        f"after {args.warmup} warm-up rounds, medians; GroupNorm: {group_norm_implementation()}"
    )
    rows = []
    for name in names:
        ratio = med[name] / med[KERAS]
        paired = median(b / k for b, k in zip(rates[name], rates[KERAS]))
        rows.append(
            (name, f"{gmacs[name]:.2f}", f"{med[name]:.2f}")
            + (f"{min(rates[name]):.2f}-{max(rates[name]):.2f}", f"{ratio:.3f}")
            + (f"{ratio * gmacs[name] / gmacs[KERAS]:.3f}", f"{paired:.3f}")
        )
    table(
        ["model", "GMACs/img", "img/s (median)", "img/s (min-max)", "vs Keras", "per FLOP"]
        + ["per-round median"],
        rows,
    )
    bit, bit_tf = names[0], names[1]
    ratio = med[bit] / med[KERAS]
    per_flop = ratio * gmacs[bit] / gmacs[KERAS]
    if args.model != "r50x1":
        print(
            f"{bit}: fused kernel / TF ops = {med[bit] / med[bit_tf]:.3f}x; "
            f"per FLOP vs Keras {per_flop:.3f}"
        )
        return ratio
    tf_ops = f"{med[bit_tf] / med[KERAS]:.3f}"
    result_line("model_throughput", ratio, 0.82, per_flop=f"{per_flop:.3f}", tf_ops_ratio=tf_ops)
    return ratio


if __name__ == "__main__":
    main()
