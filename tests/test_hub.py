"""model.hub: SavedModel export/load with [0, 1] inputs, and clear, fast errors for bad handles."""

import os
import shutil
import socket
import time

import numpy as np
import pytest
import tensorflow as tf

from core import storage
from model import hub
from model.hub import HubError, HubModel, export_saved_model, load_saved_model
from model.resnet import ResNetV2
from tests.bit_checkpoints import random_weights

UNITS, WIDTH, CLASSES = (1, 1, 1, 1), 1, 7


@pytest.fixture(scope="module")
def net():
    model = ResNetV2(units=UNITS, width=WIDTH, num_classes=CLASSES)
    model.load_weights(random_weights(UNITS, WIDTH, CLASSES, seed=3))
    return model


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {
        out: export_saved_model(net, str(root / out), output=out)
        for out in ("logits", "pre_logits")
    }


def _uint8_images(b=2, h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _rel_err(got, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("output,dim", [("logits", CLASSES), ("pre_logits", 2048 * WIDTH)])
def test_saved_model_matches_npz_path(net, exported, output, dim):
    model = load_saved_model(exported[output])
    assert isinstance(model, HubModel)
    assert model.output_dim == dim and model.source == exported[output]
    assert len(model.sha256) == 64 and model.sha256 == load_saved_model(exported[output]).sha256
    images = _uint8_images()
    got = model(tf.constant(images, tf.float32) / 255.0)  # TF Hub convention: [0, 1]
    pre_logits, logits = net((images.astype(np.float32) - 127.5) / 127.5)  # the .npz path: [-1, 1]
    want = logits if output == "logits" else pre_logits
    assert got.shape == (2, dim) and got.dtype == tf.float32
    assert _rel_err(got, want) <= 1e-5


def test_serving_signature_only(net, exported, tmp_path):
    """A SavedModel without a restored __call__ is used through serving_default."""
    obj = tf.saved_model.load(exported["logits"])
    signature_only = tf.Module()
    signature_only.v = obj  # keep variables
    path = str(tmp_path / "sig")
    tf.saved_model.save(
        signature_only, path, signatures={"serving_default": obj.signatures["serving_default"]}
    )
    model = load_saved_model(path)
    images = _uint8_images(1, 32, 32, seed=5)
    x = tf.constant(images, tf.float32) / 255.0
    np.testing.assert_allclose(
        model(x), load_saved_model(exported["logits"])(x), rtol=1e-5, atol=1e-5
    )
    assert model.output_dim == CLASSES


def test_export_logits_needs_head(tmp_path):
    headless = ResNetV2(units=UNITS, width=WIDTH, num_classes=None)
    with pytest.raises(ValueError, match="head"):
        export_saved_model(headless, str(tmp_path / "x"), output="logits")
    with pytest.raises(ValueError, match="output"):
        export_saved_model(headless, str(tmp_path / "x"), output="probs")


def test_non_finite_variables_are_refused(tmp_path):
    weights = random_weights(UNITS, WIDTH, CLASSES, seed=3)
    weights["resnet/head/conv2d/bias"] = np.full(CLASSES, np.nan, np.float32)
    model = ResNetV2(units=UNITS, width=WIDTH, num_classes=CLASSES)
    model.load_weights(weights)
    export_saved_model(model, str(tmp_path / "nan"), output="logits")
    with pytest.raises(HubError, match="has non-finite values"):
        load_saved_model(str(tmp_path / "nan"))


def test_missing_dir(tmp_path):
    with pytest.raises(HubError, match="no such SavedModel directory"):
        load_saved_model(str(tmp_path / "nope"))


def test_not_a_saved_model(tmp_path):
    (tmp_path / "model.npz").write_bytes(b"x")
    with pytest.raises(HubError, match="not a SavedModel directory"):
        load_saved_model(str(tmp_path))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_fast_clear_failure(handle, start):
    with pytest.raises(HubError) as e:
        load_saved_model(handle)
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert (
        handle in message
        and "TFHUB_CACHE_DIR" in message
        and "--tags_model /path/to/saved_model_dir" in message
    )
    return message


def test_unreachable_url_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hubcache"))
    handle = f"http://127.0.0.1:{_closed_port()}/google/bit/m-r50x1/1"
    _assert_fast_clear_failure(handle, time.monotonic())


def test_tfhub_handle_offline_fails_fast(tmp_path, monkeypatch):
    """tfhub.dev itself is never contacted: the reachability probe points at a closed local port."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hubcache"))
    port = _closed_port()
    real = hub._check_reachable
    probed = []

    def local_probe(handle, host, port_, timeout=hub.CONNECT_TIMEOUT_S):
        probed.append((host, port_))
        return real(handle, "127.0.0.1", port, timeout)

    monkeypatch.setattr(hub, "_check_reachable", local_probe)
    handle = "https://tfhub.dev/google/bit/m-r50x1/imagenet21k_classification/1"
    _assert_fast_clear_failure(handle, time.monotonic())
    assert probed == [("tfhub.dev", 443)]


def test_cached_tfhub_handle_needs_no_network(exported, tmp_path, monkeypatch):
    """A handle already in TFHUB_CACHE_DIR loads offline (no probe, no download)."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hubcache"))
    handle = "https://tfhub.dev/google/bit/m-r101x3/1"
    module_dir = hub._tfhub_module_dir(handle)
    assert module_dir.startswith(str(tmp_path / "hubcache"))
    shutil.copytree(exported["pre_logits"], module_dir)

    def no_network(*args, **kwargs):
        raise AssertionError("network probed for a cached handle")

    monkeypatch.setattr(hub, "_check_reachable", no_network)
    model = load_saved_model(handle)
    assert model.output_dim == 2048 * WIDTH and model.source == handle


def test_gcs_saved_model_dir(gcs_emulator, exported, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("BIT_CACHE_DIR", str(tmp_path / "cache"))
    bucket = gcs_emulator.new_bucket("hub")
    root = exported["logits"]
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            gcs_emulator.upload_file(f"gs://{bucket}/m/{rel}", os.path.join(dirpath, name))
    storage.clear_cache()
    try:
        model = load_saved_model(f"gs://{bucket}/m")
    finally:
        storage.clear_cache()
    assert model.output_dim == CLASSES
    assert model.sha256 == load_saved_model(root).sha256
    assert model.path.startswith(str(tmp_path / "cache"))
    x = tf.constant(_uint8_images(1), tf.float32) / 255.0
    np.testing.assert_allclose(model(x), load_saved_model(root)(x), rtol=1e-6, atol=1e-6)
