"""bench/gpu_xla.py: the job's graph exported for XLA, then compiled and run by jax on the CPU in a
process where TensorFlow cannot be imported, against TensorFlow's outputs for the same weights.

Bounds: float32 (and tf32, which is float32 on a CPU) within 1e-4 of TensorFlow, relative to the
largest embedding value, with identical ranked top-10 lists. bfloat16 within 5e-2 of TensorFlow's
bfloat16 with at least 80% of the top-10 classes shared, and no further from TensorFlow's float32
than twice TensorFlow's own bfloat16 is. Why: bfloat16 keeps 8 significant bits (a rounding step
of 2**-9, 0.2%), and the two graphs round at different places (TensorFlow after every op, XLA
only where a fused computation stores its result), so each layer adds differences of a few steps
that compound with depth. Measured: 1.9e-2 on these small nets, where TensorFlow's bfloat16 is
3.0e-2 from its float32 (on the real R50x1 + R101x3: 1.2e-1 and 2.2e-1, so both bfloat16 graphs
are as far from float32 and from each other). 5e-2 leaves room for other CPUs' instruction sets
without hiding a real error, which moves the outputs by 5e-3 to 0.7 (a wrong epsilon or padding)
in float32, where the bound is 1e-4.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import gpu_xla
from model.checkpoint import Architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs bench/gpu_xla.py with its arguments in a process where importing TensorFlow (or Beam, Keras,
# TF Hub: what would bring it in) raises ImportError.
WITHOUT_TENSORFLOW = """
import runpy, sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tf_keras", "keras", "tensorflow_hub",
                                      "apache_beam"):
            raise ImportError(f"{name} cannot be imported in this process")
        return None

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = ["bench/gpu_xla.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_xla.py", run_name="__main__")
"""


def without_tensorflow(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    argv = ["export", "--out", str(out), "--small_models", "--batch_sizes", "8,4"]
    assert gpu_xla.main([*argv, "--image_size", "64"]) == 0
    return out


@pytest.fixture(scope="module")
def run_report(export_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run.json"
    done = without_tensorflow(
        "run", str(export_dir), "--json", str(path), "--seconds", "0", "--rounds", "1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(path.read_text()), done.stdout


def test_export_writes_programs_a_manifest_and_a_reference_but_no_weights(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    names = [p["name"] for p in manifest["programs"]]
    assert sorted(names) == sorted(
        f"{p}-b{b}" for p in ("float32", "tf32", "bfloat16") for b in (8, 4)
    )
    by_name = {p["name"]: p for p in manifest["programs"]}
    assert by_name["float32-b8"]["operand_precision"] == "highest"
    assert by_name["tf32-b8"]["operand_precision"] == "default"
    assert [o["name"] for o in manifest["outputs"]] == ["embeddings", "top_indices", "top_scores"]
    assert manifest["top_k"] == 10  # the job's default: only the 10 best tags leave the device
    # Every weight is a parameter: tags with its head, embed without (the job never uses it).
    params = manifest["parameter_sets"]["bfloat16"]
    shapes = {r: Architecture(**_arch(m)).expected_shapes() for r, m in manifest["models"].items()}
    assert [(p["role"], p["key"]) for p in params if p["role"] == "embed"]
    assert {(p["role"], p["key"]) for p in params} == {
        (r, k) for r, keys in shapes.items() for k in keys
    }
    head = next(p for p in params if p["key"] == "resnet/head/conv2d/kernel")
    assert head["shape"] == [2048, 21843] and head["derive"] == "reshape_head"
    assert head["dtype"] == "bfloat16"
    gamma = next(p for p in params if p["key"].endswith("group_norm/gamma"))
    assert gamma["dtype"] == "float32" and gamma["derive"] == "none"
    for program in manifest["programs"]:  # no path of this machine inside
        hlo = gzip.decompress((export_dir / program["file"]).read_bytes())
        assert ROOT.encode() not in hlo and b"site-packages" not in hlo
    weight_bytes = sum(4 * np.prod(s) for keys in shapes.values() for s in keys.values())
    on_disk = sum(f.stat().st_size for f in export_dir.iterdir())
    assert on_disk < weight_bytes / 50
    reference = np.load(export_dir / "reference.npz")
    assert reference["images"].shape == (gpu_xla.REF_IMAGES, 64, 64, 3)
    assert reference["float32/top_indices"].shape == (gpu_xla.REF_IMAGES, 10)


def _arch(m):
    return dict(units=tuple(m["units"]), width=m["width"], num_classes=m["num_classes"])


def test_jax_without_tensorflow_matches_tensorflow(run_report, export_dir):
    report, _ = run_report
    manifest = json.loads((export_dir / "manifest.json").read_text())
    tensorflow_bf16 = manifest["reference"]["tensorflow_bfloat16_max_rel_err"]
    assert report["backend"] == "cpu" and report["device"]
    assert report["export"]["model_code_current"] is True
    rows = {r["name"]: r for r in report["results"]}
    assert len(rows) == 6 and {r["status"] for r in rows.values()} == {"ok"}
    for name, row in rows.items():
        assert row["weights_match_export"] is True
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and row["compile_s"] > 0
        assert row["fraction_of_peak"] is None  # no peak for a CPU
        if row["precision"] == "bfloat16":
            assert row["embedding_max_rel_err"] <= 5e-2, name
            assert row["top_k_agreement"] >= 0.8, name
            assert row["float32_max_rel_err"] <= 2 * tensorflow_bf16, name
        else:
            assert row["embedding_max_rel_err"] <= 1e-4, name
            assert row["top_k_exact"] == 1.0, name


def test_tensorflow_really_is_blocked_there(export_dir):
    done = without_tensorflow("export", "--out", str(export_dir / "again"), "--small_models")
    assert done.returncode != 0
    assert "tensorflow cannot be imported in this process" in done.stderr


def test_the_table_and_the_result_lines(run_report, capsys):
    report, stdout = run_report
    assert "| precision | batch | compile s | images/s |" in stdout
    peer = {
        "device": "cpu",
        "results": [
            {"name": "timm-compiled-b8", "mode": "compiled", "batch_size": 8, "status": "ok",
             "images_per_s": 2.0},
        ],
    }  # fmt: skip
    report["results"].append({"name": "float32-b64", "precision": "float32", "batch_size": 64,
                              "status": "skipped: needs ~70 s, 3 s left"})  # fmt: skip
    gpu_xla.print_table(report, peer)
    out = capsys.readouterr().out
    bf16 = next(r for r in report["results"] if r["name"] == "bfloat16-b8")
    assert f"| {bf16['images_per_s'] / 2.0:.2f} |" in out  # ours / timm compiled, same batch
    assert "| float32 | 64 | skipped: needs ~70 s, 3 s left |" in out
    assert "RESULT name=gpu_xla_bf16_peak" not in out  # a CPU has no peak


def test_a_budget_skips_what_would_not_fit_and_a_watchdog_stops_an_overrun(export_dir, tmp_path):
    path = tmp_path / "run.json"
    args = ["--json", str(path), "--budget_s", "60", "--rounds", "100"]  # 100 s of rounds each
    done = without_tensorflow("run", str(export_dir), *args)
    assert done.returncode == 1  # nothing measured
    rows = json.loads(path.read_text())["results"]
    assert len(rows) == 6 and all(r["status"].startswith("skipped: needs ~") for r in rows)
    stuck = "from bench.gpu_xla import Budget; import time; Budget(0.5); time.sleep(60)"
    done = subprocess.run([sys.executable, "-c", stuck], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 3 and "STOPPED: budget 0.5 s overrun" in done.stdout


def test_run_says_what_is_wrong_with_a_directory(tmp_path, capsys):
    assert gpu_xla.main(["run", str(tmp_path)]) == 2
    assert "is not an export" in capsys.readouterr().err


def test_weights_are_the_same_bits_everywhere():
    arch = Architecture((1, 1, 1, 1), 1, None)
    arrays = gpu_xla.checkpoint_arrays(arch, 1)
    assert list(arrays) == list(arch.expected_shapes())
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert gpu_xla.fingerprint(arrays) == gpu_xla.fingerprint(gpu_xla.checkpoint_arrays(arch, 1))
    assert gpu_xla.fingerprint(arrays) != gpu_xla.fingerprint(gpu_xla.checkpoint_arrays(arch, 2))
    # Pinned: a NumPy whose PCG64 uniform floats changed would make `run` feed other weights
    # than the export's reference used.
    assert gpu_xla.fingerprint(arrays).startswith("9ec45e5ef7cc")


def test_order_of_importance():
    programs = [
        {"name": f"{p}-b{b}", "precision": p, "batch_size": b}
        for p in ("float32", "tf32", "bfloat16")
        for b in (16, 64, 128, 256)
    ]
    assert [p["name"] for p in gpu_xla.order(programs)] == [
        "bfloat16-b64", "float32-b64", "tf32-b64",
        "bfloat16-b128", "bfloat16-b256", "tf32-b128", "tf32-b256", "float32-b128", "float32-b256",
        "bfloat16-b16", "tf32-b16", "float32-b16",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "device, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),
        ("NVIDIA H200", "tf32", 494.7),
        ("NVIDIA H200", "float32", 66.9),
        ("NVIDIA L40S", "bfloat16", 362.0),
        ("NVIDIA L4", "bfloat16", 121.0),
        ("Tesla K80", "bfloat16", None),
        ("cpu", "float32", None),
    ],
)
def test_dense_peaks_by_device_name(device, precision, peak):
    assert gpu_xla.peak_tflops(device, precision) == peak


@pytest.mark.parametrize(
    "argv", [["export", "--out", "x", "--precisions", "float16"], ["run", "x", "--rounds", "y"]]
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        gpu_xla.main(argv)
    assert exc.value.code == 2
