"""`./run.sh fit_pca OUTPUT --dims N --to BASIS.npz [--max_samples M]`: fit the shared PCA basis.

Streams the `embedding` column of OUTPUT's `results-*.parquet` (local or gs://), one Parquet row
batch at a time, into `model.pca.fit_basis` (exact covariance, or a uniform sample of at most
`--max_samples` rows), writes the basis file and prints the explained variance. Later runs take it
with `--pca_basis BASIS.npz` and write `embedding_reduced`.
"""

import argparse
import logging
import sys
import time
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq

from core import storage
from core.errors import ArgumentParser, exit_code
from core.outputs import has_glob, match, output_files
from model import pca

_LOG = logging.getLogger(__name__)
COLUMN = "embedding"


def results_files(output: str) -> list:
    """The results files of an output directory (or of a glob), sorted, as full paths."""
    return match(output) if has_glob(output) else output_files(output)


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
    files = results_files(output)
    if not files:
        raise pca.PcaBasisError(f"no results-*.parquet files in {output}")
    started = time.time()
    basis = pca.fit_basis(embedding_batches(files), dims, max_samples=max_samples, seed=seed)
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
        type=int,
        required=True,
        help="number of PCA components N to keep (the width of embedding_reduced)",
    )
    parser.add_argument("--to", required=True, help="basis file to write (.npz, local or gs://)")
    parser.add_argument(
        "--max_samples",
        type=int,
        default=0,
        help="fit on a uniform sample of at most this many rows (memory: "
        "M x D x 4 bytes); 0 = exact, over every row",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the --max_samples sample"
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
    basis = fit(args.output, args.dims, args.to, args.max_samples or None, args.seed)
    cumulative = np.cumsum(basis.explained_variance_ratio)
    print(
        f"wrote {args.to}: {basis.dims} x {basis.input_dim}, {basis.num_samples} samples, "
        f"sha256 {basis.sha256}"
    )
    for n in sorted({1, 8, 32, 128, 256, 512, 1024, 2048, basis.dims}):
        if n <= basis.dims:
            print(f"  explained variance of the first {n:5d} components: {cumulative[n - 1]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
