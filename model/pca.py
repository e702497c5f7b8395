"""One shared PCA basis for reduced embeddings (engines capped below 6144 dimensions).

Elasticsearch's `dense_vector` takes at most 4096 dimensions, pgvector indexes at most 2000
(`vector`) or 4000 (`halfvec`). Reducing with a basis fitted per run would put incomparable vectors
into one index, so the basis is a file, fitted once (`./run.sh fit_pca`) and named by its sha256 in
every results file that used it.

Basis file (`.npz`, no pickles): `mean` float32 [D], `components` float32 [N, D] (orthonormal rows,
by decreasing variance, each with its largest-magnitude coefficient positive so refits are
comparable), `explained_variance` float64 [N], `explained_variance_ratio` float64 [N],
`num_samples` int64 scalar. Projection: `(x - mean) @ components.T`, then L2-normalised.

Fitting is exact: the mean and the D x D scatter matrix are accumulated in float64 over row batches
(6144-d: 302 MB; n x D^2 multiply-adds, measured ~1.7 ms of CPU per row on the 2-core dev VM, so
~3 CPU-minutes per 100,000 rows), then one symmetric eigendecomposition (6144-d: ~2 CPU-minutes
there). With `max_samples`, a uniform sample of that many rows (bottom-k of random keys, a
streaming reservoir) is fitted instead, bounding time; it holds max_samples x D x 4 bytes.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable, NamedTuple, Optional

import numpy as np

from core import storage
from core.errors import UsageError

ARRAYS = ("mean", "components", "explained_variance", "explained_variance_ratio", "num_samples")


class PcaBasisError(UsageError, ValueError):
    """A basis file that is missing, corrupt or does not fit the embeddings."""


class PcaBasis(NamedTuple):
    mean: np.ndarray  # float32 [D]
    components: np.ndarray  # float32 [N, D]
    explained_variance: np.ndarray  # float64 [N]
    explained_variance_ratio: np.ndarray  # float64 [N]
    num_samples: int
    sha256: str = ""  # of the file's bytes ("" before it is saved)
    source: str = ""

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """[B, D] -> float32 [B, N]: centred, projected onto the components, L2-normalised."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"embeddings must be [B, {self.input_dim}], got {x.shape}")
        y = (x - self.mean) @ self.components.T
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def to_bytes(basis: PcaBasis) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mean=basis.mean.astype(np.float32),
        components=basis.components.astype(np.float32),
        explained_variance=basis.explained_variance.astype(np.float64),
        explained_variance_ratio=basis.explained_variance_ratio.astype(np.float64),
        num_samples=np.int64(basis.num_samples),
    )
    return buffer.getvalue()


def save_basis(basis: PcaBasis, path: str) -> PcaBasis:
    """Writes the basis (local or gs://), all or nothing (`core.atomic`: a crash or a full disk
    never leaves half a basis under the name); returns it with its `sha256` and `source` set."""
    from core.atomic import atomic_write

    data = to_bytes(basis)
    try:
        atomic_write(path, data)
    except OSError as e:
        raise PcaBasisError(f"cannot write the PCA basis {path}: {e}") from e
    return basis._replace(sha256=hashlib.sha256(data).hexdigest(), source=path)


def from_bytes(data: bytes, source: str = "") -> PcaBasis:
    """Parses and checks a basis file's bytes; `PcaBasisError` names what is wrong."""
    if not data.startswith(b"PK"):
        raise PcaBasisError(f"PCA basis {source} is not an .npz file (written by fit_pca)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ARRAYS}
    except KeyError as e:
        raise PcaBasisError(f"PCA basis {source} lacks the array {e}") from e
    except Exception as e:  # noqa: BLE001 (zip, header or pickle errors: all mean "not a basis")
        raise PcaBasisError(f"PCA basis {source} is not a readable .npz file: {e}") from e
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise PcaBasisError(
                f"PCA basis {source}: the array {name} has dtype {array.dtype}, not numbers"
            )
    mean, comps = arrays["mean"], arrays["components"]
    if comps.ndim != 2 or mean.shape != (comps.shape[1],) or comps.shape[0] < 1:
        raise PcaBasisError(
            f"PCA basis {source}: components {comps.shape} and mean {mean.shape} "
            "must be [N, D] and [D]"
        )
    if comps.shape[0] > comps.shape[1]:
        raise PcaBasisError(
            f"PCA basis {source}: {comps.shape[0]} components of {comps.shape[1]}-d vectors"
        )
    if not (np.isfinite(mean).all() and np.isfinite(comps).all()):
        raise PcaBasisError(f"PCA basis {source} has non-finite values")
    for name in ("explained_variance", "explained_variance_ratio"):
        if arrays[name].shape != (comps.shape[0],):
            raise PcaBasisError(
                f"PCA basis {source}: {name} has shape {arrays[name].shape}, expected "
                f"({comps.shape[0]},) (one value a component)"
            )
    if arrays["num_samples"].shape != () or arrays["num_samples"].dtype.kind not in "iu":
        raise PcaBasisError(f"PCA basis {source}: num_samples must be one integer")
    gram = comps.astype(np.float64) @ comps.T.astype(np.float64)
    if not np.allclose(gram, np.eye(len(comps)), atol=1e-3):
        raise PcaBasisError(f"PCA basis {source}: the components are not orthonormal")
    return PcaBasis(
        mean.astype(np.float32),
        comps.astype(np.float32),
        arrays["explained_variance"].astype(np.float64),
        arrays["explained_variance_ratio"].astype(np.float64),
        int(arrays["num_samples"]),
        hashlib.sha256(data).hexdigest(),
        source,
    )


def load_basis(path: str) -> PcaBasis:
    """Reads and checks a basis file (local or gs://)."""
    try:
        with storage.open_file(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise PcaBasisError(f"cannot read the PCA basis {path}: {e}") from e
    return from_bytes(data, source=path)


class _Scatter:
    """Running count, sum and X^T X in float64 (exact covariance, one pass)."""

    def __init__(self, dim: int):
        self.n, self.sum = 0, np.zeros(dim, np.float64)
        self.xtx = np.zeros((dim, dim), np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.xtx += x.T @ x

    def covariance(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / self.n
        cov = (self.xtx - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)
        return mean, cov


class _Reservoir:
    """A uniform sample of at most `size` rows of a stream: the rows with the smallest keys."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.rows, self.keys, self.seen = None, np.zeros(0), 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self.seen += len(x)
        keys = self.rng.random(len(x))
        rows = x if self.rows is None else np.concatenate([self.rows, x])
        keys = np.concatenate([self.keys, keys])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


def fit_basis(
    batches: Iterable[np.ndarray], dims: int, max_samples: Optional[int] = None, seed: int = 0
) -> PcaBasis:
    """Fits a PCA basis of `dims` components on a stream of [n, D] embedding batches.

    Exact over every row, or over a uniform sample of `max_samples` rows (see module docstring)."""
    scatter, reservoir, seen = None, None, 0
    if max_samples:
        reservoir = _Reservoir(int(max_samples), seed)
    for x in batches:
        x = np.asarray(x)
        if x.ndim != 2 or not len(x):
            continue
        seen += len(x)
        if reservoir is not None:
            reservoir.add(x)
            continue
        if scatter is None:
            scatter = _Scatter(x.shape[1])
        scatter.add(x)
    if reservoir is not None and reservoir.rows is not None:
        scatter = _Scatter(reservoir.rows.shape[1])
        for start in range(0, len(reservoir.rows), 4096):
            scatter.add(reservoir.rows[start : start + 4096])
    if scatter is None or scatter.n < 2:
        raise PcaBasisError(f"need at least 2 embeddings to fit a basis, got {seen}")
    if not 1 <= dims <= min(scatter.n, len(scatter.sum)):
        raise PcaBasisError(
            f"--dims must be between 1 and min(samples {scatter.n}, "
            f"dimension {len(scatter.sum)}), got {dims}"
        )
    mean, cov = scatter.covariance()
    values, vectors = np.linalg.eigh(cov)  # ascending
    top = np.argsort(values)[::-1][:dims]
    values, comps = np.maximum(values[top], 0.0), vectors[:, top].T
    signs = np.sign(comps[np.arange(dims), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    total = float(np.trace(cov))
    return PcaBasis(
        mean.astype(np.float32),
        comps.astype(np.float32),
        values,
        values / total if total > 0 else np.zeros(dims),
        scatter.n,
    )
