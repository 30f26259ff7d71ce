"""DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) against its formula: the boundaries
of the three cases, the factor, buffer 0 as off, and arguments that cannot describe a budget."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmai_rl.reward import soft_overlong_penalty


def eq13(length: int, l_max: int, l_cache: int) -> float:
    """R_length as the paper writes it, case by case."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


@pytest.mark.parametrize(
    ("length", "penalty"),
    [
        (0, 0.0),
        (6, 0.0),  # the last length before the buffer: L_max - L_cache
        (7, -0.25),
        (8, -0.5),
        (9, -0.75),
        (10, -1.0),  # cut at the budget
        (11, -1.0),
        (1000, -1.0),
    ],
)
def test_the_penalty_falls_linearly_over_the_buffer(length, penalty):
    assert soft_overlong_penalty(length, max_tokens=10, buffer=4) == penalty


def test_dapo_settings():
    """DAPO's run: 16384 expected tokens plus a 4096-token cache, 20480 generated at most."""
    assert soft_overlong_penalty(16384, 20480, 4096) == 0.0
    assert soft_overlong_penalty(16385, 20480, 4096) == -1 / 4096
    assert soft_overlong_penalty(18432, 20480, 4096) == -0.5
    assert soft_overlong_penalty(20480, 20480, 4096) == -1.0


@given(
    st.integers(0, 300),
    st.integers(1, 200),
    st.data(),
    st.sampled_from([0.0, 0.25, 1.0, 2.5]),
)
def test_the_penalty_is_the_formula_times_the_factor(length, l_max, data, factor):
    l_cache = data.draw(st.integers(1, l_max - 1)) if l_max > 1 else 0
    got = soft_overlong_penalty(length, l_max, l_cache, factor)
    want = factor * eq13(length, l_max, l_cache) if l_cache else 0.0
    assert got == pytest.approx(want, abs=1e-12)
    assert -factor <= got <= 0.0
    assert soft_overlong_penalty(length + 1, l_max, l_cache, factor) <= got  # never rewards length


@pytest.mark.parametrize("length", [0, 47, 48, 49, 10_000])
def test_buffer_zero_is_off_whatever_the_length(length):
    assert soft_overlong_penalty(length, 48, 0, factor=3.0) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 10, 4, 1.0), "length=-1 must be >= 0"),
        ((5, 0, 0, 1.0), "max_tokens=0 must be >= 1"),
        ((5, 10, -1, 1.0), "buffer=-1 must be >= 0 and < max_tokens=10"),
        ((5, 10, 10, 1.0), "buffer=10 must be >= 0 and < max_tokens=10"),
        ((5, 10, 11, 1.0), "buffer=11"),
        ((5, 10, 4, -0.5), "factor=-0.5 must be finite and >= 0"),
        ((5, 10, 4, math.nan), "factor=nan"),
        ((5, 10, 4, math.inf), "factor=inf"),
    ],
)
def test_bad_arguments_are_rejected_naming_them(args, message):
    with pytest.raises(ValueError, match=message):
        soft_overlong_penalty(*args)
