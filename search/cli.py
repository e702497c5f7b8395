"""Command line of `./run.sh index`, `search` and `serve` (`python -m search index|search|serve`).

Exit codes: `core.errors.exit_code` (which error gives which code: docs/outputs.md, "Exit codes").
Keys, sources and tags printed as a table have their control characters escaped
(`core.text.printable`); `--json` prints them exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.args import integer, number
from core.errors import ArgumentParser, exit_code
from core.text import printable
from search import SearchError, ann

_LOG = logging.getLogger(__name__)

MAX_K = 10_000  # results per query (a larger k is a usage error, not an allocation abort)
MAX_NPROBES = 65_536
MAX_REFINE_FACTOR = 1_000


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="run.sh", description="Index and search the job's results.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    ix = sub.add_parser(
        "index",
        help="build or append to the index of an OUTPUT",
        description="Index OUTPUT/results-*.parquet (local or gs://); running it "
        "again with another OUTPUT appends to the same index.",
    )
    ix.add_argument("output", metavar="OUTPUT", help="the --output of a job run")
    ix.add_argument(
        "--index_dir",
        default=None,
        help="where the index lives (default OUTPUT/index/; for a gs:// OUTPUT "
        "$BIT_CACHE_DIR/index/gs/BUCKET/PATH on local disk)",
    )
    ix.add_argument(
        "--ann_min_rows",
        type=integer(0),
        default=ann.ANN_MIN_ROWS,
        help="build the vector index from this many images on (below, "
        f"queries scan every vector exactly; default {ann.ANN_MIN_ROWS})",
    )
    ix.add_argument(
        "--log_every_secs",
        type=number(0.0),
        default=10.0,
        help="seconds between progress lines while indexing (0: none)",
    )

    se = sub.add_parser(
        "search",
        help="query an index",
        description="One query per call: --image, --key or --tag; --image and "
        "--tag combine (nearest images within the tag).",
    )
    se.add_argument(
        "index",
        metavar="INDEX_OR_OUTPUT",
        help="an index directory, or a job OUTPUT whose default index to use",
    )
    se.add_argument("--image", help="query image file (local or gs://): nearest images")
    se.add_argument("--key", help="an indexed key: its nearest neighbours")
    se.add_argument(
        "--tag",
        help="a wnid or lemma (case-insensitive, spaces = underscores): "
        "images whose categories contain it, by category score",
    )
    se.add_argument(
        "--k",
        type=integer(1, MAX_K),
        default=10,
        help=f"results to return, 1 to {MAX_K:,} (default 10)",
    )
    se.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array (best first) of {key, source, score, tags}",
    )
    se.add_argument(
        "--nprobes",
        type=integer(1, MAX_NPROBES),
        default=ann.DEFAULT_NPROBES,
        help=f"IVF partitions probed (default {ann.DEFAULT_NPROBES})",
    )
    se.add_argument(
        "--refine_factor",
        type=integer(1, MAX_REFINE_FACTOR),
        default=ann.DEFAULT_REFINE_FACTOR,
        help="candidates re-ranked with the full vectors, x k "
        f"(default {ann.DEFAULT_REFINE_FACTOR})",
    )
    se.add_argument(
        "--embed_model",
        default=None,
        help="embed model for --image (default: the source in the results' footer; "
        "its sha256 must match)",
    )
    se.add_argument(
        "--tags_model", default=None, help="tags model to load alongside (default: the footer's)"
    )
    se.add_argument(
        "--model_cache_dir",
        default=None,
        help="checkpoint cache (default $BIT_CACHE_DIR or ~/.cache/bit_tagger)",
    )
    sv = sub.add_parser(
        "serve",
        help="serve a search page and a JSON API over an index",
        description="A search page and a JSON API over one index (docs/serve.md): tags, keys and "
        "photos, with thumbnails. One process; the embed model loads on the first photo query.",
    )
    sv.add_argument(
        "index",
        metavar="INDEX_OR_OUTPUT",
        help="an index directory, or a job OUTPUT whose default index to use",
    )
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; another address is "
        "reachable by others, with no login)",
    )
    sv.add_argument(
        "--port", type=integer(0, 65535), default=8000, help="port (default 8000; 0: any free one)"
    )
    for name in ("embed_model", "tags_model", "model_cache_dir"):
        action = next(a for a in se._actions if a.dest == name)
        sv.add_argument(f"--{name}", default=None, help=action.help.replace("--image", "photos"))
    return ap


def run_serve(args) -> int:
    from search.server import serve

    return serve(
        args.index,
        args.host,
        args.port,
        embed_model=args.embed_model,
        tags_model=args.tags_model,
        model_cache_dir=args.model_cache_dir,
    )


def run_index(args) -> int:
    from search.index import build_index

    report = build_index(
        args.output,
        args.index_dir,
        ann_min_rows=args.ann_min_rows,
        log_every_secs=args.log_every_secs,
    )
    print(
        f"indexed {report['rows_added']} new images of {report['rows_read']} read from "
        f"{report['files']} files of {printable(report['output'])} in {report['seconds']:.1f} s; "
        f"{printable(report['index_dir'])} holds {report['rows']} images, {report['bytes']:,} "
        f"bytes ({report['bytes_per_image']:,} bytes/image), vector index: "
        f"{report['vector_index']}"
    )
    return 0


def run_search(args) -> int:
    from search.index import lance_errors, open_index

    modes = {name for name in ("image", "key", "tag") if getattr(args, name) is not None}
    if modes not in ({"image"}, {"key"}, {"tag"}, {"image", "tag"}):
        raise SearchError("give one of --image, --key or --tag (only --image and --tag combine)")
    index = open_index(args.index)
    with lance_errors(index.dir):
        hits = _query(args, index)
    if index.settings.get("tag_column") == "tags" and args.tag is not None:
        print(
            "note: this index was built from results without a categories column: tags match "
            "only the tagged classes themselves, not their hypernyms",
            file=sys.stderr,
        )
    if not hits:
        print("no matching images", file=sys.stderr)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], indent=1))
    else:
        print(table(hits, index.settings.get("tag_column")))
    return 0


def _query(args, index) -> list:
    from search import query

    options = {"nprobes": args.nprobes, "refine_factor": args.refine_factor}
    wnids = None
    if args.tag is not None:
        synsets = query.resolve_tag(index, args.tag)
        wnids = [w for w, _ in synsets]
        if len(synsets) > 1:
            listed = ", ".join(f"{w} ({lab})" for w, lab in synsets)
            print(
                printable(f"tag {args.tag!r} names {len(synsets)} synsets, all matched: {listed}"),
                file=sys.stderr,
            )
    if args.image is not None:
        data = query.read_image(args.image)
        model = query.load_model(index, args.embed_model, args.tags_model, args.model_cache_dir)
        vector = query.embed_image(index, data, model, what=f"--image {args.image}")
        hits = query.by_vector(index, vector, args.k, wnids=wnids, **options)
    elif args.key is not None:
        hits = query.by_key(index, args.key, args.k, **options)
    else:
        hits = query.by_tag(index, wnids, args.k)
    return hits


def table(hits, tag_column=None) -> str:
    """The readable output: rank, score, key, source (when not the key), top tags; every cell
    with its control characters escaped (a key can hold any character)."""
    if not hits:
        return ""
    show_source = any(h.source != h.key for h in hits)
    header = ["#", "score", "key"] + (["source"] if show_source else []) + ["tags"]
    rows = [
        [str(i), f"{h.score:.4f}", printable(h.key)]
        + ([printable(h.source)] if show_source else [])
        + [printable(", ".join(h.tags) + (f"  [{h.wnid}]" if h.wnid else ""))]
        for i, h in enumerate(hits, 1)
    ]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "model", "fsspec", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    run = {"index": run_index, "search": run_search, "serve": run_serve}[args.command]
    return exit_code(lambda: run(args), f"run.sh {args.command}")


if __name__ == "__main__":
    sys.exit(main())
