"""`./run.sh fit_pca`: a basis fitted from the embedding column of results files, local or gs://."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schema import results_schema
from model.pca import fit_basis, load_basis
from pipeline import fit_pca
from tests.mounts import read_only
from transforms.write import results_batch, top_k

D = 32


def write_results(directory, embeddings, dtype="float32", files=2):
    """results-*.parquet files as the job writes them (its schema and batch builder)."""
    labels = SimpleNamespace(
        wnids=np.array(["n00000001", "n00000002"]), labels=np.array(["a", "b"])
    )
    schema = results_schema(D, embedding_dtype=dtype)
    paths = []
    for i, part in enumerate(np.array_split(embeddings, files)):
        n = len(part)
        idx, scores = top_k(np.full((n, 2), 0.5, np.float32), 1)
        batch = results_batch(
            [f"k{i}-{j}" for j in range(n)],
            ["s"] * n,
            [1] * n,
            [1] * n,
            idx,
            scores,
            labels,
            part,
            schema,
        )
        path = f"{directory}/results-{i:05d}-of-{files:05d}.parquet"
        pq.write_table(pa.Table.from_batches([batch]), path, row_group_size=50)
        paths.append(path)
    with open(f"{directory}/summary.json", "w") as f:  # a committed run
        f.write('{"run_id": "test"}')
    return paths


def clustered(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, D)) * 4
    return (centres[rng.integers(0, 6, n)] + rng.standard_normal((n, D))).astype(np.float32)


def test_fit_pca_streams_every_row_and_matches_an_in_memory_fit(tmp_path, capsys):
    x = clustered(300)
    write_results(tmp_path, x)
    (tmp_path / "failures-00000-of-00001.parquet").write_bytes(b"not read")
    code = fit_pca.main([str(tmp_path), "--dims", "5", "--to", str(tmp_path / "basis.npz")])
    assert code == 0
    basis = load_basis(str(tmp_path / "basis.npz"))
    want = fit_basis([x], dims=5)
    assert basis.num_samples == 300 and basis.dims == 5 and basis.input_dim == D
    np.testing.assert_allclose(basis.components, want.components, atol=1e-5)
    np.testing.assert_allclose(
        basis.explained_variance_ratio, want.explained_variance_ratio, rtol=1e-6
    )
    printed = capsys.readouterr().out
    assert basis.sha256 in printed and "explained variance of the first     5" in printed


def test_fit_pca_on_gcs_with_a_sample_of_float16_embeddings(gcs_emulator, tmp_path):
    x = clustered(400, seed=1)
    write_results(tmp_path, x, dtype="float16")
    bucket = gcs_emulator.new_bucket()
    for path in sorted(tmp_path.glob("results-*.parquet")) + [tmp_path / "summary.json"]:
        gcs_emulator.upload_file(f"gs://{bucket}/out/{path.name}", path)
    basis = fit_pca.fit(
        f"gs://{bucket}/out", dims=3, to=f"gs://{bucket}/basis.npz", max_samples=250
    )
    assert basis.num_samples == 250
    assert load_basis(f"gs://{bucket}/basis.npz").sha256 == basis.sha256
    exact = fit_basis([x.astype(np.float16).astype(np.float32)], dims=3)
    cos = np.abs(np.sum(basis.components * exact.components, axis=1))
    assert cos[0] > 0.95  # the dominant direction survives sampling (250 of 400 rows)


def test_no_results_is_a_usage_error(tmp_path, capsys):
    code = fit_pca.main([str(tmp_path), "--dims", "2", "--to", str(tmp_path / "b.npz")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("./run.sh fit_pca: error: no results-*.parquet")


def test_an_incomplete_run_is_refused_before_fitting(tmp_path, capsys):
    write_results(tmp_path, clustered(100))
    (tmp_path / "summary.json").unlink()
    code = fit_pca.main([str(tmp_path), "--dims", "2", "--to", str(tmp_path / "b.npz")])
    assert code == 2 and f"{tmp_path} holds an incomplete run" in capsys.readouterr().err
    assert not (tmp_path / "b.npz").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dims", "0"], "argument --dims: must be an integer >= 1, got '0'"),
        (["--dims", "two"], "argument --dims: must be an integer >= 1, got 'two'"),
        (["--dims", "2", "--max_samples", "-5"], "argument --max_samples: must be an integer >= 0"),
        (["--dims", "2", "--seed", "-1"], "argument --seed: must be an integer between 0 and"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        fit_pca.main([str(tmp_path), "--to", str(tmp_path / "b.npz"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"./run.sh fit_pca: error: {message}") and err.count("\n") == 1


def test_a_target_that_is_a_folder_or_read_only_is_refused_before_fitting(tmp_path, capsys):
    write_results(tmp_path, clustered(100))
    (tmp_path / "folder.npz").mkdir()
    code = fit_pca.main([str(tmp_path), "--dims", "2", "--to", str(tmp_path / "folder.npz")])
    assert code == 2 and f"--to {tmp_path / 'folder.npz'} is a folder" in capsys.readouterr().err
    with read_only(tmp_path / "ro") as readonly:
        code = fit_pca.main([str(tmp_path), "--dims", "2", "--to", str(readonly / "b.npz")])
    assert (
        code == 2
        and f"cannot write to {readonly} (Read-only file system)" in capsys.readouterr().err
    )
