"""`./run.sh serve` on a 50,000-image index: server-side latency of tag, key and photo queries,
thumbnails, and the page's first render in headless Chromium.

    python bench/serve.py                 # 50,000 rows of 2048-d, data kept in bench/out/serve/
    python bench/serve.py --rows 20000 --dim 6144 --queries 100

The index is built once (then reused) from a synthetic OUTPUT: `bench/search_recall.py`'s
structured vectors; per image 10 tags of 2,000 ImageNet-21k classes (the 4 of its topic, one of
1,000 topics, then 6 of all the classes), rolled up the real WordNet hierarchy into `categories` by
the job's own code (`transforms.write.results_batch`); sources that are real files: 5,000
photo-sized JPEGs (640x480 crops of scikit-image's photos, 10 rows a file), 50 of 3000x2000, and a
TFRecord shard of 1,000 records, each row with the `source_offset`/`source_length` the job
records. The footer names a tiny random BiT checkpoint whose embedding has `--dim` dimensions, so
photo queries load and run a real (small) model.

The server runs as `python -m search serve` in a child process; the client asks one query at a
time over one keep-alive connection. Tag queries are the first tags of random images (common tags
more often, as people search); broad categories and 'entity' (every image) are reported apart.
Reported: the server's own `took_ms` (p50/p95) and the round trip, at k=10 (the API's default) and
k=36 (the page's); for photos, `took_ms` less the model's forward pass (`embed_ms`); thumbnails cold
(each id once) by kind of source, and cached; the page: navigation start to first contentful
paint, load event, results drawn and its first 12 thumbnails loaded (p50 of 5 fresh browser
contexts). Ends with the RESULT line: the worst p50 / target ratio (tag 20 ms, key 20 ms, photo
less the model 30 ms, thumbnails 30 ms, first render 1,000 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid

import common
import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"tag": 20.0, "key": 20.0, "photo": 30.0, "thumbnail": 30.0, "first render": 1000.0}
TAG_CLASSES = 2000
TOPICS = 1000
DATA_VERSION = 4  # of the generated index (its directory name): a new one is built when it changes
TAGS_PER_IMAGE = 10
FILES, BIG_FILES, RECORDS = 5000, 50, 1000


# ------------------------------------------------------------------------------------- data


def photo_crops(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """`count` JPEGs of `size`: random crops of scikit-image's photos, resized, quality 85."""
    from PIL import Image

    from tests.sample_photos import COLOUR_PHOTOS

    photos = [Image.fromarray(a) for a in common.sample_photos(COLOUR_PHOTOS)]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        photo = rng.choice(photos)
        w, h = photo.size
        cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((x, y, x + cw, y + ch)).resize(size)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def dedupe(row, classes, rng):
    """`row` with a repeated class replaced by another (a tag is given once)."""
    seen, out = set(), []
    for c in row:
        while c in seen:
            c = rng.choice(classes)
        seen.add(c)
        out.append(c)
    return np.asarray(out)


def build(root: str, rows: int, dim: int) -> str:
    """The OUTPUT (results + summary.json) and its index under `root`; returns OUTPUT."""
    import pyarrow.parquet as pq
    from search_recall import make_vectors

    from core.schema import results_schema
    from model.labels import imagenet21k
    from model.wordnet import imagenet21k_hierarchy
    from search.index import build_index
    from tests import corpus
    from transforms.write import results_batch

    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    tags_ckpt = common.write_checkpoint(f"{root}/tags.npz", (1, 1, 1, 1), 1, 21843, seed=1)
    embed_ckpt = common.write_checkpoint(f"{root}/embed.npz", (1, 1, 1, 1), dim // 2048, None, 2)
    files = common.write_files(f"{root}/files", photo_crops(FILES, (640, 480), seed=1))
    big = common.write_files(f"{root}/big", photo_crops(BIG_FILES, (3000, 2000), seed=2))
    records = photo_crops(RECORDS, (640, 480), seed=3)
    shard = f"{root}/photos.tfrecord"
    starts = corpus.write_tfrecord(shard, [(f"tf/{i:04d}", r) for i, r in enumerate(records)])
    ends = starts[1:] + [os.path.getsize(shard)]
    spans = [(start + 12, end - start - 16) for start, end in zip(starts, ends)]  # record data
    print(f"# inputs written in {time.perf_counter() - started:.0f} s", flush=True)

    labels, hierarchy = imagenet21k(), imagenet21k_hierarchy()
    rng = np.random.default_rng(0)
    classes = rng.choice(len(labels.wnids), TAG_CLASSES, replace=False)
    # 1,000 topics (what a photo shows), each with 4 classes of its own (a class in ~2 topics);
    # an image: its topic's classes first (best scores), then 6 of the long tail
    topics = rng.choice(classes, (TOPICS, 4))
    sha = hashlib.sha256(open(embed_ckpt, "rb").read()).hexdigest()
    metadata = {
        "embed_model": embed_ckpt,
        "embed_model_sha256": sha,
        "tags_model": tags_ckpt,
        "tags_model_sha256": hashlib.sha256(open(tags_ckpt, "rb").read()).hexdigest(),
        "precision": "float32",
        "image_size": "224",
        "resize": "squash",
        "embedding_dtype": "float32",
        "categories": "wordnet-3.0",
        "label_set": labels.version,
    }
    schema = results_schema(dim, metadata=metadata, categories=True)
    output = f"{root}/out"
    os.makedirs(output, exist_ok=True)
    vectors = make_vectors(rows, dim)
    with pq.ParquetWriter(f"{output}/results-00000-of-00001.parquet", schema) as writer:
        for start in range(0, rows, 4096):
            ids = range(start, min(rows, start + 4096))
            b = len(ids)
            keys, sources, offsets, lengths = [], [], [], []
            for i in ids:
                if i < RECORDS:
                    keys.append(f"tf/{i:04d}")
                    sources.append(f"{shard}:{i}")
                    offsets.append(spans[i][0])
                    lengths.append(spans[i][1])
                else:
                    path = big[i - RECORDS] if i < RECORDS + BIG_FILES else files[i % FILES]
                    keys.append(f"img/{i:06d}")
                    sources.append(path)
                    offsets.append(0)
                    lengths.append(os.path.getsize(path))
            topic = topics[rng.integers(0, TOPICS, b)]
            tail = rng.choice(classes, (b, TAGS_PER_IMAGE))
            top = np.concatenate([topic, tail[:, : TAGS_PER_IMAGE - 4]], axis=1)
            top = np.stack([dedupe(row, classes, rng) for row in top])
            scores = np.sort(rng.uniform(0.05, 0.99, (b, TAGS_PER_IMAGE)).astype(np.float32))[
                :, ::-1
            ]
            batch = results_batch(
                keys,
                sources,
                [640] * b,
                [480] * b,
                top,
                np.ascontiguousarray(scores),
                labels,
                vectors[start : start + b],
                schema,
                hierarchy=hierarchy,
                source_offsets=offsets,
                source_lengths=lengths,
            )
            writer.write_batch(batch)
    with open(f"{output}/summary.json", "w") as f:
        json.dump({"run_id": uuid.uuid4().hex, "results": rows}, f)
    print(f"# results written, {time.perf_counter() - started:.0f} s; indexing", flush=True)
    report = build_index(output, log_every_secs=60)
    print(
        f"# index: {report['rows']} rows, {report['vector_index']}, {report['seconds']:.0f} s, "
        f"{report['bytes_per_image']:,} bytes/image",
        flush=True,
    )
    os.remove(f"{output}/results-00000-of-00001.parquet")  # the index has what it needs
    with open(f"{root}/built", "w") as f:
        f.write("ok")
    return output


# -------------------------------------------------------------------------------- measuring


class Client:
    """One keep-alive HTTP connection to the server; `get`/`post` -> (status, body, wall ms)."""

    def __init__(self, url: str):
        host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def request(self, method, path, body=None, headers=None):
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data, (time.perf_counter() - started) * 1000

    def search(self, path, body=None, headers=None):
        status, data, wall = self.request("POST" if body else "GET", path, body, headers)
        assert status == 200, (path, status, data[:300])
        answer = json.loads(data)
        return answer, wall


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def multipart(data: bytes) -> tuple[bytes, dict]:
    boundary = "----bench" + uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def page_timings(url: str, runs: int) -> dict:
    """Navigation start -> first contentful paint, load, results drawn, first thumbnails loaded
    (the 12 the page loads at once; the others wait until they are scrolled into view)."""
    from tests.browser import playwright_browser

    loaded = (
        "() => document.body.dataset.state === 'results' && Array.from("
        "document.querySelectorAll('.card img:not([loading=lazy])'))"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    names = ("first contentful paint", "load event", "results drawn", "first 12 thumbnails loaded")
    out: dict = {name: [] for name in names}
    with playwright_browser() as browser:
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(url)
            page.wait_for_function(loaded, timeout=60_000)
            times = page.evaluate(
                """() => [
                  performance.getEntriesByName('first-contentful-paint')[0].startTime,
                  performance.getEntriesByType('navigation')[0].loadEventEnd,
                  performance.getEntriesByName('results-rendered')[0].startTime,
                  performance.now()]"""
            )
            for name, value in zip(names, times):
                out[name].append(value)
            context.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048, help="a multiple of 2048 (BiT widths)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dir", default=os.path.join(BENCH, "out", "serve"))
    args = ap.parse_args(argv)
    sys.path.insert(0, BENCH)
    root = os.path.join(args.dir, f"{args.rows}x{args.dim}-v{DATA_VERSION}")
    print(f"# {common.load_note()} at the start")
    output = f"{root}/out"
    if not os.path.exists(f"{root}/built"):
        output = build(root, args.rows, args.dim)

    started = time.perf_counter()
    log = open(f"{root}/server.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        [sys.executable, "-m", "search", "serve", output, "--port", "0"],
        cwd=common.REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = server.stdout.readline()
        url = re.search(r"at (http://\S+/) ", line).group(1)
        startup_s = time.perf_counter() - started
        return measure(args, root, url, startup_s)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def measure(args, root: str, url: str, startup_s: float) -> int:
    from search.index import open_index
    from search.originals import Location, Originals
    from search.terms import normalise
    from search.thumbnails import Thumbnails

    client = Client(url)
    rng = random.Random(7)
    index = open_index(f"{root}/out")
    vocab = index.vocabulary.to_arrow()
    keys = index.images.search().select(["key"]).limit(None).to_arrow().column("key").to_pylist()
    # tags as users type them: lemmas of the classes images were tagged with (their categories'
    # leaves), drawn with the images' own frequencies
    sample = index.images.search().select(["tags"]).limit(2000).to_arrow().column("tags")
    typed = [normalise(t) for row in sample.to_pylist() for t in row[:1]]
    terms = set(vocab.column("term").to_pylist())
    tag_queries = [t for t in (rng.choice(typed) for _ in range(args.queries * 3)) if t in terms]
    tag_queries = tag_queries[: args.queries]
    rows, notes = [], []

    def run(name, paths, body_of=None):
        took, wall, extra = [], [], []
        for i, path in enumerate(paths):
            body, headers = body_of(i) if body_of else (None, None)
            answer, ms = client.search(path, body, headers)
            took.append(answer["took_ms"])
            wall.append(ms)
            if "embed_ms" in answer:
                extra.append(answer["took_ms"] - answer["embed_ms"])
        return took, wall, extra

    import urllib.parse as up

    def line(name, took, wall, target=None):
        rows.append((name, len(took), pct(took, 50), pct(took, 95), pct(wall, 50), target))
        return pct(took, 50)

    for q in tag_queries[:10]:  # warm up: caches, the threadpool
        client.search(f"/api/search?k=10&tag={up.quote(q)}")
    # categories of every breadth: the wnids in 2-20% of the images, and the one in all of them
    import pyarrow.compute as pc

    counts = pc.value_counts(
        index.images.search()
        .select(["wnids"])
        .limit(None)
        .to_arrow()
        .column("wnids")
        .combine_chunks()
        .flatten()
    ).to_pylist()
    broad_wnids = sorted(c["values"] for c in counts if 0.02 <= c["counts"] / len(keys) <= 0.2)
    broad_wnids = rng.sample(broad_wnids, min(50, len(broad_wnids)))
    key_sample = rng.sample(keys, min(args.queries, len(keys)))
    p50 = {}
    for k in (10, 36):
        took, wall, _ = run("tag", [f"/api/search?k={k}&tag={up.quote(t)}" for t in tag_queries])
        p50[("tag", k)] = line(f"tag query, k={k}", took, wall, TARGETS["tag"] if k == 10 else None)
        took, wall, _ = run("key", [f"/api/search?k={k}&key={up.quote(q)}" for q in key_sample])
        p50[("key", k)] = line(f"key query, k={k}", took, wall, TARGETS["key"] if k == 10 else None)
    took, wall, _ = run("broad", [f"/api/search?k=10&tag={w}" for w in broad_wnids])
    line("tag query, broad categories (2-20% of the images), k=10", took, wall)
    took, wall, _ = run("entity", ["/api/search?k=10&tag=entity"] * 20)
    line("tag query, 'entity' (every image), k=10", took, wall)
    tag_p50, key_p50 = p50[("tag", 10)], p50[("key", 10)]

    photos = photo_crops(40, (640, 480), seed=11)
    client.search("/api/search?k=10", *multipart(photos[0]))  # loads the model
    took, wall, overhead = run(
        "photo", ["/api/search?k=10"] * (len(photos) - 1), lambda i: multipart(photos[i + 1])
    )
    embed = [t - o for t, o in zip(took, overhead)]
    line("photo query, k=10: the whole answer", took, wall)
    rows.append(
        ("  the model's forward pass", len(took), pct(embed, 50), pct(embed, 95), None, None)
    )
    rows.append(
        (
            "  the rest (upload, decode, search)",
            len(took),
            pct(overhead, 50),
            pct(overhead, 95),
            None,
            TARGETS["photo"],
        )
    )
    photo_p50 = pct(overhead, 50)

    version = json.loads(client.request("GET", "/api/info")[1])["version"]
    ids = (
        index.images.search().select(["_rowid", "key", "source"]).limit(None).to_arrow().to_pylist()
    )
    kinds = {
        "thumbnail, 640x480 file": [
            r for r in ids if r["key"].startswith("img/") and "/files/" in r["source"]
        ],
        "thumbnail, 3000x2000 file": [r for r in ids if "/big/" in r["source"]],
        "thumbnail, TFRecord record": [r for r in ids if r["key"].startswith("tf/")],
    }
    thumb_p50 = None
    for name, candidates in kinds.items():
        chosen = rng.sample(candidates, min(150, len(candidates)))
        wall = []
        for r in chosen:
            status, data, ms = client.request("GET", f"/api/thumbnail/{r['_rowid']}?v={version}")
            assert status == 200 and data[:2] == b"\xff\xd8", (status, data[:200])
            wall.append(ms)
        rows.append(
            (
                name + " (cold)",
                len(wall),
                None,
                None,
                pct(wall, 50),
                TARGETS["thumbnail"] if "640" in name else None,
            )
        )
        if "640" in name:
            thumb_p50 = pct(wall, 50)
            again = [
                client.request("GET", f"/api/thumbnail/{r['_rowid']}?v={version}")[2]
                for r in chosen[:100]
            ]
            rows.append(("thumbnail, cached", len(again), None, None, pct(again, 50), None))
    # the fallback of outputs written before the offsets existed: records scanned, in-process
    thumbs = Thumbnails(Originals())
    deep = [r for r in kinds["thumbnail, TFRecord record"] if int(r["key"][3:]) >= RECORDS // 2][
        :20
    ]
    scan = []
    for r in deep:
        t0 = time.perf_counter()
        thumbs.make(Location(r["key"], r["source"], run="(scan measurement)"))
        scan.append((time.perf_counter() - t0) * 1000)
    rows.append(
        (
            "thumbnail, TFRecord scanned (no offsets; in-process)",
            len(scan),
            None,
            None,
            pct(scan, 50),
            None,
        )
    )

    page = page_timings(f"{url}?tag={up.quote(tag_queries[0])}", 5)
    first_render = float(np.median(page["first contentful paint"]))

    print(
        f"\n{len(keys):,} images of {args.dim}-d; server start-up (imports, index, vocabulary) "
        f"{startup_s:.1f} s; {common.load_note()} at the end\n"
    )
    table_rows = [
        [
            name,
            n,
            f"{p50:.1f}" if p50 is not None else "",
            f"{p95:.1f}" if p95 is not None else "",
            f"{w:.1f}" if w is not None else "",
            f"<= {t:g}" if t else "",
        ]
        for name, n, p50, p95, w, t in rows
    ]
    common.table(
        ["measure", "n", "server p50 ms", "server p95 ms", "round trip p50 ms", "target ms"],
        table_rows,
    )
    print()
    common.table(
        ["page (/?tag=...)", "p50 ms", "runs"],
        [[name, f"{np.median(v):.0f}", len(v)] for name, v in page.items()],
    )
    for note in notes:
        print(f"# {note}")
    ratios = {
        "tag": tag_p50 / TARGETS["tag"],
        "key": key_p50 / TARGETS["key"],
        "photo": photo_p50 / TARGETS["photo"],
        "thumbnail": thumb_p50 / TARGETS["thumbnail"],
        "first render": first_render / TARGETS["first render"],
    }
    common.result_line(
        "serve",
        max(ratios.values()),
        1.0,
        higher_is_better=False,
        tag_p50_ms=f"{tag_p50:.1f}",
        key_p50_ms=f"{key_p50:.1f}",
        photo_rest_p50_ms=f"{photo_p50:.1f}",
        thumbnail_p50_ms=f"{thumb_p50:.1f}",
        first_render_ms=f"{first_render:.0f}",
        rows=len(keys),
        dim=args.dim,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
