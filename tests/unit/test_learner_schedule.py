import math

import pytest

from gmai_rl.learner.schedule import lr_at


def test_warmup_is_linear_from_the_first_step():
    assert [lr_at(s, 1.0, 4, 100, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decays_to_the_floor_and_stays():
    base, floor = 2.0, 0.2
    assert lr_at(10, base, 10, 110, 0.1) == pytest.approx(base)  # decay starts at the peak
    assert lr_at(60, base, 10, 110, 0.1) == pytest.approx(floor + (base - floor) * 0.5)  # midpoint
    assert lr_at(110, base, 10, 110, 0.1) == pytest.approx(floor)
    assert lr_at(500, base, 10, 110, 0.1) == pytest.approx(floor)


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 3e-4, 0, 300, 0.1) == pytest.approx(3e-4)
    quarter = lr_at(75, 3e-4, 0, 300, 0.0)
    assert quarter == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
