"""`TagAndEmbedModel`: the one model object of the job (uint8 images in; scores, embeddings out).

Two slots: the tags model (needs a classification head; sigmoid of its logits) and the embed model
(its pre-logits). Each is an official `.npz` checkpoint (our `ResNetV2`, inputs mapped to [-1, 1])
or a TF Hub handle / SavedModel directory (`model.hub`, inputs in [0, 1]). One source in both slots
runs once. uint8 goes to the device and is scaled inside the traced graph. With `batch_size`, every
call runs fixed-shape batches (the last one zero-padded, outputs sliced back) so the `tf.function`
is traced once per (H, W).

With `top_k`, the k best tags are chosen inside the graph (`tf.math.top_k`, on the GPU when there is
one): only k indices and scores a row leave the device instead of all 21,843 scores, and the CPU
skips a partial sort of 21,843 floats an image, the largest cost of the job's postprocessing.
`keep_scores=False` then drops the full score matrix from the outputs altogether.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from model import DEFAULT_EMBED_MODEL, DEFAULT_TAGS_MODEL  # noqa: F401 (re-exported)
from model.resnet import ResNetV2

PRECISIONS = ("float32", "bfloat16", "float16")


class Outputs(NamedTuple):
    scores: np.ndarray | None  # float32 [B, K], sigmoid of the tags model's logits (None: not kept)
    embeddings: np.ndarray  # float32 [B, D], the embed model's pre-logits
    top_indices: np.ndarray | None = None  # int32 [B, k], with `top_k`: best classes first
    top_scores: np.ndarray | None = None  # float32 [B, k], their scores


def top_k_in_graph(scores, k: int):
    """The k best of each row of float32 `scores` [B, K] in TensorFlow: (indices int32, scores).

    Same order as `transforms.write.top_k`: score descending, ties by the lower class index
    (`tf.math.top_k`'s documented rule), NaN below every number; the scores returned are the
    original values (NaN stays NaN)."""
    ranked = tf.where(tf.math.is_nan(scores), tf.constant(-np.inf, scores.dtype), scores)
    _, indices = tf.math.top_k(ranked, k=k, sorted=True)
    return indices, tf.gather(scores, indices, batch_dims=1)


class _Net(NamedTuple):
    """One loaded source: `forward(uint8 images) -> (features or None, logits or None)` in-graph."""

    source: str
    kind: str  # "npz" or "hub"
    forward: object
    sha256: str
    architecture: str
    input_range: str
    num_classes: object
    feature_dim: object


def _use_gpu_memory_growth():
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: the setting can no longer change
            pass


def _is_npz(source):
    return str(source).lower().endswith(".npz")


def _load_npz(source, precision, cache_dir):
    from model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source, cache_dir=cache_dir)
    arch = ckpt.architecture
    net = ResNetV2(
        units=arch.units, width=arch.width, num_classes=arch.num_classes, dtype=precision
    )
    net.load_weights(ckpt.weights)

    def forward(images):
        x = (tf.cast(images, tf.float32) - 127.5) / 127.5  # BiT .npz models take [-1, 1]
        return net(x)

    name = getattr(arch, "name", None) or f"R{2 + 3 * sum(arch.units)}x{arch.width}"
    described = (
        f"{name} units={tuple(arch.units)} width={arch.width} classes={arch.num_classes or 'none'}"
    )
    return _Net(
        source, "npz", forward, ckpt.sha256, described, "[-1, 1]", arch.num_classes, net.feature_dim
    ), net


def _load_hub(source, role):
    from model.hub import load_saved_model

    hub = load_saved_model(source)

    def forward(images):
        out = tf.cast(hub(tf.cast(images, tf.float32) / 255.0), tf.float32)  # Hub BiT takes [0, 1]
        return (None, out) if role == "tags" else (out, None)

    dim = int(hub.output_dim)
    return _Net(
        source,
        "hub",
        forward,
        str(getattr(hub, "sha256", "") or ""),
        f"saved_model output_dim={dim}",
        "[0, 1]",
        dim if role == "tags" else None,
        dim if role == "embed" else None,
    ), hub


class TagAndEmbedModel:
    """uint8 [B, H, W, 3] -> `Outputs`: embeddings float32 [B, D]; scores float32 [B, K] unless
    `keep_scores=False`; with `top_k`, the k best classes int32 [B, k] and their scores."""

    def __init__(
        self,
        tags,
        embed,
        forward,
        precision,
        jit_compile,
        batch_size,
        modules=(),
        top_k=0,
        keep_scores=True,
    ):
        self._tags, self._embed = tags, embed
        self._forward = forward
        self.precision, self.jit_compile, self.batch_size = precision, jit_compile, batch_size
        self._modules = modules  # keep the variables alive
        self.top_k, self.keep_scores = top_k, keep_scores

    @classmethod
    def load(
        cls,
        tags_source=DEFAULT_TAGS_MODEL,
        embed_source=DEFAULT_EMBED_MODEL,
        *,
        precision="float32",
        jit_compile=False,
        batch_size=None,
        cache_dir=None,
        top_k=None,
        keep_scores=True,
    ):
        """Both models from their sources. `top_k` (None or 0: off) adds the k best tags of each
        image to the outputs, chosen on the device; `keep_scores=False` (only with `top_k`) leaves
        the full scores out (`Outputs.scores` is None)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        top_k = int(top_k or 0)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not top_k and not keep_scores:
            raise ValueError("keep_scores=False needs top_k: the outputs would have no tags")
        _use_gpu_memory_growth()
        same = str(tags_source) == str(embed_source)
        if same and not _is_npz(tags_source):
            raise ValueError(
                f"{tags_source!r} in both slots: a TF Hub model / SavedModel has one output, "
                "so it cannot give both tags and embeddings; use a classification module for "
                "tags and a feature-vector module for embed, or one .npz checkpoint with a head "
                "for both"
            )
        if _is_npz(tags_source):
            tags, tags_module = _load_npz(tags_source, precision, cache_dir)
        else:
            tags, tags_module = _load_hub(tags_source, "tags")
        if not tags.num_classes:
            raise ValueError(
                f"tags model {tags_source!r} has no classification head (no "
                "'resnet/head/conv2d/kernel'): tags need a checkpoint with logits, e.g. "
                "BiT-M-R50x1.npz; a headless one can only embed"
            )
        if same and tags.kind == "npz":
            embed, embed_module = tags, tags_module
        elif _is_npz(embed_source):
            embed, embed_module = _load_npz(embed_source, precision, cache_dir)
        else:
            embed, embed_module = _load_hub(embed_source, "embed")
        single_pass = embed is tags
        k = min(top_k, int(tags.num_classes))

        def forward(images):
            features, logits = tags.forward(images)
            if not single_pass:
                features, _ = embed.forward(images)
            scores = tf.sigmoid(tf.cast(logits, tf.float32))
            out = {"embeddings": tf.cast(features, tf.float32)}
            if keep_scores:
                out["scores"] = scores
            if k:
                out["top_indices"], out["top_scores"] = top_k_in_graph(scores, k)
            return out

        compiled = tf.function(forward, jit_compile=bool(jit_compile), autograph=False)
        return cls(
            tags,
            embed,
            compiled,
            precision,
            bool(jit_compile),
            None if batch_size is None else int(batch_size),
            (tags_module, embed_module),
            k,
            bool(keep_scores),
        )

    @property
    def num_classes(self):
        return int(self._tags.num_classes)

    @property
    def embedding_dim(self):
        return int(self._embed.feature_dim)

    @property
    def single_pass(self):
        """True when one forward pass gives both tags and embeddings (same .npz in both slots)."""
        return self._embed is self._tags

    def group_norm(self):
        """Which GroupNorm this process runs for the .npz model(s) (fused CPU kernel or TF ops)."""
        if "npz" not in (self._tags.kind, self._embed.kind):
            return "inside the SavedModel(s)"
        from model.group_norm import group_norm_implementation

        return group_norm_implementation(self.precision, self.jit_compile)

    def metadata(self):
        """String key-values describing the models, for the Parquet footer and the run summary."""
        meta = {}
        for role, net in (("tags", self._tags), ("embed", self._embed)):
            meta[f"{role}_model"] = net.source
            meta[f"{role}_model_sha256"] = net.sha256
            meta[f"{role}_model_format"] = net.kind
            meta[f"{role}_model_architecture"] = net.architecture
            meta[f"{role}_model_input_range"] = net.input_range
        meta["input"] = "uint8 RGB, scaled on the device to each model's input range"
        meta["scores"] = "sigmoid(logits)"
        meta["embedding"] = "pre-logits (global average pool after the final GroupNorm+ReLU)"
        meta["precision"] = self.precision
        meta["jit_compile"] = str(self.jit_compile).lower()
        meta["batch_size"] = "" if self.batch_size is None else str(self.batch_size)
        return meta

    def __call__(self, images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}"
            )
        n = images.shape[0]
        if n == 0:
            return self._outputs(
                {
                    "scores": np.zeros((0, self.num_classes), np.float32),
                    "embeddings": np.zeros((0, self.embedding_dim), np.float32),
                    "top_indices": np.zeros((0, self.top_k), np.int32),
                    "top_scores": np.zeros((0, self.top_k), np.float32),
                }
            )
        if self.batch_size is None:
            return self._outputs(
                {k: v.numpy() for k, v in self._forward(tf.constant(images)).items()}
            )
        step = self.batch_size
        parts = []
        for start in range(0, n, step):
            chunk = images[start : start + step]
            rows = chunk.shape[0]
            if rows < step:  # pad so the traced function always sees the same shape
                chunk = np.concatenate(
                    [chunk, np.zeros((step - rows,) + chunk.shape[1:], np.uint8)]
                )
            parts.append(
                {k: v.numpy()[:rows] for k, v in self._forward(tf.constant(chunk)).items()}
            )
        if len(parts) == 1:
            return self._outputs(parts[0])
        return self._outputs({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def _outputs(self, arrays: dict) -> Outputs:
        return Outputs(
            arrays["scores"] if self.keep_scores else None,
            arrays["embeddings"],
            arrays["top_indices"] if self.top_k else None,
            arrays["top_scores"] if self.top_k else None,
        )
