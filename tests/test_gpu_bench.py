"""bench/gpu.py's pure parts (no GPU, no model run): arguments, the order of configurations, the
budget estimate, FLOP counting, the table, and that it loads the model as the job does."""

import json
import threading

import pytest

from bench import gpu
from bench.gpu import Config


def test_arguments_defaults_and_single_batch_size():
    args = gpu.parse_args([])
    assert args.batch_sizes == [16, 32, 64, 128]
    assert args.ref_batch == 64
    assert args.precisions == ["float32", "bfloat16", "float16"]
    assert args.xla_modes == [False, True]
    assert args.model_copies == [1, 2]
    assert args.shared_model_threads == [2]
    one = gpu.parse_args(["--batch_size", "32", "--shared_model_threads", "0"])
    assert one.batch_sizes == [32] and one.ref_batch == 32 and one.shared_model_threads == []
    assert gpu.parse_args(["--batch_sizes", "2,4"]).ref_batch == 4  # nearest listed to 64


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch_sizes", "16,x"],
        ["--precisions", "float64"],
        ["--xla", "maybe"],
        ["--model_copies", "", "--shared_model_threads", ""],
        ["--batch_sizes", ""],
    ],
)
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        gpu.parse_args(argv)


def test_loads_the_model_as_the_job_does(monkeypatch):
    """transforms.infer.load_model with the job's defaults passes exactly gpu.job_load_kwargs."""
    from model.bit import TagAndEmbedModel
    from transforms import infer

    seen = {}

    class Loaded:
        def group_norm(self):
            return "TensorFlow ops"

    def fake_load(tags, embed, **kwargs):
        seen.update(kwargs)
        return Loaded()

    monkeypatch.setattr(TagAndEmbedModel, "load", staticmethod(fake_load))
    monkeypatch.setattr(infer, "_LOADED", {})
    config = infer.InferenceConfig(
        tags_model="tags.npz",
        embed_model="embed.npz",
        schema=None,
        batch_size=64,
        precision="bfloat16",
        jit_compile=True,
    )
    infer.load_model(config)
    assert seen == gpu.job_load_kwargs("bfloat16", True, 64)
    assert seen["top_k"] == infer.InferenceConfig._field_defaults["top_k"]


def test_macs_match_the_known_counts():
    # ResNet-50 with a 1,000-class head: the usual 4.09 GMACs at 224x224.
    assert gpu.resnet_macs((3, 4, 6, 3), 1, 1000, 224) == pytest.approx(4.09e9, rel=0.01)
    r50 = gpu.resnet_macs(units=(3, 4, 6, 3), width=1, num_classes=21843, image_size=224)
    r101x3 = gpu.resnet_macs(units=(3, 4, 23, 3), width=3, num_classes=21843, image_size=224)
    assert r50 == pytest.approx(4.13e9, rel=0.005)
    assert r101x3 == pytest.approx(69.6e9, rel=0.005)
    head = 2048 * 21843
    assert gpu.resnet_macs((3, 4, 6, 3), 1, None, 224) == r50 - head


def order(configs, rates=None, ref=64, xla_modes=(False, True)):
    return sorted(configs, key=lambda c: gpu.importance(c, ref, rates or {}, list(xla_modes)))


def test_order_of_importance():
    configs = gpu.matrix(
        ["float32", "bfloat16", "float16"], [False, True], [16, 32, 64, 128], [1, 2], [2]
    )
    assert len(configs) == 3 * 2 * 4 * 3
    first = [c.name for c in order(configs)[:5]]
    assert first == [
        "float32-xla_off-b64-c1",
        "bfloat16-xla_on-b64-c1",
        "float32-xla_on-b64-c1",
        "bfloat16-xla_off-b64-c1",
        "float32-xla_off-b16-c1",  # the job's defaults
    ]
    # Measured: XLA helps bfloat16 and not float32. Then each precision's faster mode is swept
    # over the batch sizes (the faster precision first at each distance from 64), then copies.
    rates = {
        Config("float32", False, 64): 100.0,
        Config("float32", True, 64): 90.0,
        Config("bfloat16", False, 64): 150.0,
        Config("bfloat16", True, 64): 300.0,
        Config("float32", False, 16): 60.0,
    }
    rest = [c for c in order(configs, rates) if c not in rates]
    assert [c.name for c in rest[:8]] == [
        "bfloat16-xla_on-b128-c1",
        "float32-xla_off-b128-c1",
        "bfloat16-xla_on-b32-c1",
        "float32-xla_off-b32-c1",
        "bfloat16-xla_on-b16-c1",
        "bfloat16-xla_on-b64-c2",
        "float32-xla_off-b64-c2",
        "bfloat16-xla_on-b64-c2s",
    ]
    assert [c.name for c in rest[9:11]] == ["float16-xla_off-b64-c1", "float16-xla_on-b64-c1"]


def test_estimate_grows_with_what_must_be_loaded_and_compiled():
    est = gpu.Estimator(seconds=2.0, rounds=3)
    c = Config("float32", False, 64)
    assert est.estimate(c) == pytest.approx(1.15 * 6 + 2)  # nothing measured: the rounds only
    est.record(load_s=[10.0], warmups=[20.0], xla=False, rate=640.0)
    key = c.model_keys()[0]
    loaded_warm = est.estimate(c, loaded={key}, warmed={(key, 64)})
    cold = est.estimate(c)
    assert cold == pytest.approx(loaded_warm + 1.15 * 30)
    assert est.warmup_s(True) == 60.0  # no XLA warm-up measured yet: 3x the plain one
    two = Config("float32", False, 64, copies=2)
    assert est.estimate(two, loaded={key}, warmed={(key, 64)}) == pytest.approx(
        loaded_warm + 1.15 * 30
    )
    shared = Config("float32", False, 64, copies=2, shared=True)
    assert shared.model_keys() == [key]
    assert est.estimate(shared, loaded={key}, warmed={(key, 64)}) == pytest.approx(loaded_warm)


def test_estimate_before_anything_was_measured_uses_the_priors():
    est = gpu.Estimator(seconds=1.0, rounds=2, load_prior_s=20.0, warmup_prior_s=10.0)
    assert est.estimate(Config("bfloat16", True, 64)) == pytest.approx(1.15 * (20 + 30 + 2) + 2)
    assert est.estimate(Config("bfloat16", False, 64)) == pytest.approx(1.15 * (20 + 10 + 2) + 2)


def test_a_failure_blocks_larger_batches_of_its_precision_and_mode():
    failed = [Config("float16", True, 64)]
    assert gpu.blocked_by(Config("float16", True, 128), failed) == failed[0]
    assert gpu.blocked_by(Config("float16", True, 64, copies=2, shared=True), failed)
    assert gpu.blocked_by(Config("float16", True, 32), failed) is None
    assert gpu.blocked_by(Config("float16", False, 128), failed) is None


def test_timed_round_adds_up_the_threads():
    calls = []
    lock = threading.Lock()

    def call():
        with lock:
            calls.append(1)

    rate = gpu.timed_round([call, call], seconds=0.05, batch=4)
    assert rate > 0 and len(calls) >= 2
    assert gpu.timed_round([call], seconds=0.01, batch=4) > 0


def measured(config, rate, lo, hi, tflops, fraction=None, notes=""):
    """A result row as `bench.gpu` reports a measured configuration of one copy."""
    return dict(
        config.as_dict(),
        copies_text="1",
        images_per_s=rate,
        min=lo,
        max=hi,
        tflops=tflops,
        fraction_of_peak=fraction,
        notes=notes,
    )


def test_table_and_summary():
    rows = [
        measured(Config("bfloat16", True, 64), 300.0, 290.0, 310.0, 44.3, 0.0448, "peak 989.4"),
        measured(Config("float32", False, 16), 60.0, 59.0, 61.0, 8.9),
        dict(
            Config("float16", True, 128, 2, True).as_dict(),
            copies_text="2 threads, 1 model",
            images_per_s=None,
            notes="failed: ResourceExhaustedError: OOM",
        ),
    ]
    table = gpu.format_table(rows).splitlines()
    assert table[0].startswith("| configuration | batch | copies | images/s (median) | range |")
    assert table[2] == "| float32 | 16 | 1 | 60.0 | 59.0-61.0 | 8.9 | n/a |  |"
    assert table[3].startswith("| bfloat16 + XLA | 64 | 1 | 300.0 | 290.0-310.0 | 44.3 | 4.5% |")
    assert table[4] == (
        "| float16 + XLA | 128 | 2 threads, 1 model | - | - | - | - "
        "| failed: ResourceExhaustedError: OOM |"
    )
    best, baseline = gpu.summary_ratio(rows)
    assert best["name"] == "bfloat16-xla_on-b64-c1"
    assert baseline["name"] == "float32-xla_off-b16-c1"
    assert gpu.summary_ratio(rows[2:]) == (None, None)


def test_report_prints_the_table_once_and_keeps_the_json(tmp_path, capsys):
    path = tmp_path / "out" / "gpu.json"
    report = gpu.Report(str(path), dict(title="T", machine=dict(device="X")))
    report.add(measured(Config("float32", False, 16), 10.0, 9.0, 11.0, 1.0))
    assert json.loads(path.read_text())["complete"] is False  # written after each result
    report.skip(Config("float16", True, 16), "needs ~9 s, 1 s left", 9.0, 1.0)
    assert report.final("budget overrun") is True
    assert report.final() is False  # the watchdog, SIGTERM and the end print it once
    out = capsys.readouterr().out
    assert out.startswith("GPU_RESULT {")
    assert out.count("| configuration |") == 1
    assert "STOPPED EARLY: budget overrun" in out
    assert "RESULT name=gpu ratio=1.000 target=>=1 pass=yes" in out
    data = json.loads(path.read_text())
    assert data["stopped"] == "budget overrun" and data["complete"] is False
    assert [s["name"] for s in data["skipped"]] == ["float16-xla_on-b16-c1"]
