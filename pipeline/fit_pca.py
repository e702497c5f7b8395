"""`./run.sh fit_pca OUTPUT --dims N --to BASIS.npz [--max_samples M]`: fit the shared PCA basis.

Streams the `embedding` column of OUTPUT's `results-*.parquet` (local or gs://), one Parquet row
batch at a time, into `model.pca.fit_basis` (exact covariance, or a uniform sample of at most
`--max_samples` rows), writes the basis file and prints the explained variance. Later runs take it
with `--pca_basis BASIS.npz` and write `embedding_reduced`.

Only committed runs are read: results in a folder without `summary.json` (a run killed or failed
before it committed) are refused, as is a `--to` that is a folder or cannot be written; both are
checked before the fit starts. Errors are one line, exit 2.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.args import integer
from core.errors import ArgumentParser, UsageError, exit_code
from core.outputs import SUMMARY_FILE, has_glob, incomplete_message, match, output_files
from core.text import printable
from model import pca

_LOG = logging.getLogger(__name__)
COLUMN = "embedding"


def results_files(output: str) -> list:
    """The results files of an output directory (or of a glob), sorted, as full paths."""
    return match(output) if has_glob(output) else output_files(output)


def check_committed(files: list) -> None:
    """`PcaBasisError` naming the first folder of `files` without summary.json: its run did not
    commit (killed, failed or still running), and a basis fitted on part of it is not one."""
    for folder in sorted({f.rsplit("/", 1)[0] for f in files}):
        if not storage.exists(f"{folder}/{SUMMARY_FILE}"):
            raise pca.PcaBasisError(incomplete_message(folder, ", then fit"))


def check_target(to: str) -> None:
    """`PcaBasisError` when `--to` is a folder or its local folder cannot be written (checked
    before the fit, which can take minutes)."""
    if "://" in to and not to.startswith("file://"):
        return  # an object store: its permissions show at the write
    path = os.path.expanduser(to[len("file://") :] if to.startswith("file://") else to)
    if os.path.isdir(path):
        raise pca.PcaBasisError(f"--to {to} is a folder, not a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise pca.PcaBasisError(f"--to {to}: cannot write to {folder} ({e.strerror})") from e


def embedding_batches(files: list, batch_rows: int = 4096) -> Iterator[np.ndarray]:
    """float32 [n, D] batches of the embedding column, one file and row batch at a time."""
    for path in files:
        with storage.open_file(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[COLUMN]):
                column = batch.column(0)
                if not len(column):
                    continue
                width = column.type.list_size
                values = column.flatten().to_numpy(zero_copy_only=False)
                yield values.astype(np.float32, copy=False).reshape(len(column), width)


def fit(
    output: str, dims: int, to: str, max_samples: Optional[int] = None, seed: int = 0
) -> pca.PcaBasis:
    check_target(to)
    files = results_files(output)
    if not files:
        raise pca.PcaBasisError(f"no results-*.parquet files in {output}")
    check_committed(files)
    started = time.time()
    try:
        basis = pca.fit_basis(embedding_batches(files), dims, max_samples=max_samples, seed=seed)
    except pa.ArrowException as e:
        raise pca.PcaBasisError(f"cannot read the embeddings of {output}: {e}") from e
    basis = pca.save_basis(basis, to)
    _LOG.info(
        "fitted %d components of %d-d embeddings on %d rows of %d files in %.1f s",
        basis.dims,
        basis.input_dim,
        basis.num_samples,
        len(files),
        time.time() - started,
    )
    return basis


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="./run.sh fit_pca",
        description="Fit one PCA basis on the embeddings of an existing output, for "
        "--pca_basis (reduced embeddings for engines capped below 6144-d).",
    )
    parser.add_argument(
        "output",
        help="output directory of an earlier run (its "
        "results-*.parquet), or a glob of results files; local "
        "or gs://",
    )
    parser.add_argument(
        "--dims",
        type=integer(1),
        required=True,
        help="number of PCA components N to keep (the width of embedding_reduced)",
    )
    parser.add_argument("--to", required=True, help="basis file to write (.npz, local or gs://)")
    parser.add_argument(
        "--max_samples",
        type=integer(0),
        default=0,
        help="fit on a uniform sample of at most this many rows (memory: "
        "M x D x 4 bytes); 0 = exact, over every row",
    )
    parser.add_argument(
        "--seed",
        type=integer(0, 2**63 - 1),
        default=0,
        help="random seed of the --max_samples sample (>= 0)",
    )
    return parser


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = _parser()
    args = parser.parse_args(argv)
    return exit_code(lambda: _fit_and_print(args), parser.prog)


def _fit_and_print(args) -> None:
    try:
        basis = fit(args.output, args.dims, args.to, args.max_samples or None, args.seed)
    except OSError as exc:  # an input that cannot be read: one line, exit 2
        raise UsageError(f"cannot read {args.output}: {exc}") from exc
    _print_basis(args.to, basis)


def _print_basis(to: str, basis: pca.PcaBasis) -> None:
    cumulative = np.cumsum(basis.explained_variance_ratio)
    print(
        f"wrote {printable(to)}: {basis.dims} x {basis.input_dim}, {basis.num_samples} "
        f"samples, sha256 {basis.sha256}"
    )
    for n in sorted({1, 8, 32, 128, 256, 512, 1024, 2048, basis.dims}):
        if n <= basis.dims:
            print(f"  explained variance of the first {n:5d} components: {cumulative[n - 1]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
