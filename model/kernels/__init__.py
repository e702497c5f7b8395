"""Compiled CPU kernels for the BiT forward pass: TensorFlow custom ops built from source here.

One op today, `BitGroupNormRelu` (group_norm_relu.cc): relu(GroupNorm(x)) for float32 NHWC on the
CPU in one op, each sample read from memory once (statistics, then the apply while it is still in
cache). TensorFlow has no such op: as stock ops GroupNorm is a reduction pass plus an apply pass,
and it cost R50x1 ~13% of its CPU time (docs/benchmarks.md).

Built on first use with the machine's C++ compiler (`$CXX`, else `g++`, else `c++`) against the
installed TensorFlow's own headers and flags (`tf.sysconfig`), ~15 s, then cached as
`<kernel dir>/bit_kernels-tf<version>-<key>.so`, the key a hash of the source, TF version, compiler
and flags, so an upgrade rebuilds and concurrent builders cannot clash (atomic rename). The kernel
dir is `$BIT_TAGGER_KERNEL_DIR`, else `$XDG_CACHE_HOME/bit_tagger/kernels` (`~/.cache/...`).
`python -m model.kernels` builds ahead of time (`run.sh` and the Dockerfile do).

Never required: with no compiler, a failed build, or `BIT_TAGGER_FUSED_KERNELS=0`, `load()` returns
None, the reason is logged once as a warning, and the model uses its TensorFlow-ops GroupNorm (the
same results to float32 rounding, slower on CPU).
"""

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

_LOG = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("group_norm_relu.cc")
DISABLE_ENV = "BIT_TAGGER_FUSED_KERNELS"
DIR_ENV = "BIT_TAGGER_KERNEL_DIR"
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state = {}  # "library": loaded op module or None, "reason": why None, "path": the .so


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded; the message says why and how to turn them off."""


def kernel_dir():
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bit_tagger" / "kernels"


def disabled():
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def compiler():
    """The C++ compiler to use: `$CXX`, else g++ or c++ on PATH; None when there is none."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return shutil.which("g++") or shutil.which("c++")


def _command(cxx, source, output):
    import tensorflow as tf

    return [
        cxx,
        "-shared",
        "-fPIC",
        "-O3",
        "-w",
        *tf.sysconfig.get_compile_flags(),
        str(source),
        "-o",
        str(output),
        *tf.sysconfig.get_link_flags(),
    ]


def library_path(cxx=None):
    """Where the build for this source, TensorFlow, compiler and flags lives (built or not)."""
    import tensorflow as tf

    cxx = cxx or compiler() or "c++"
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join(_command(cxx, "SRC", "OUT")).encode())
    key.update(tf.__version__.encode())
    return kernel_dir() / f"bit_kernels-tf{tf.__version__}-{key.hexdigest()[:16]}.so"


def build(force=False):
    """Compile the kernels unless this source/TF/compiler build is cached; return the .so path."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    path = library_path(cxx)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = _command(cxx, SOURCE, tmp)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"compiling {SOURCE.name} with {cxx} failed: {e}") from e
    if done.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise KernelBuildError(
            f"compiling {SOURCE.name} with {cxx} failed (exit {done.returncode}): "
            + " | ".join(tail)
        )
    os.replace(tmp, path)
    return path


def load():
    """The loaded op module (`.bit_group_norm_relu`), building it if needed; None if unavailable."""
    with _lock:
        if "library" not in _state:
            _state.update(_load_once())
            if _state["library"] is None:
                _LOG.warning(
                    "fused GroupNorm+ReLU CPU kernel not used (%s); using TensorFlow ops, "
                    "which are slower on CPU",
                    _state["reason"],
                )
        return _state["library"]


def _load_once():
    if disabled():
        return {
            "library": None,
            "reason": f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}",
            "path": None,
        }
    import tensorflow as tf

    try:
        path = build()
        library = tf.load_op_library(str(path))
    except (KernelBuildError, tf.errors.OpError, OSError) as e:
        return {"library": None, "reason": str(e), "path": None}
    return {"library": library, "reason": None, "path": str(path)}


def status():
    """(loaded, description) after `load()`: the .so path, or why the kernels are not used."""
    load()
    if _state["library"] is not None:
        return True, f"BitGroupNormRelu from {_state['path']}"
    return False, _state["reason"]


def reset():
    """Forget the load result, so the next `load()` looks again (tests; after changing the env)."""
    with _lock:
        _state.clear()
