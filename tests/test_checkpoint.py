"""model.checkpoint: architecture inference, strict loading, remote fetch and the local cache."""

import hashlib
import io
import os
import pickle
import socket
import time
import zipfile

import fsspec
import numpy as np
import pytest

from core import storage
from model import checkpoint as ckpt
from model.checkpoint import (
    Architecture,
    Checkpoint,
    CheckpointError,
    architecture_from_shapes,
    load_checkpoint,
)
from tests.bit_checkpoints import checkpoint_shapes, random_weights, write_checkpoint

SMALL = dict(units=(1, 1, 1, 1), width=1, num_classes=10)


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _save(path, weights):
    with open(path, "wb") as f:
        np.savez(f, **weights)
    return str(path)


# ---- architecture ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "units,width,num_classes,name",
    [
        ((3, 4, 6, 3), 1, 21843, "R50x1"),
        ((3, 4, 6, 3), 3, None, "R50x3"),
        ((3, 4, 23, 3), 1, 1000, "R101x1"),
        ((3, 4, 23, 3), 3, 21843, "R101x3"),
        ((3, 8, 36, 3), 2, None, "R152x2"),
        ((3, 8, 36, 3), 4, 21843, "R152x4"),
        ((1, 1, 1, 1), 1, 10, "ResNetV2-1-1-1-1x1"),
    ],
)
def test_architecture_inference(units, width, num_classes, name):
    shapes = checkpoint_shapes(units, width, num_classes)
    arch = architecture_from_shapes(shapes)
    assert arch == Architecture(units, width, num_classes)
    assert arch.name == name
    assert arch.feature_dim == 2048 * width
    assert arch.expected_shapes() == shapes  # the inverse of inference, in file order
    assert list(arch.expected_shapes()) == list(shapes)


def test_r50x1_parameter_counts():
    with_head = Architecture((3, 4, 6, 3), 1, 21843)
    assert with_head.num_params == 68_256_659
    assert len(with_head.expected_shapes()) == 153
    backbone = Architecture((3, 4, 6, 3), 1, None)
    assert backbone.num_params == 23_500_352
    assert len(backbone.expected_shapes()) == 151


def test_inference_rejects_non_bit_shapes():
    shapes = checkpoint_shapes((1, 1, 1, 1))
    with pytest.raises(CheckpointError, match="root_block"):
        architecture_from_shapes({k: v for k, v in shapes.items() if "root_block" not in k})
    with pytest.raises(CheckpointError, match="block"):
        architecture_from_shapes({k: v for k, v in shapes.items() if "block2/" not in k})


# ---- local loading ---------------------------------------------------------------------------


def test_round_trip(tmp_path):
    path = str(tmp_path / "small.npz")
    weights = write_checkpoint(path, **SMALL)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.architecture == Architecture((1, 1, 1, 1), 1, 10)
    assert loaded.source == path
    assert loaded.sha256 == _sha256(path)
    assert list(loaded.weights) == list(checkpoint_shapes(**SMALL))
    for key, value in weights.items():
        assert loaded.weights[key].dtype == np.float32
        np.testing.assert_array_equal(loaded.weights[key], value)


def test_headless_and_file_uri(tmp_path):
    path = str(tmp_path / "nohead.npz")
    write_checkpoint(path, units=(2, 1, 1, 1), width=2)
    loaded = load_checkpoint("file://" + path)
    assert loaded.architecture == Architecture((2, 1, 1, 1), 2, None)


def test_missing_key(tmp_path):
    weights = random_weights(**SMALL)
    del weights["resnet/block3/unit01/b/group_norm/beta"]
    with pytest.raises(CheckpointError, match="missing: resnet/block3/unit01/b/group_norm/beta"):
        load_checkpoint(_save(tmp_path / "m.npz", weights))


def test_extra_key(tmp_path):
    weights = random_weights(**SMALL)
    weights["resnet/block1/unit01/a/bias"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="unexpected: resnet/block1/unit01/a/bias"):
        load_checkpoint(_save(tmp_path / "e.npz", weights))


def test_misshaped_key(tmp_path):
    weights = random_weights(**SMALL)
    weights["resnet/block2/unit01/c/standardized_conv2d/kernel"] = np.zeros(
        (1, 1, 128, 511), np.float32
    )
    with pytest.raises(
        CheckpointError, match=r"wrong shape: resnet/block2/unit01/c/standardized_conv2d/kernel"
    ):
        load_checkpoint(_save(tmp_path / "s.npz", weights))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_array(tmp_path, bad):
    weights = random_weights(**SMALL)
    key = "resnet/block3/unit01/b/group_norm/gamma"
    weights[key] = weights[key].copy()
    weights[key][-1] = bad
    path = _save(tmp_path / "diverged.npz", weights)
    with pytest.raises(CheckpointError, match=f"diverged.npz: array {key} has non-finite values"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(str(tmp_path / "nope.npz"))


def test_pickled_npz_is_refused(tmp_path):
    weights = random_weights(**SMALL)
    weights["resnet/group_norm/beta"] = np.array([{"evil": 1}] * 2048, dtype=object)
    path = _save(tmp_path / "p.npz", weights)
    with pytest.raises(CheckpointError, match="pickled.*refusing") as e:
        load_checkpoint(path)
    assert "resnet/group_norm/beta" in str(e.value)


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(pickle.dumps(random_weights(**SMALL)))
    with pytest.raises(CheckpointError, match="not an .npz.*pickle: refused"):
        load_checkpoint(str(path))


def test_truncated_file(tmp_path):
    path = tmp_path / "t.npz"
    write_checkpoint(str(path), **SMALL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_corrupt_member_data(tmp_path):
    path = tmp_path / "c.npz"
    write_checkpoint(str(path), **SMALL)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("resnet/block4/unit01/b/standardized_conv2d/kernel.npy")
    data[info.header_offset + 200] ^= 0xFF  # inside that member's array data: CRC mismatch
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def test_not_a_zip(tmp_path):
    path = tmp_path / "html.npz"
    path.write_bytes(b"<html>Access denied</html>")
    with pytest.raises(CheckpointError, match="not an .npz") as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_float64_is_kept_as_float32(tmp_path):
    weights = {k: v.astype(np.float64) for k, v in random_weights(**SMALL).items()}
    loaded = load_checkpoint(_save(tmp_path / "f64.npz", weights))
    assert all(v.dtype == np.float32 for v in loaded.weights.values())


# ---- remote sources and the cache ------------------------------------------------------------


@pytest.fixture
def memory_checkpoint(tmp_path):
    """A small checkpoint at memory://, its bytes and weights."""
    local = tmp_path / "src.npz"
    weights = write_checkpoint(str(local), **SMALL)
    data = local.read_bytes()
    fs = fsspec.filesystem("memory")
    url = f"memory://bucket-{os.getpid()}-{time.monotonic_ns()}/BiT-M-R50x1.npz"
    fs.pipe(url, data)
    yield url, data, weights
    fs.rm(url)


def _forbid_remote(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the source was read although the cache is valid")

    monkeypatch.setattr(storage, "get_filesystem", boom)
    monkeypatch.setattr(storage, "open_file", boom)


def test_remote_is_cached_and_second_load_reads_no_network(
    memory_checkpoint, tmp_path, monkeypatch
):
    url, data, weights = memory_checkpoint
    cache = tmp_path / "cache"
    first = load_checkpoint(url, cache_dir=str(cache))
    local = ckpt.cache_path(url, str(cache))
    assert local.startswith(str(cache)) and open(local, "rb").read() == data
    assert first.sha256 == hashlib.sha256(data).hexdigest() and first.source == url
    assert not [p for p in os.listdir(os.path.dirname(local)) if p.endswith(".partial")]

    _forbid_remote(monkeypatch)
    second = load_checkpoint(url, cache_dir=str(cache))
    assert second.sha256 == first.sha256
    for key, value in weights.items():
        np.testing.assert_array_equal(second.weights[key], value)


def test_cache_dir_from_environment(memory_checkpoint, tmp_path, monkeypatch):
    url, data, _ = memory_checkpoint
    monkeypatch.setenv("BIT_CACHE_DIR", str(tmp_path / "envcache"))
    load_checkpoint(url)
    assert open(ckpt.cache_path(url), "rb").read() == data
    assert ckpt.cache_path(url).startswith(str(tmp_path / "envcache"))


@pytest.mark.parametrize("damage", ["truncate", "same_size_garbage", "no_metadata"])
def test_damaged_cache_is_fetched_again(memory_checkpoint, tmp_path, damage):
    url, data, weights = memory_checkpoint
    cache = str(tmp_path / "cache")
    load_checkpoint(url, cache_dir=cache)
    local = ckpt.cache_path(url, cache)
    if damage == "truncate":  # an interrupted copy made by something else
        with open(local, "r+b") as f:
            f.truncate(len(data) // 3)
    elif damage == "same_size_garbage":
        with open(local, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(b"\0" * 64)
    else:
        os.remove(local + ".meta.json")
    again = load_checkpoint(url, cache_dir=cache)
    assert open(local, "rb").read() == data
    assert again.sha256 == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(again.weights[ckpt.ROOT_KERNEL], weights[ckpt.ROOT_KERNEL])


def test_invalid_remote_checkpoint_is_not_fetched_twice(tmp_path, monkeypatch):
    weights = random_weights(**SMALL)
    del weights[ckpt.HEAD_BIAS]
    buf = io.BytesIO()
    np.savez(buf, **weights)
    url = f"memory://bad-{os.getpid()}-{time.monotonic_ns()}/BiT-M-R50x1.npz"
    fsspec.filesystem("memory").pipe(url, buf.getvalue())
    cache = str(tmp_path / "cache")
    with pytest.raises(CheckpointError, match="missing: resnet/head/conv2d/bias"):
        load_checkpoint(url, cache_dir=cache)
    _forbid_remote(monkeypatch)  # the cached copy is intact: the error is the checkpoint's own
    with pytest.raises(CheckpointError, match="missing: resnet/head/conv2d/bias"):
        load_checkpoint(url, cache_dir=cache)
    fsspec.filesystem("memory").rm(url)


def test_remote_missing_object(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("memory://no-such-bucket/x.npz", cache_dir=str(tmp_path))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_bucket_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    storage.clear_cache()
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            load_checkpoint("gs://bit_models/BiT-M-R50x1.npz", cache_dir=str(tmp_path))
        elapsed = time.monotonic() - start
    finally:
        storage.clear_cache()
    assert elapsed < 10, elapsed
    message = str(e.value)
    assert "gs://bit_models/BiT-M-R50x1.npz" in message
    assert "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz" in message
    assert "--tags_model /path/BiT-M-R50x1.npz" in message
    assert not os.path.exists(ckpt.cache_path("gs://bit_models/BiT-M-R50x1.npz", str(tmp_path)))


def test_gcs_emulator_fetch_and_cache(gcs_emulator, tmp_path, monkeypatch):  # noqa: F811
    src = tmp_path / "src.npz"
    weights = write_checkpoint(str(src), **SMALL)
    bucket = gcs_emulator.new_bucket("ckpt")
    url = f"gs://{bucket}/models/BiT-M-R50x1.npz"
    gcs_emulator.upload_file(url, src)
    storage.clear_cache()
    cache = str(tmp_path / "cache")
    first = load_checkpoint(url, cache_dir=cache)
    assert first.sha256 == _sha256(src)
    assert ckpt.cache_path(url, cache) == os.path.join(
        cache, "gs", bucket, "models", "BiT-M-R50x1.npz"
    )
    # Offline now: the cached copy is enough.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    storage.clear_cache()
    try:
        second = load_checkpoint(url, cache_dir=cache)
    finally:
        storage.clear_cache()
    assert second.sha256 == first.sha256
    np.testing.assert_array_equal(second.weights[ckpt.HEAD_BIAS], weights[ckpt.HEAD_BIAS])
