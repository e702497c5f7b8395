"""model/flops.py: the one count of multiply-accumulates per image."""

import pytest

from model.checkpoint import Architecture
from model.flops import job_macs_per_image, macs_per_image


def test_resnet50_has_the_published_count():
    # ResNet-50 v1.5 (the stride on the 3x3 conv, as BiT) with a 1,000-class head: 4.09 GMACs.
    assert macs_per_image(Architecture((3, 4, 6, 3), 1, 1000)) == pytest.approx(4.09e9, rel=0.005)


def test_head_and_resolution():
    backbone = macs_per_image(Architecture((3, 4, 6, 3), 1, None))
    with_head = macs_per_image(Architecture((3, 4, 6, 3), 1, 21843))
    assert with_head - backbone == 2048 * 21843
    # Convolutions scale with the pixels (448 = 2 x 224: 4x, up to rounding at odd sizes).
    big = macs_per_image(Architecture((3, 4, 6, 3), 1, None), image_size=448)
    assert big == pytest.approx(4 * backbone, rel=0.01)


def test_the_jobs_figure():
    macs = job_macs_per_image()
    assert macs["total"] == macs["tags"] + macs["embed"]
    assert round(macs["tags"] / 1e9, 2) == 4.13  # R50x1 with its 21k head
    assert round(macs["embed"] / 1e9, 2) == 69.49  # R101x3 pre-logits (the job uses no head)
    assert round(macs["total"] / 1e9, 2) == 73.62  # the figure docs/gpu.md and README quote
