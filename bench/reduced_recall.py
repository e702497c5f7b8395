"""Recall@10 of reduced (PCA) and float16 embeddings against full float32 ones, cosine similarity.

    .venv/bin/python bench/reduced_recall.py [--images 2400 --synthetic 12000 --queries 300]

Two test sets, each split into a database and held-out queries; the basis is fitted on the
database with `model.pca.fit_basis` (exact covariance), as `./run.sh fit_pca` does:
- "photos": skimage's bundled sample photos, each augmented many times (random crops, flips,
  brightness, noise), embedded at 64x64 by a RANDOM-weight BiT net with 6144-d pre-logits (units
  1,1,1,1, width 3: R101x3's embedding width). Random weights are not real features: the numbers
  show what the reduction keeps of this net's geometry, not of BiT-M's.
- "clusters": synthetic 6144-d vectors, 400 clusters with a power-law spectrum (a few strong
  directions, a long tail), non-negative like ReLU-pooled pre-logits.
Recall@10 = |top-10 by the variant ∩ top-10 by full float32 cosine| / 10, averaged over queries.
The reduced embeddings are centred (the basis's mean is subtracted) before the projection, and
centring alone changes cosine neighbours when the embeddings share a large mean (ReLU-pooled
features do): the second recall column compares with full-dimension cosine AFTER centring, which
isolates what the dropped dimensions cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.common import load_note, sample_photos, table, write_checkpoint

DIMS = (256, 1024, 2048)
K = 10


# skimage's sample photos that ship inside its wheel (no download), colour and grey.
PHOTOS = (
    *("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text"),
    *("clock", "horse", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry"),
    *("retina", "logo", "colorwheel", "checkerboard"),
)


def augment(photo: np.ndarray, rng, size: int = 64) -> np.ndarray:
    """A random crop (40-100% of the short side), flip, brightness and noise, resized to size."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = out * rng.uniform(0.7, 1.3) + rng.normal(0, 6, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def photo_embeddings(n: int, tmp: str, seed: int = 0) -> tuple[np.ndarray, str]:
    from model.bit import TagAndEmbedModel

    ckpt = write_checkpoint(
        os.path.join(tmp, "wide.npz"), units=(1, 1, 1, 1), width=3, num_classes=8, seed=seed
    )  # a small head: only embeddings are used
    model = TagAndEmbedModel.load(ckpt, ckpt, batch_size=32)
    photos = sample_photos(PHOTOS)
    rng = np.random.default_rng(seed)
    images = np.stack([augment(photos[i % len(photos)], rng) for i in range(n)])
    out = [model(images[i : i + 32]).embeddings for i in range(0, n, 32)]
    return np.concatenate(out)[:n], f"{len(photos)} photos x {n // len(photos)} augmentations"


def cluster_embeddings(n: int, d: int = 6144, clusters: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.arange(1, d + 1) ** 0.6  # power-law scales of the axes
    centres = rng.standard_normal((clusters, d)) * spectrum * 3
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * spectrum
    return np.maximum(x + 0.5 * spectrum, 0).astype(np.float32)


def top_k(queries: np.ndarray, database: np.ndarray, k: int = K) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    db = database / np.linalg.norm(database, axis=1, keepdims=True)
    sims = q @ db.T
    idx = np.argpartition(-sims, k, axis=1)[:, :k]
    return idx


def f16(x: np.ndarray) -> np.ndarray:
    """`x` rounded to float16, as a float16 column stores it."""
    return x.astype(np.float16).astype(np.float32)


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(g)) / K for t, g in zip(truth, got)]))


def evaluate(name: str, x: np.ndarray, queries: int) -> list:
    from model.pca import fit_basis

    db, q = x[queries:], x[:queries]
    truth = top_k(q.astype(np.float64), db.astype(np.float64))
    rows = []
    half = top_k(f16(q), f16(db))
    started = time.process_time()
    basis = fit_basis((db[i : i + 2048] for i in range(0, len(db), 2048)), dims=max(DIMS))
    fit_cpu = time.process_time() - started
    mean = basis.mean.astype(np.float64)
    centred = top_k(q - mean, db - mean)
    rows.append((name, "float16, full dims", recall(truth, half), recall(centred, half), ""))
    rows.append((name, "float32, full dims, centred", recall(truth, centred), 1.0, ""))
    for n in DIMS:
        sub = basis._replace(components=basis.components[:n])
        got = top_k(sub.project(q), sub.project(db))
        var = f"{float(np.sum(basis.explained_variance_ratio[:n])):.3f}"
        rows.append((name, f"PCA {n}", recall(truth, got), recall(centred, got), var))
        got16 = top_k(f16(sub.project(q)), f16(sub.project(db)))
        rows.append((name, f"PCA {n}, float16", recall(truth, got16), recall(centred, got16), var))
    print(
        f"  [{name}] {len(db)} database x {x.shape[1]}-d, {queries} queries; basis fit "
        f"{fit_cpu:.1f} s CPU",
        flush=True,
    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--synthetic", type=int, default=12000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args(argv)
    import tempfile

    print(f"reduced_recall: {load_note()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        photos, what = photo_embeddings(args.images, tmp)
        print(
            f"  embedded {len(photos)} images ({what}) in {time.time() - started:.0f} s", flush=True
        )
        rows += evaluate("photos (random-weight net)", photos, args.queries)
    rows += evaluate("clusters (synthetic)", cluster_embeddings(args.synthetic), args.queries)
    print()
    table(
        ["test set", "variant", f"recall@{K} vs full float32", "vs full float32, centred"]
        + ["explained variance"],
        [(name, variant, f"{r:.3f}", f"{rc:.3f}", var) for name, variant, r, rc, var in rows],
        text=(0, 1),
    )


if __name__ == "__main__":
    main()
