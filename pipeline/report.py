"""`OUTPUT/report.html`: one self-contained page to look at what a run did.

`python -m pipeline.report OUTPUT` (`./run.sh report OUTPUT`, local or gs://) renders it again from
a finished output; every run writes it at its end. The page has no network access at all: CSS
inline, charts as inline SVG, thumbnails as `data:` URIs (about 0.5 MB for 48 thumbnails; the page
is ~2 MB at most). It shows:
- the summary (counts, failure rate, wall time, images/s, models with sha256, options);
- failures by stage and by type, with up to 5 example rows each;
- the 30 most frequent tags (images with the tag in their top-k) and a histogram of top-1 scores;
- a contact sheet: the pipeline's sample (`samples.parquet`, see transforms/sample.py) with each
  image's top-3 tags and scores, and its key on hover.

The results are read one record batch at a time, only the key and tags columns, so memory stays
small for millions of rows. The markup is `pipeline/templates/report.html`, a Jinja2 template with
autoescape: this module gathers the data and the chart geometry, every value is escaped there. An
output without `summary.json` (a run that did not commit) gets a page that says INCOMPLETE RUN at
the top, and its failures as unknown, never "No failures".
"""

import argparse
import base64
import collections
import logging
import sys
import time
from typing import Optional

import jinja2
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from core.errors import ArgumentParser, UsageError, exit_code
from core.outputs import FAILURES, RESULTS, incomplete_message, output_files
from core.text import printable
from transforms import gcs, outputs
from transforms.sample import SAMPLES_FILE

REPORT_FILE = "report.html"
TOP_TAGS = 30
EXAMPLES = 5
HISTOGRAM_BINS = 20
_LOG = logging.getLogger(__name__)
# What writing the report can fail with that is about the files, not a bug in this module.
REPORT_ERRORS = (OSError, BeamIOError, pa.ArrowException, outputs.OutputError)


# ---------------------------------------------------------------------------------------- data


class _Stats:
    """What the page needs from the results, gathered in one streaming pass."""

    def __init__(self, sample_keys):
        self.tag_counts = collections.Counter()
        self.top1 = [0] * HISTOGRAM_BINS
        self.rows = 0
        self.sample_keys = set(sample_keys)
        self.sample_tags = {}  # key -> [(label, score)] top 3

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        tags = batch.column("tags")
        labels = pc.list_flatten(tags).field("label")
        for item in pc.value_counts(labels).to_pylist():
            self.tag_counts[item["values"]] += item["counts"]
        first = pc.list_element(pc.filter(tags, pc.greater(pc.list_value_length(tags), 0)), 0)
        bins = pc.min_element_wise(
            pc.cast(
                pc.floor(pc.multiply(pc.fill_null(first.field("score"), 0.0), HISTOGRAM_BINS)),
                pa.int64(),
            ),
            HISTOGRAM_BINS - 1,
        )
        for item in pc.value_counts(bins).to_pylist():
            self.top1[max(item["values"], 0)] += item["counts"]
        if self.sample_keys:
            keep = pc.is_in(batch.column("key"), value_set=pa.array(sorted(self.sample_keys)))
            chosen = batch.filter(keep)
            for key, row_tags in zip(
                chosen.column("key").to_pylist(), chosen.column("tags").to_pylist()
            ):
                self.sample_tags[key] = [(t["label"], t["score"]) for t in (row_tags or [])[:3]]


def read_samples(output: str) -> list:
    """[{key, source, width, height, thumbnail}] from OUTPUT/samples.parquet ([] when absent)."""
    path = f"{output}/{SAMPLES_FILE}"
    if not outputs.list_files(path):
        return []
    with outputs.open_parquet(path) as samples:
        return samples.read().to_pylist()


def gather(output: str) -> dict:
    """Everything the page shows, read from a finished output directory."""
    summary = outputs.read_summary(output)
    complete = summary is not None
    summary = summary or {}
    samples = read_samples(output)
    stats = _Stats(s["key"] for s in samples)
    for path in output_files(output, RESULTS):
        with outputs.open_parquet(path) as results:
            for batch in results.iter_batches(batch_size=65536, columns=["key", "tags"]):
                stats.add(batch)
    failures = collections.defaultdict(list)  # (stage, type) -> examples
    counts = collections.Counter()
    for path in output_files(output, FAILURES):
        with outputs.open_parquet(path) as failed:
            table = failed.read(columns=["key", "source", "stage", "error"])
        for row in table.to_pylist():
            kind = (row["stage"], (row["error"] or "").split(":", 1)[0])
            counts[kind] += 1
            if len(failures[kind]) < EXAMPLES:
                failures[kind].append(row)
    for sample in samples:
        sample["tags"] = stats.sample_tags.get(sample["key"], [])
    return {
        "complete": complete,
        "summary": summary,
        "samples": samples,
        "tag_counts": stats.tag_counts,
        "top1": stats.top1,
        "rows": stats.rows,
        "failure_counts": counts,
        "failure_examples": failures,
    }


# ---------------------------------------------------------------------------------------- page

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline", "templates"),
    autoescape=True,  # every value is HTML-escaped unless it is markup the template made
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters["thousands"] = "{:,}".format
_TEMPLATES.filters["f1"] = "{:.1f}".format


def bar_chart(items, width=640, bar=16) -> dict:
    """Geometry of the horizontal tag bars (inline SVG): [(label, count)] in order."""
    top = max((count for _, count in items), default=0) or 1
    label_w, gap = 200, 4
    bars = []
    for i, (label, count) in enumerate(items):
        short = label.split(",")[0]  # the first lemma; the full label on hover
        bars.append(
            {
                "label": label,
                "short": short if len(short) <= 28 else short[:27] + "\u2026",
                "y": i * (bar + gap),
                "w": max(1.0, (width - label_w - 60) * count / top),
                "count": count,
            }
        )
    return {
        "width": width,
        "height": len(items) * (bar + gap),
        "bar": bar,
        "label_w": label_w,
        "bars": bars,
    }


def histogram(counts, width=480, height=180) -> dict:
    """Geometry of the top-1 score histogram (bins of equal width over [0, 1], inline SVG)."""
    top = max(counts) or 1
    n = len(counts)
    plot_h, bw = height - 30, (width - 40) / n
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / top
        bars.append(
            {
                "x": 30 + i * bw,
                "y": plot_h - h + 4,
                "w": bw - 2,
                "h": h,
                "lo": i / n,
                "hi": (i + 1) / n,
                "count": count,
            }
        )
    ticks = [{"x": 30 + tick * n * bw, "value": tick} for tick in (0, 0.25, 0.5, 0.75, 1.0)]
    return {"width": width, "height": height, "top": top, "bars": bars, "ticks": ticks}


def _summary_view(summary: dict) -> dict | None:
    if not summary:
        return None
    formats = [
        ("inputs", "{:,}"),
        ("results", "{:,}"),
        ("failures", "{:,}"),
        ("failure_rate", "{:.2%}"),
        ("skipped", "{:,}"),
        ("wall_seconds", "{:,.1f} s"),
        ("images_per_second", "{:,.2f}"),
    ]
    models = summary.get("models", {})
    return {
        "counts": [
            (k.replace("_", " "), fmt.format(summary[k]))
            for k, fmt in formats
            if summary.get(k) is not None
        ],
        "models": [
            (role, models.get(f"{role}_model", ""), models.get(f"{role}_model_sha256", ""))
            for role in ("tags", "embed")
            if models.get(f"{role}_model")
        ],
        "options": sorted((summary.get("options") or {}).items()),
    }


def _failures_view(data: dict) -> dict:
    counts = data["failure_counts"]
    by_stage = collections.Counter()
    for (stage, _), n in counts.items():
        by_stage[stage] += n
    return {
        "by_stage": [(s, f"{n:,}") for s, n in by_stage.most_common()],
        "kinds": [
            {
                "stage": stage,
                "type": kind,
                "count": n,
                "examples": data["failure_examples"][(stage, kind)],
            }
            for (stage, kind), n in counts.most_common()
        ],
    }


def render(data: dict, output: str) -> str:
    """The whole page as one HTML string (pipeline/templates/report.html)."""
    summary = data["summary"]
    samples = [
        {**s, "jpeg_base64": base64.b64encode(s["thumbnail"]).decode("ascii")}
        for s in data["samples"]
    ]
    return _TEMPLATES.get_template(REPORT_FILE).render(
        output=output,
        complete=data.get("complete", True),
        rows=data["rows"],
        summary=_summary_view(summary),
        failures=_failures_view(data),
        tag_chart=bar_chart(data["tag_counts"].most_common(TOP_TAGS)),
        top_k=(summary.get("options") or {}).get("top_k", "k"),
        top1=histogram(data["top1"]),
        samples=samples,
    )


def write_report(output: str) -> str:
    """Renders OUTPUT/report.html from the files of a finished run; returns its path."""
    output = output.rstrip("/")
    started = time.monotonic()
    page = render(gather(output), output).encode("utf-8")
    path = f"{output}/{REPORT_FILE}"
    with FileSystems.create(path, mime_type="text/html") as f:
        f.write(page)
    _LOG.debug("wrote %s (%d bytes) in %.2f s", path, len(page), time.monotonic() - started)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m pipeline.report",
        description="(Re)write OUTPUT/report.html from a finished run's output (local or gs://).",
    )
    parser.add_argument("output", help="the run's --output directory (local or gs://)")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return exit_code(lambda: _report(args.output.rstrip("/")), parser.prog)


def _report(output: str) -> None:
    gcs.configure_beam_gcs()
    try:
        state = outputs.run_state(output)
        if state == outputs.EMPTY:
            raise UsageError(f"{output} has no output of a run (results, failures or summary.json)")
        if state == outputs.INCOMPLETE:
            print(
                f"warning: {printable(incomplete_message(output))}; the report says so",
                file=sys.stderr,
            )
        path = write_report(output)
    except REPORT_ERRORS as exc:  # the files cannot be read or written: one line, exit 2
        raise UsageError(str(exc)) from exc
    print(printable(path))


if __name__ == "__main__":
    sys.exit(main())
