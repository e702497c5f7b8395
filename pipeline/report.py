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
small for millions of rows. An output without `summary.json` (a run that did not commit) gets a
page that says INCOMPLETE RUN at the top, and its failures as unknown, never "No failures".
"""

import base64
import collections
import html
import logging
import sys
import time
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from core.args import OneLineParser, quiet_broken_pipe
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


def _files(output: str, pattern: str) -> list:
    return sorted(outputs.list_files(f"{output}/{pattern}"))


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
    for path in _files(output, "results-*.parquet"):
        with outputs.open_parquet(path) as results:
            for batch in results.iter_batches(batch_size=65536, columns=["key", "tags"]):
                stats.add(batch)
    failures = collections.defaultdict(list)  # (stage, type) -> examples
    counts = collections.Counter()
    for path in _files(output, "failures-*.parquet"):
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


# ---------------------------------------------------------------------------------------- html

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e2e2e2;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.n{text-align:right}
.muted{color:#777}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{width:172px;margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.card img{display:block;margin:0 auto 4px;max-width:160px;max-height:160px}
.card ol{margin:0;padding-left:18px;font-size:12px}.card li span{color:#777}
.kv td:first-child{font-weight:600}.err{font-family:monospace;font-size:12px;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.incomplete{background:#b00020;color:#fff;padding:10px 14px;border-radius:6px;font-size:16px}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(rows, header=None, numeric=()) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def bar_chart(items, width=640, bar=16) -> str:
    """Horizontal bars as inline SVG: [(label, count)] in order."""
    if not items:
        return '<p class="muted">no tags</p>'
    top = max(count for _, count in items) or 1
    label_w, gap = 200, 4
    height = len(items) * (bar + gap)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="most frequent tags">'
    ]
    for i, (label, count) in enumerate(items):
        y = i * (bar + gap)
        w = max(1.0, (width - label_w - 60) * count / top)
        short = label.split(",")[0]  # the first lemma; the full label on hover
        short = short if len(short) <= 28 else short[:27] + "\u2026"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar - 4}" text-anchor="end" '
            f'font-size="12">{_e(short)}<title>{_e(label)}</title></text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" '
            f'fill="#4e79a7"/><text x="{label_w + w + 4:.1f}" y="{y + bar - 4}" '
            f'font-size="12">{count:,}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram(counts, width=480, height=180) -> str:
    """Top-1 score histogram (bins of equal width over [0, 1]) as inline SVG."""
    top = max(counts) or 1
    n = len(counts)
    plot_h, bw = height - 30, (width - 40) / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="top-1 score histogram">'
    ]
    for i, count in enumerate(counts):
        h = plot_h * count / top
        parts.append(
            f'<rect x="{30 + i * bw:.1f}" y="{plot_h - h + 4:.1f}" width="{bw - 2:.1f}" '
            f'height="{h:.1f}" fill="#f28e2b"><title>{i / n:.2f}-{(i + 1) / n:.2f}: '
            f"{count:,}</title></rect>"
        )
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{30 + tick * n * bw:.1f}" y="{height - 8}" font-size="11" '
            f'text-anchor="middle">{tick:g}</text>'
        )
    parts.append(f'<text x="4" y="14" font-size="11">{top:,}</text></svg>')
    return "".join(parts)


def _summary_section(summary: dict, rows: int) -> str:
    if not summary:
        return f'<p class="muted">no summary.json; {rows:,} result rows</p>'
    keys = [
        ("inputs", "{:,}"),
        ("results", "{:,}"),
        ("failures", "{:,}"),
        ("failure_rate", "{:.2%}"),
        ("skipped", "{:,}"),
        ("wall_seconds", "{:,.1f} s"),
        ("images_per_second", "{:,.2f}"),
    ]
    rows_html = [
        (_e(k.replace("_", " ")), _e(fmt.format(summary[k])))
        for k, fmt in keys
        if summary.get(k) is not None
    ]
    models = summary.get("models", {})
    model_rows = [
        (
            _e(role),
            _e(models.get(f"{role}_model", "")),
            f'<span class="err">{_e(models.get(f"{role}_model_sha256", ""))}</span>',
        )
        for role in ("tags", "embed")
        if models.get(f"{role}_model")
    ]
    options = sorted((summary.get("options") or {}).items())
    return (
        "<div class='charts'><div>"
        + _table(rows_html, numeric=(1,)).replace("<table>", "<table class='kv'>", 1)
        + "</div><div>"
        + _table(model_rows, header=("model", "source", "sha256"))
        + "</div></div>"
        + "<details><summary>options</summary>"
        + _table([(_e(k), _e(v)) for k, v in options])
        + "</details>"
    )


def _failures_section(data: dict) -> str:
    counts = data["failure_counts"]
    if not counts and not data.get("complete", True):
        return "<p>Unknown: the run did not commit, its failures may never have been written.</p>"
    if not counts:
        return "<p>No failures.</p>"
    by_stage = collections.Counter()
    for (stage, _), n in counts.items():
        by_stage[stage] += n
    out = [
        _table(
            [(_e(s), f"{n:,}") for s, n in by_stage.most_common()],
            header=("stage", "failures"),
            numeric=(1,),
        )
    ]
    for (stage, kind), n in counts.most_common():
        examples = data["failure_examples"][(stage, kind)]
        out.append(f"<h3>{_e(stage)} / {_e(kind or '?')}: {n:,}</h3>")
        out.append(
            _table(
                [
                    (_e(r["key"]), _e(r["source"]), f'<span class="err">{_e(r["error"])}</span>')
                    for r in examples
                ],
                header=("key", "source", "error"),
            )
        )
    return "".join(out)


def _contact_sheet(samples: list) -> str:
    if not samples:
        return '<p class="muted">no sample images (no image was decoded)</p>'
    cards = []
    for s in samples:
        data = base64.b64encode(s["thumbnail"]).decode("ascii")
        tags = (
            "".join(f"<li>{_e(label)} <span>{score:.2f}</span></li>" for label, score in s["tags"])
            or "<li class='muted'>no result</li>"
        )
        cards.append(
            f'<figure class="card" title="{_e(s["key"])}"><img alt="{_e(s["key"])}" '
            f'src="data:image/jpeg;base64,{data}"><ol>{tags}</ol></figure>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _incomplete_banner(data: dict, output: str) -> str:
    if data.get("complete", True):
        return ""
    return (
        "<p class='incomplete'><strong>INCOMPLETE RUN</strong>: this output has results but no "
        "summary.json, the mark of a run that committed. The run was killed or failed before "
        "it finished (or is still running): the rows below are only part of it, and its "
        f"failures are unknown. Rerun the job into {_e(output)} with --overwrite.</p>"
    )


def render(data: dict, output: str) -> str:
    """The whole page as one HTML string."""
    summary = data["summary"]
    tags = data["tag_counts"].most_common(TOP_TAGS)
    n_samples = len(data["samples"])
    top_k = (summary.get("options") or {}).get("top_k", "k")
    return "".join(
        [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            # No network, ever: the page may only use what it carries.
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">",
            f"<title>bit-tagger report: {_e(output)}</title><style>{_CSS}</style></head><body>",
            f"<h1>bit-tagger run report</h1><p class='muted'>{_e(output)}</p>",
            _incomplete_banner(data, output),
            "<h2>Summary</h2>",
            _summary_section(summary, data["rows"]),
            "<h2>Failures</h2>",
            _failures_section(data),
            "<h2>Tags</h2><div class='charts'><div>",
            (
                f"<h3>{len(tags)} most frequent tags "
                f"(images with the tag in their top-{_e(top_k)})</h3>"
            ),
            bar_chart(tags),
            "</div><div><h3>Top-1 score</h3>",
            histogram(data["top1"]),
            "</div></div>",
            f"<h2>Contact sheet: {n_samples} sample image{'s' if n_samples != 1 else ''}</h2>",
            "<p class='muted'>chosen by key hash in the pipeline (the same inputs give the same "
            "sample); hover for the key</p>",
            _contact_sheet(data["samples"]),
            "</body></html>",
        ]
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


def main(argv: Optional[list] = None) -> int:
    parser = OneLineParser(
        prog="python -m pipeline.report",
        description="(Re)write OUTPUT/report.html from a finished run's output (local or gs://).",
    )
    parser.add_argument("output", help="the run's --output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gcs.configure_beam_gcs()
    return quiet_broken_pipe(lambda: _report(args.output.rstrip("/")))


def _report(output: str) -> int:
    shown = printable(output)
    try:
        state = outputs.run_state(output)
        if state == outputs.EMPTY:
            print(
                f"error: {shown} has no output of a run (results, failures or summary.json)",
                file=sys.stderr,
            )
            return 2
        if state == outputs.INCOMPLETE:
            print(
                f"warning: {printable(outputs.incomplete_message(output))}; the report says so",
                file=sys.stderr,
            )
        path = write_report(output)
    except REPORT_ERRORS as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    print(printable(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
