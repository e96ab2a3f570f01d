import math

import pytest

from structxlip.schedules import cosine_lr, warm_cosine_weight


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(0, 1.0), (1, 1.0), (4.5, 0.75), (8, 0.5), (12, 0.5)],
)
def test_warm_cosine_weight_published_schedule(epoch, factor):
    # warm 1, decay 1..8, floor 0.5: the midpoint of the decay (p = 3.5 of 7) has cos(pi/2) = 0.
    assert warm_cosine_weight(2.0, epoch, warm=1, decay_start=1, decay_end=8, floor=0.5) == pytest.approx(2.0 * factor)


def test_warm_cosine_weight_warmup_ramp_and_plateau():
    weights = [warm_cosine_weight(1.0, e, warm=4, decay_start=6, decay_end=10, floor=0.2) for e in range(12)]
    assert weights[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert weights[4:7] == pytest.approx([1.0, 1.0, 1.0])
    assert weights[7] == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert weights[10:] == pytest.approx([0.2, 0.2])


def test_warm_cosine_weight_zero_length_decay_jumps_to_floor():
    assert warm_cosine_weight(1.0, 2, warm=0, decay_start=3, decay_end=3, floor=0.4) == 1.0
    assert warm_cosine_weight(1.0, 3, warm=0, decay_start=3, decay_end=3, floor=0.4) == pytest.approx(0.4)


def test_cosine_lr_endpoints_and_midpoint():
    assert cosine_lr(0, 100, 5e-6) == pytest.approx(5e-6)
    assert cosine_lr(50, 100, 5e-6) == pytest.approx(2.5e-6)
    assert cosine_lr(100, 100, 5e-6, min_lr=1e-7) == pytest.approx(1e-7)
    assert cosine_lr(25, 100, 1.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr(500, 100, 1.0) == pytest.approx(0.0)
