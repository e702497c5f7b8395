"""Job outputs for the search tests: one real run, and outputs derived from it or made up.

- `run_job`: the real job on 8 small photo-like JPEGs with the tiny random models (their tags are
  saturated and identical, so tag tests replace them).
- `retag`: a copy of an output with hand-made tags (real ImageNet-21k wnids) and, optionally, a
  `categories` column in the exact contract schema, computed from those tags with the small
  hand-made `HIERARCHY` below; embeddings and footer are kept, so image queries still work.
- `synthetic_output`: rows with given vectors and a minimal footer, for sizes the real job would
  take too long to write (the IVF-PQ path needs >= 256 rows).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.schema import category_type, results_schema, tag_type
from core.schema import list_type as _list
from tests import corpus
from tests.jobs import job_args

NUM_PHOTOS = 8
GOLDEN = ("n02099601", "golden_retriever")
TABBY = ("n02123045", "tabby, tabby_cat")
CRANE_BIRD = ("n02012849", "crane")
CRANE_MACHINE = ("n03126707", "crane")
DOG = ("n02084071", "dog, domestic_dog, Canis_familiaris")
CAT = ("n02121808", "domestic_cat, house_cat, Felis_domesticus, Felis_catus")
BIRD = ("n01503061", "bird")
DEVICE = ("n03183080", "device")
# A hand-made slice of WordNet: tag wnid -> its hypernyms (the categories add them).
HIERARCHY = {GOLDEN[0]: [DOG], TABBY[0]: [CAT], CRANE_BIRD[0]: [BIRD], CRANE_MACHINE[0]: [DEVICE]}
CATEGORY_TYPE = category_type()


def run_job(root: pathlib.Path, models) -> tuple[str, list[str]]:
    """(OUTPUT, photo paths) of one local run of the job."""
    from pipeline.main import run

    photos = root / "photos"
    photos.mkdir()
    paths = []
    for i in range(NUM_PHOTOS):
        path = photos / f"p{i}.jpg"
        path.write_bytes(corpus.make_jpeg(64 + 8 * i, 48 + 4 * i, seed=100 + i))
        paths.append(str(path))
    output = root / "out"
    # --no_categories: the search tests bring their own hand-made hierarchy (`retag`); the WordNet
    # categories of a default run are searched in tests/test_engines.py.
    args = job_args(f"{photos}/*.jpg", output, models, "--no_categories", image_size=32)
    summary = run(args, save_main_session=False)
    assert summary["results"] == NUM_PHOTOS, summary
    return str(output), paths


def results(output: str) -> pa.Table:
    files = sorted(pathlib.Path(output).glob("results-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files).sort_by("key")


def footer(output: str) -> dict:
    path = sorted(pathlib.Path(output).glob("results-*.parquet"))[0]
    return {
        k.decode(): v.decode()
        for k, v in pq.read_schema(path).metadata.items()
        if k != b"ARROW:schema"
    }


def hand_made_tags(i: int) -> list[tuple[str, str, float]]:
    """Rows 0-3: a golden retriever and a crane (bird); rows 4-7: a tabby and a crane (machine);
    distinct scores so every ranking is decided."""
    if i < NUM_PHOTOS // 2:
        return [(*GOLDEN, 0.9 - 0.1 * i), (*CRANE_BIRD, 0.25 + 0.01 * i)]
    return [(*TABBY, 0.95 - 0.1 * (i - 4)), (*CRANE_MACHINE, 0.5 - 0.02 * i)]


def categories_of(tags: list[tuple[str, str, float]]) -> list[dict]:
    """Each tag and its HIERARCHY ancestors, an ancestor scored by its best descendant."""
    best: dict[str, tuple[str, float]] = {}
    for wnid, label, score in tags:
        for w, lab in [(wnid, label), *HIERARCHY.get(wnid, [])]:
            if w not in best or score > best[w][1]:
                best[w] = (lab, score)
    return [
        {"wnid": w, "label": lab, "score": s}
        for w, (lab, s) in sorted(best.items(), key=lambda kv: -kv[1][1])
    ]


def write_output(output: str, table: pa.Table, metadata: dict) -> str:
    """A committed run's output: the results file, then summary.json (a new run id each time)."""
    os.makedirs(output, exist_ok=True)
    pq.write_table(
        table.replace_schema_metadata(metadata),
        os.path.join(output, "results-00000-of-00001.parquet"),
    )
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump({"run_id": uuid.uuid4().hex, "results": table.num_rows}, f)
    return output


def retag(
    source: str,
    output: str,
    categories: bool = True,
    key_prefix: str = "",
    metadata: dict | None = None,
    extra_columns: dict | None = None,
) -> str:
    """A copy of `source` with `hand_made_tags` (and categories, contract schema), keys
    optionally prefixed, footer entries replaced by `metadata`, columns appended."""
    table = results(source)
    if "categories" in table.column_names:  # the source's own categories are replaced
        table = table.drop_columns(["categories"])
    tags = [hand_made_tags(i) for i in range(table.num_rows)]
    tag_rows = [
        [{"index": 0, "wnid": w, "label": lab, "score": s} for w, lab, s in row] for row in tags
    ]
    table = table.set_column(
        table.schema.get_field_index("tags"),
        table.schema.field("tags"),
        pa.array(tag_rows, _list(tag_type())),
    )
    if key_prefix:
        keys = [key_prefix + k for k in table.column("key").to_pylist()]
        table = table.set_column(0, table.schema.field("key"), pa.array(keys, pa.string()))
    if categories:  # contract order: key, source, ..., tags, categories, embedding
        table = table.add_column(
            table.schema.get_field_index("tags") + 1,
            pa.field("categories", _list(CATEGORY_TYPE)),
            pa.array([categories_of(t) for t in tags], _list(CATEGORY_TYPE)),
        )
    for name, column in (extra_columns or {}).items():
        table = table.append_column(name, column)
    meta = {**footer(source), **(metadata or {})}
    meta["categories"] = "hand-made test hierarchy" if categories else "none"
    return write_output(output, table, meta)


def synthetic_output(
    output: str, vectors: np.ndarray, prefix: str = "s", embedding_dtype: str = "float32"
) -> str:
    """Rows `{prefix}{i}` with `vectors` as embeddings, one GOLDEN tag each, minimal footer."""
    n, dim = vectors.shape
    metadata = {
        "embed_model": "synthetic",
        "embed_model_sha256": "0" * 64,
        "tags_model": "synthetic",
        "precision": "float32",
        "image_size": "32",
        "resize": "squash",
        "embedding_dtype": embedding_dtype,
    }
    schema = results_schema(dim, embedding_dtype=embedding_dtype, metadata=metadata)
    tags = pa.array(
        [[{"index": 0, "wnid": GOLDEN[0], "label": GOLDEN[1], "score": 0.5}]] * n, _list(tag_type())
    )
    table = pa.table(
        [
            pa.array([f"{prefix}{i}" for i in range(n)], pa.string()),
            pa.array([f"{prefix}{i}" for i in range(n)], pa.string()),
            pa.nulls(n, pa.int64()),
            pa.nulls(n, pa.int64()),
            pa.array([32] * n, pa.int32()),
            pa.array([32] * n, pa.int32()),
            tags,
            pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.dtype(embedding_dtype)).ravel()),
                type=schema.field("embedding").type,
            ),
        ],
        schema=schema,
    )
    return write_output(output, table, metadata)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """`n` vectors around 8 cluster centres (structure, so neighbours are meaningful)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(8, dim))
    return (centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def run_mixed_job(root: pathlib.Path, models) -> tuple[str, dict[str, bytes]]:
    """(OUTPUT, key -> the image's encoded bytes) of one local run of the job over every kind of
    input a thumbnail is read from: 4 image files, a TFRecord shard of 3 records and a WebDataset
    tar of 3 samples plus one whose image member is a link (to the first sample's image)."""
    from pipeline.main import run

    inputs = root / "inputs"
    inputs.mkdir()
    images = [corpus.make_jpeg(72 + 12 * i, 56 + 6 * i, seed=300 + i) for i in range(10)]
    originals = {}
    for i in range(4):
        path = inputs / f"p{i}.jpg"
        path.write_bytes(images[i])
        originals[str(path)] = images[i]
    records = [(f"tf/r{i}", images[4 + i]) for i in range(3)]
    corpus.write_tfrecord(str(inputs / "shard.tfrecord"), records)
    samples = [(f"wds/s{i}.jpg", images[7 + i]) for i in range(3)]
    corpus.write_tar(
        str(inputs / "shard.tar"), [*samples, ("wds/link.jpg", ("hard", "wds/s0.jpg"))]
    )
    originals.update(records)
    originals.update({name[:-4]: data for name, data in samples})
    originals["wds/link"] = images[7]
    output = root / "out"
    args = job_args(str(inputs), output, models, "--no_categories", image_size=32)
    summary = run(args, save_main_session=False)
    assert summary["results"] == len(originals), summary
    return str(output), originals


@contextlib.contextmanager
def live(app, host: str = "127.0.0.1"):
    """`app` served by uvicorn in a thread on a free port of `host`: yields its base URL."""
    import threading
    import time

    import uvicorn

    from search.server import listen, url_of

    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
