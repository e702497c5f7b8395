"""Command line of `./run.sh index` and `./run.sh search` (`python -m search index|search ...`).

Exit codes: 0 done (a query with no match prints nothing and says so on stderr); 2 usage or input
error, as one line on stderr (unknown tag or key, missing index, undecodable image, a model or
output that does not match the index); 1 anything unexpected (with a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from search import SearchError, ann

_LOG = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit 2, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="run.sh", description="Index and search the job's results.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
        type=int,
        default=ann.ANN_MIN_ROWS,
        help="build the vector index from this many images on (below, "
        f"queries scan every vector exactly; default {ann.ANN_MIN_ROWS})",
    )
    ix.add_argument(
        "--log_every_secs", type=float, default=10.0, help="progress line interval (0: none)"
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
    se.add_argument("--k", type=int, default=10, help="results to return (default 10)")
    se.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array (best first) of {key, source, score, tags}",
    )
    se.add_argument(
        "--nprobes",
        type=int,
        default=ann.DEFAULT_NPROBES,
        help=f"IVF partitions probed (default {ann.DEFAULT_NPROBES})",
    )
    se.add_argument(
        "--refine_factor",
        type=int,
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
    return ap


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
        f"{report['files']} files of {report['output']} in {report['seconds']:.1f} s; "
        f"{report['index_dir']} holds {report['rows']} images, {report['bytes']:,} bytes "
        f"({report['bytes_per_image']:,} bytes/image), vector index: "
        f"{report['vector_index']}"
    )
    return 0


def run_search(args) -> int:
    from search import query
    from search.index import open_index

    modes = {name for name in ("image", "key", "tag") if getattr(args, name) is not None}
    if modes not in ({"image"}, {"key"}, {"tag"}, {"image", "tag"}):
        raise SearchError("give one of --image, --key or --tag (only --image and --tag combine)")
    if args.k < 1:
        raise SearchError("--k must be at least 1")
    index = open_index(args.index)
    options = {"nprobes": args.nprobes, "refine_factor": args.refine_factor}
    wnids = None
    if args.tag is not None:
        synsets = query.resolve_tag(index, args.tag)
        wnids = [w for w, _ in synsets]
        if len(synsets) > 1:
            listed = ", ".join(f"{w} ({lab})" for w, lab in synsets)
            print(
                f"tag {args.tag!r} names {len(synsets)} synsets, all matched: {listed}",
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


def table(hits, tag_column=None) -> str:
    """The readable output: rank, score, key, source (when not the key), top tags."""
    if not hits:
        return ""
    show_source = any(h.source != h.key for h in hits)
    header = ["#", "score", "key"] + (["source"] if show_source else []) + ["tags"]
    rows = [
        [str(i), f"{h.score:.4f}", h.key]
        + ([h.source] if show_source else [])
        + [", ".join(h.tags) + (f"  [{h.wnid}]" if h.wnid else "")]
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
    try:
        return run_index(args) if args.command == "index" else run_search(args)
    except SearchError as e:
        print(f"run.sh {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
