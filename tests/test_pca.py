"""model/pca.py: fitting, saving, loading and projecting with a shared PCA basis."""

import re

import numpy as np
import pytest

from model.pca import PcaBasisError, fit_basis, from_bytes, load_basis, save_basis, to_bytes

D = 24


def structured(n, seed=0):
    """n vectors with a known spectrum: variances 100, 25, 4, then 0.01 along random axes."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.standard_normal((D, D)))
    spread = np.full(D, 0.1)
    spread[:3] = [10.0, 5.0, 2.0]
    x = (rng.standard_normal((n, D)) * spread) @ axes.T + 3.0
    return x.astype(np.float32), axes


def batches(x, size=97):
    return (x[i : i + size] for i in range(0, len(x), size))


def test_fit_recovers_the_principal_axes_and_the_variance():
    x, axes = structured(5000)
    basis = fit_basis(batches(x), dims=3)
    assert basis.dims == 3 and basis.input_dim == D and basis.num_samples == 5000
    np.testing.assert_allclose(basis.mean, x.mean(axis=0), atol=1e-4)
    # Same subspace, same order: |cos| with the true axes close to 1.
    np.testing.assert_allclose(
        np.abs(np.sum(basis.components * axes[:, :3].T, axis=1)), 1, atol=1e-3
    )
    np.testing.assert_allclose(basis.explained_variance, [100, 25, 4], rtol=0.06)
    # Equal to an SVD of the whole (centred) data.
    centred = x.astype(np.float64) - x.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    var = sv**2 / (len(x) - 1)
    np.testing.assert_allclose(basis.explained_variance, var[:3], rtol=1e-6)
    np.testing.assert_allclose(basis.explained_variance_ratio, var[:3] / var.sum(), rtol=1e-6)
    # Sign convention: each component's largest coefficient is positive (refits are comparable).
    rows = np.arange(3)
    assert (basis.components[rows, np.abs(basis.components).argmax(axis=1)] > 0).all()


def test_sampled_fit_is_bounded_and_close():
    x, _ = structured(3000, seed=1)
    exact = fit_basis(batches(x), dims=2)
    sampled = fit_basis(batches(x), dims=2, max_samples=1000, seed=3)
    assert sampled.num_samples == 1000
    np.testing.assert_allclose(
        np.abs(np.sum(sampled.components * exact.components, axis=1)), 1, atol=0.01
    )
    again = fit_basis(batches(x), dims=2, max_samples=1000, seed=3)
    np.testing.assert_array_equal(again.components, sampled.components)  # seeded


def test_project_is_centred_and_normalised():
    x, _ = structured(500)
    basis = fit_basis(batches(x), dims=3)
    y = basis.project(x[:7])
    assert y.dtype == np.float32 and y.shape == (7, 3)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
    want = (x[:7].astype(np.float64) - basis.mean) @ basis.components.T.astype(np.float64)
    np.testing.assert_allclose(y, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match=f"\\[B, {D}\\]"):
        basis.project(x[:2, :5])


def test_save_and_load_round_trip(tmp_path):
    x, _ = structured(200)
    basis = save_basis(fit_basis(batches(x), dims=4), str(tmp_path / "b.npz"))
    loaded = load_basis(str(tmp_path / "b.npz"))
    assert loaded.sha256 == basis.sha256 and len(loaded.sha256) == 64
    np.testing.assert_array_equal(loaded.components, basis.components)
    assert loaded.num_samples == 200 and loaded.source == str(tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz", allow_pickle=False) as npz:  # the documented arrays
        assert npz["components"].dtype == np.float32 and npz["mean"].shape == (D,)
        assert npz["explained_variance_ratio"].dtype == np.float64 and npz["num_samples"] == 200


def test_bad_basis_files_are_refused(tmp_path):
    x, _ = structured(200)
    basis = fit_basis(batches(x), dims=4)
    with pytest.raises(PcaBasisError, match="cannot read"):
        load_basis(str(tmp_path / "missing.npz"))
    with pytest.raises(PcaBasisError, match="not an .npz"):
        from_bytes(b"not a basis", "x")
    with pytest.raises(PcaBasisError, match="not a readable"):
        from_bytes(to_bytes(basis)[:100], "x")
    with pytest.raises(PcaBasisError, match="orthonormal"):
        from_bytes(to_bytes(basis._replace(components=basis.components * 2)), "x")
    with pytest.raises(PcaBasisError, match="must be"):
        from_bytes(to_bytes(basis._replace(mean=basis.mean[:3])), "x")
    arrays = {
        "mean": basis.mean,
        "components": basis.components,
        "explained_variance": basis.explained_variance,
        "explained_variance_ratio": basis.explained_variance_ratio,
        "num_samples": np.int64(basis.num_samples),
    }
    for name, bad, phrase in [
        ("num_samples", np.array([1, 2]), "num_samples must be one integer"),
        ("num_samples", np.float64(3.5), "num_samples must be one integer"),
        ("explained_variance", np.array(["a"] * 4), "explained_variance has dtype <U1"),
        ("explained_variance_ratio", np.ones(2), "explained_variance_ratio has shape (2,)"),
        ("mean", np.array(["x"] * D), "the array mean has dtype"),
    ]:
        with open(tmp_path / "bad.npz", "wb") as f:
            np.savez(f, **{**arrays, name: bad})
        with pytest.raises(PcaBasisError, match=re.escape(phrase)):
            load_basis(str(tmp_path / "bad.npz"))
    with pytest.raises(PcaBasisError, match="--dims"):
        fit_basis(batches(x), dims=D + 1)
    with pytest.raises(PcaBasisError, match="at least 2"):
        fit_basis([], dims=1)
