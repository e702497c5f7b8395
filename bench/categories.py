"""Cost of the `categories` column (WordNet roll-up) against the model's CPU time per batch.

    .venv/bin/python bench/categories.py [--batches 200 --model_batches 3]

- "categories": `transforms.write.results_batch` with the categories column minus the same call
  without it (roll-up through `model.wordnet.Hierarchy` + the Arrow list column), CPU seconds per
  batch of 16 images, for top_k 10 (the default) and 50. Tags are random classes (little sharing of
  ancestors between tags: a pessimistic case) with random scores.
- "model": a random BiT R50x1 with the 21,843-class head, the cheapest job (tags and embeddings from
  one forward pass), batch 16, 224x224, float32, CPU seconds per batch. The default job also runs
  R101x3 (~17 times the CPU), so its share is ~17 times smaller than the one printed.
- the one-time cost per worker process of building the hierarchy (file read, sha256, ancestor CSR).
Target: categories < 5% of the job's CPU (R50x1 alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench.common import R50X1, load_note, median, result_line, table, write_checkpoint

BATCH = 16
TARGET = 0.05


def batch_cpu(hierarchy, labels, top_k: int, batches: int, categories: bool) -> float:
    """Median CPU seconds of results_batch over `batches` random batches."""
    from core.schema import results_schema
    from transforms.write import results_batch
    from transforms.write import top_k as top_k_of

    rng = np.random.default_rng(top_k)
    schema = results_schema(6144, categories=categories)
    emb = rng.standard_normal((BATCH, 6144)).astype(np.float32)
    times = []
    for _ in range(batches):
        scores = rng.random((BATCH, len(labels)), dtype=np.float32)
        idx, top = top_k_of(scores, top_k)
        started = time.process_time()
        keys, ones = [f"k{i}" for i in range(BATCH)], [1] * BATCH
        hierarchy_or_none = hierarchy if categories else None
        results_batch(
            keys, keys, ones, ones, idx, top, labels, emb, schema, hierarchy=hierarchy_or_none
        )
        times.append(time.process_time() - started)
    return median(times)


def model_cpu(batches: int) -> float:
    from model.bit import TagAndEmbedModel

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "r50.npz"), **R50X1)
        model = TagAndEmbedModel.load(ckpt, ckpt, batch_size=BATCH)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 224, 224, 3), dtype=np.uint8)
    model(images)  # trace
    times = []
    for _ in range(batches):
        started = time.process_time()
        model(images)
        times.append(time.process_time() - started)
    return median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--model_batches", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"categories: {load_note()}", flush=True)
    from model.labels import imagenet21k
    from model.wordnet import imagenet21k_hierarchy

    labels = imagenet21k()
    started = time.process_time()
    hierarchy = imagenet21k_hierarchy()
    load = time.process_time() - started
    rows = {}
    for k in (10, 50):
        with_it, without = (batch_cpu(hierarchy, labels, k, args.batches, c) for c in (True, False))
        rows[k] = with_it - without
    model = model_cpu(args.model_batches)
    print()
    table(
        ["what", "CPU ms per batch of 16", "share of the R50x1 job's CPU"],
        [("R50x1 model (tags + embeddings, one pass)", f"{model * 1e3:.0f}", "")]
        + [
            (f"categories, top_k {k}", f"{c * 1e3:.2f}", f"{c / (model + c):.3%}")
            for k, c in rows.items()
        ]
        + [("hierarchy load (once per worker process)", f"{load * 1e3:.0f}", "")],
    )
    share = rows[10] / (model + rows[10])
    result_line(
        "categories",
        share,
        TARGET,
        higher_is_better=False,
        share=f"{share:.4%}",
        categories_ms=f"{rows[10] * 1e3:.2f}",
        model_ms=f"{model * 1e3:.0f}",
    )


if __name__ == "__main__":
    main()
