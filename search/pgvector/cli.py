"""Command line of `./run.sh load OUTPUT --into DSN` (`python -m search.pgvector load ...`).

Exit codes: `core.errors.exit_code` (which error gives which code: docs/outputs.md, "Exit codes");
the password of the connection string is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.args import integer, number
from core.errors import ArgumentParser, exit_code
from search.pgvector import load


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="run.sh", description="Load the job's results into PostgreSQL + pgvector."
    )
    sub = ap.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    lo = sub.add_parser(
        "load",
        help="upsert an OUTPUT's results into a pgvector table",
        description="Upsert OUTPUT/results-*.parquet (local or gs://) by key into a table, "
        "creating it and its indexes if missing (docs/pgvector.md).",
    )
    lo.add_argument("output", metavar="OUTPUT", help="the --output of a job run")
    lo.add_argument(
        "--into",
        required=True,
        metavar="DSN",
        help="postgresql://USER@HOST:PORT/DB (a password: PGPASSWORD or ~/.pgpass)",
    )
    lo.add_argument("--table", default="images", help="table name (default images)")
    lo.add_argument(
        "--batch_rows",
        type=integer(1, 10_000_000),
        default=load.BATCH_ROWS,
        help=f"rows a transaction: staged by one COPY, upserted, committed (default "
        f"{load.BATCH_ROWS})",
    )
    lo.add_argument(
        "--index_memory",
        default=load.INDEX_MEMORY,
        help="maintenance_work_mem while building indexes (default "
        f"{load.INDEX_MEMORY}; an HNSW build is much faster when its graph fits)",
    )
    lo.add_argument(
        "--log_every_secs",
        type=number(0.0),
        default=10.0,
        help="seconds between progress lines while loading (0: none)",
    )
    lo.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a sentence"
    )
    return ap


def run_load(args) -> None:
    report = load.load_output(
        args.output,
        args.into,
        args.table,
        batch_rows=args.batch_rows,
        index_memory=args.index_memory,
        log_every_secs=args.log_every_secs,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        built = ", ".join(f"{name} {s:.1f} s" for name, s in report["index_seconds"].items())
        print(
            f"loaded {report['rows_read']} rows of {report['output']} into {report['table']} at "
            f"{report['server']} in {report['load_seconds']:.1f} s "
            f"({report['rows_per_second']:.0f} rows/s): {report['inserted']} new, "
            f"{report['updated']} changed, {report['unchanged']} unchanged; the table holds "
            f"{report['rows']} rows"
            + (f"; {report['repeated']} repeated keys skipped" if report["repeated"] else "")
            + (f"; indexes built: {built}" if built else "")
        )
    if report["iterative_scan"] in (None, "off"):
        print(
            "note: hnsw.iterative_scan is off on this server: SQL that filters an HNSW search "
            "(WHERE ... ORDER BY embedding <=> q LIMIT k) returns fewer than k rows without an "
            "error; use search.pgvector.nearest or SET hnsw.iterative_scan = relaxed_order "
            "(docs/pgvector.md)",
            file=sys.stderr,
        )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("fsspec", "gcsfs", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    return exit_code(lambda: run_load(args), f"run.sh {args.command}")


if __name__ == "__main__":
    sys.exit(main())
