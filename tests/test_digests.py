"""Digest files (`transforms/digests.py`): runs, the block-wise k-way merge, block lookups."""

import os
import tempfile

import numpy as np
import pytest

from transforms import digests
from transforms.digests import DigestFileError, DigestSet, key_digests, merge_files, write_run


def random_digests(rng, n: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(16 * n), dtype="S16")


def test_merge_is_the_sorted_union_in_passes_with_any_budget(tmp_path):
    """Runs of very different sizes sharing digests, merged 3 at a time with blocks of 256:
    exactly the sorted, de-duplicated union; the passes' files and the temporary name are gone."""
    rng = np.random.default_rng(0)
    pool = random_digests(rng, 20_000)
    sizes = [1, 0, 5000, 300, 7000, 2, 4000, 256, 257, 1500]
    runs = []
    for i, size in enumerate(sizes):
        path = str(tmp_path / f"run{i}.s16")
        assert write_run(path, pool[rng.integers(0, len(pool), size)]) <= size
        runs.append(path)
    out = str(tmp_path / "merged.s16")
    count = merge_files(runs, out, budget=16 * 256, fan_in=3)
    union = np.unique(np.concatenate([np.fromfile(r, dtype="S16") for r in runs]))
    assert count == len(union) and open(out, "rb").read() == union.tobytes()
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"run{i}.s16" for i in range(10)] + ["merged.s16"]
    )


def test_merge_of_nothing_is_an_empty_set(tmp_path):
    out = str(tmp_path / "merged.s16")
    assert merge_files([], out) == 0 and os.path.getsize(out) == 0
    known = DigestSet.open(out, 0)
    assert len(known) == 0 and not known.contains(["a", ""]).any()


def test_merge_refuses_a_run_that_is_not_sorted(tmp_path):
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.s16"
    bad.write_bytes(np.sort(random_digests(rng, 600))[::-1].tobytes())
    with pytest.raises(DigestFileError, match="not sorted"):
        merge_files([str(bad)], str(tmp_path / "merged.s16"))
    assert os.listdir(tmp_path) == ["bad.s16"]  # nothing half-written left


def digest_file(tmp_path, known: np.ndarray) -> str:
    path = str(tmp_path / "known.s16")
    assert write_run(path, known) == len(np.unique(known))
    return path


def neighbours(known: np.ndarray) -> np.ndarray:
    """Digests just above each known one (last byte + 1): unknown, and in the same block."""
    raw = np.frombuffer(known.tobytes(), np.uint8).reshape(-1, 16).copy()
    raw[:, 15] += 1
    return np.frombuffer(raw.tobytes(), dtype="S16")


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3 * 256 + 5, 10_000])
def test_lookups_are_exact_at_every_block_boundary(tmp_path, n):
    rng = np.random.default_rng(n)
    known = np.unique(random_digests(rng, n))
    known_set = set(known.tolist())
    in_file = DigestSet.open(digest_file(tmp_path, known), len(known))
    queries = np.concatenate([known, neighbours(known), random_digests(rng, 500)])
    queries = queries[rng.permutation(len(queries))]
    expected = [q in known_set for q in queries.tolist()]
    assert in_file.contains_digests(queries).tolist() == expected
    assert DigestSet(known).contains_digests(queries).tolist() == expected  # in memory, the same


def test_threads_share_one_open_set(tmp_path):
    """The DoFn threads of a worker process look up in one DigestSet at once (os.pread: no
    shared file position)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"k{i}" for i in range(5000)]
    known = digests.open_shared(digest_file(tmp_path, key_digests(keys)), 5000)

    def check(start):
        batch = [f"k{i}" for i in range(start, start + 700)]
        return known.contains(batch).tolist() == [int(k[1:]) < 5000 for k in batch]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(0, 6000, 300)))


def _short(path, count):
    with open(path, "r+b") as f:
        f.truncate(16 * (count - 1))


def _odd(path, count):
    with open(path, "ab") as f:
        f.write(b"x")


def _swapped(path, count):
    data = bytearray(open(path, "rb").read())
    data[16 * 300 : 16 * 302] = data[16 * 301 : 16 * 302] + data[16 * 300 : 16 * 301]
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "damage,phrase", [(_short, "damaged"), (_odd, "damaged"), (_swapped, "not sorted")]
)
def test_a_damaged_digest_file_is_refused(tmp_path, damage, phrase):
    rng = np.random.default_rng(2)
    known = np.unique(random_digests(rng, 1000))
    path = digest_file(tmp_path, known)
    damage(path, len(known))
    with pytest.raises(DigestFileError, match=phrase):
        DigestSet.open(path, len(known))


def test_a_gcs_digest_file_is_copied_to_an_unnamed_local_file(beam_gcs, tmp_path):
    rng = np.random.default_rng(3)
    known = np.unique(random_digests(rng, 3000))
    path = f"gs://{beam_gcs.new_bucket()}/tmp/known.s16"
    beam_gcs.upload(path, known.tobytes())
    before = set(os.listdir(tempfile.gettempdir()))
    copied = DigestSet.open(path, len(known))
    assert set(os.listdir(tempfile.gettempdir())) == before  # nothing left on local disk
    queries = np.concatenate([known[::3], neighbours(known[::5])])
    assert copied.contains_digests(queries).sum() == len(known[::3])
    beam_gcs.upload(path, known[:-1].tobytes())  # replaced by a shorter file
    with pytest.raises(DigestFileError, match="fewer than the"):
        DigestSet.open(path, len(known))


def test_one_open_set_per_process_and_file(tmp_path):
    path = digest_file(tmp_path, key_digests(["a", "b"]))
    first = digests.open_shared(path, 2)
    assert digests.open_shared(path, 2) is first
    assert first.contains(["a", "c"]).tolist() == [True, False]
