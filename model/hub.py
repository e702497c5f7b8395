"""TF Hub handles and SavedModel directories as a plain callable, and export of a ResNetV2.

Loaded with `tensorflow_hub.resolve` + `tf.saved_model.load`, not Keras: Keras 3 cannot wrap
TF1/TF2 Hub modules, and the job needs only "images in [0, 1] -> [B, D]". The TF Hub BiT
convention is [0, 1] inputs (the module maps them to [-1, 1] itself); `export_saved_model`
writes SavedModels with the same convention, so both kinds load the same way.

Sources: `https://tfhub.dev/...` (downloaded once into TFHUB_CACHE_DIR by tensorflow_hub;
offline, a handle that is not cached fails within seconds instead of hanging), a local
SavedModel directory, or a `gs://` one (copied once to the local cache through core.storage).
"""

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse

import numpy as np
import tensorflow as tf

from core.storage import unreachable_reason
from model.checkpoint import CheckpointError, cache_path

_LOG = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_PROBE_SIZE = 64  # spatial size of the one probe call used to find an unknown output size


class HubError(CheckpointError):
    """A TF Hub handle or SavedModel directory cannot be fetched or used."""


class HubModel:
    """A loaded SavedModel: `model(images01 [B, H, W, 3] float in [0, 1]) -> [B, D] float32`.

    `.output_dim` (D, from the signature or one probe call), `.source` (the handle as given),
    `.path` (local directory loaded), `.sha256` (fingerprint, see `_fingerprint`).
    """

    def __init__(self, fn, output_key, source, path, output_dim=None):
        self._fn, self._output_key = fn, output_key
        self.source, self.path = source, path
        self.sha256 = _fingerprint(path)
        self.output_dim = output_dim or int(
            self(tf.zeros([1, _PROBE_SIZE, _PROBE_SIZE, 3])).shape[-1]
        )

    def __call__(self, images01):
        out = self._fn(tf.convert_to_tensor(images01, tf.float32))
        if isinstance(out, dict):
            out = out[self._output_key]
        return tf.cast(out, tf.float32)

    def __repr__(self):
        return f"HubModel({self.source!r}, output_dim={self.output_dim})"


def load_saved_model(handle):
    """Load a TF Hub handle or a local / gs:// SavedModel directory as a HubModel."""
    path = _resolve(handle)
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        raise HubError(f"{handle}: {path} is not a SavedModel directory (no saved_model.pb)")
    try:
        obj = tf.saved_model.load(path)
    except Exception as e:
        raise HubError(
            f"{handle}: cannot load the SavedModel in {path}: {type(e).__name__}: {e}"
        ) from e
    bad = _first_non_finite(path)
    if bad is not None:
        raise HubError(
            f"{handle}: variable {bad} has non-finite values (NaN or infinity): a damaged or "
            "diverged model cannot give meaningful tags or embeddings"
        )
    fn, key, dim = _entry_point(obj, handle)
    model = HubModel(fn, key, handle, path, dim)
    model._saved_model = obj  # keep the variables alive
    return model


def _first_non_finite(path):
    """The name of the first floating-point variable of the SavedModel at `path` holding a NaN or
    an infinity (read from its checkpoint one variable at a time), or None."""
    prefix = os.path.join(path, "variables", "variables")
    if not tf.io.gfile.exists(prefix + ".index"):
        return None
    for name, _ in tf.train.list_variables(prefix):
        value = tf.train.load_variable(prefix, name)
        if (
            isinstance(value, np.ndarray)
            and value.dtype.kind == "f"
            and not np.isfinite(value).all()
        ):
            return name
    return None


def _fingerprint(path):
    """sha256 of saved_model.pb + variables/variables.index, a cheap model fingerprint.

    The index stores each tensor's crc32c, so it changes with any weight; hashing the
    variable shards themselves would read gigabytes.
    """
    h = hashlib.sha256()
    for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
        file = os.path.join(path, name)
        if tf.io.gfile.exists(file):
            with tf.io.gfile.GFile(file, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _entry_point(obj, handle):
    """The model's entry point: `__call__` if saved, else the serving_default signature.

    Returns (callable, output key or None, output size or None).
    """
    if callable(obj):
        specs = [f.structured_outputs for f in getattr(obj.__call__, "concrete_functions", [])]
        dims = {s.shape[-1] for s in specs if isinstance(s, tf.TensorSpec) and s.shape.rank}
        return obj, None, (dims.pop() if len(dims) == 1 and None not in dims else None)
    signature = getattr(obj, "signatures", {}).get("serving_default")
    if signature is None:
        raise HubError(
            f"{handle}: the SavedModel has neither a __call__ function "
            "nor a serving_default signature"
        )
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1:
        raise HubError(
            f"{handle}: serving_default takes {sorted(inputs)}; expected one image input"
        )
    key = next((k for k in ("default", "output_0", "logits", "pre_logits") if k in outputs), None)
    if key is None and len(outputs) == 1:
        key = next(iter(outputs))
    if key is None:
        raise HubError(
            f"{handle}: cannot tell which serving_default output to use: {sorted(outputs)}"
        )
    (name,) = inputs
    dim = outputs[key].shape[-1] if outputs[key].shape.rank else None
    return (lambda x: signature(**{name: x})), key, dim


# ---- resolving handles -----------------------------------------------------------------------


def _resolve(handle):
    scheme = urllib.parse.urlsplit(handle).scheme if "://" in handle else ""
    if scheme in ("http", "https"):
        return _resolve_url(handle)
    if scheme not in ("", "file"):
        return _copy_remote_dir(handle)
    path = handle[len("file://") :] if scheme == "file" else handle
    if not os.path.isdir(path):
        raise HubError(f"{handle}: no such SavedModel directory")
    return path


def _tfhub_module_dir(handle):
    """Where tensorflow_hub caches `handle` (its rule: sha1 of the handle under TFHUB_CACHE_DIR)."""
    from tensorflow_hub import resolver

    return os.path.join(
        resolver.tfhub_cache_dir(use_temp=True), hashlib.sha1(handle.encode("utf8")).hexdigest()
    )


def _resolve_url(handle):
    import tensorflow_hub as hub

    module_dir = _tfhub_module_dir(handle)
    if not (os.path.isdir(module_dir) and os.listdir(module_dir)):
        url = urllib.parse.urlsplit(handle)
        _check_reachable(handle, url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        return hub.resolve(handle)
    except Exception as e:
        raise HubError(
            f"cannot fetch {handle}: {type(e).__name__}: {e}. " + _offline_hint(handle)
        ) from e


def _offline_hint(handle):
    return (
        "If this machine has no network access, download the model elsewhere "
        f"({handle}?tf-hub-format=compressed is a .tar.gz of the SavedModel), unpack it and pass "
        "the directory instead (e.g. --tags_model /path/to/saved_model_dir), or copy a "
        "tensorflow_hub cache that holds it and set TFHUB_CACHE_DIR to it "
        f"(this handle is cached as {_tfhub_module_dir(handle)})."
    )


def _check_reachable(handle, host, port, timeout=CONNECT_TIMEOUT_S):
    """Fail within `timeout` s when `host:port` cannot be reached.

    tensorflow_hub's urlopen has no timeout of its own.
    """
    why = unreachable_reason(host, port, timeout)
    if why is not None:
        raise HubError(
            f"cannot reach {host}:{port} to fetch {handle} ({why}). " + _offline_hint(handle)
        )


def _copy_remote_dir(source):
    """Copy a remote SavedModel dir to the local cache once (atomic rename); return its path."""
    from core import storage

    local = cache_path(source.rstrip("/"))
    if os.path.isfile(os.path.join(local, "saved_model.pb")):
        return local
    _LOG.info("copying SavedModel %s to %s", source, local)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(
        dir=os.path.dirname(local), prefix=os.path.basename(local) + ".", suffix=".partial"
    )
    try:
        fs, path = storage.get_filesystem(source)
        path = path.rstrip("/")
        files = [f for f in fs.find(path) if f != path]
        if not files:
            raise FileNotFoundError(f"{source} is empty or does not exist")
        for remote in files:
            dest = os.path.join(tmp, os.path.relpath(remote, path))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open(remote, "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
        if os.path.isdir(local):
            shutil.rmtree(local)  # an incomplete copy from another tool
        os.replace(tmp, local)
        return local
    except HubError:
        raise
    except Exception as e:
        raise HubError(
            f"cannot fetch SavedModel {source}: {type(e).__name__}: {e}. If this machine has "
            "no network access, copy the directory here and pass its local path."
        ) from e
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---- export ----------------------------------------------------------------------------------


class _Serving(tf.Module):
    def __init__(self, resnet, output):
        super().__init__(name="bit_serving")
        self.resnet = resnet
        self.output = output

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    def __call__(self, images):
        pre_logits, logits = self.resnet(images * 2.0 - 1.0)  # TF Hub convention: [0, 1] in
        return logits if self.output == "logits" else pre_logits


def export_saved_model(resnet, path, output="logits"):
    """Write `resnet` (a loaded model.resnet.ResNetV2) as a SavedModel taking [0, 1] float images.

    `output`: "logits" ([B, K], needs a head) or "pre_logits" ([B, 2048 * width]). The model is
    callable (`obj(images)`) and has a `serving_default` signature; returns `path`.
    """
    if output not in ("logits", "pre_logits"):
        raise ValueError(f"output must be 'logits' or 'pre_logits', not {output!r}")
    if output == "logits" and getattr(resnet, "head", None) is None:
        raise ValueError("output='logits' needs a model with a head (num_classes)")
    module = _Serving(resnet, output)
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.__call__.get_concrete_function()}
    )
    return path
