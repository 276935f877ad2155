"""Bjøntegaard delta rate / PSNR on synthetic curves."""

import math

import numpy as np
import pytest

from n2l.evaluate.bdrate import BDWarning, bd_psnr, bd_rate, pchip_integral

RATE = [0.1, 0.25, 0.5, 1.0, 2.0]
PSNR = [26.0, 29.5, 32.8, 36.1, 39.9]


def test_identical_curves_are_zero():
    assert bd_rate(RATE, PSNR, RATE, PSNR) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATE, PSNR, RATE, PSNR) == pytest.approx(0.0, abs=1e-9)


def test_rates_times_0_9_is_minus_10_percent():
    test_rate = [0.9 * r for r in RATE]
    assert bd_rate(RATE, PSNR, test_rate, PSNR) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate(test_rate, PSNR, RATE, PSNR) == pytest.approx(100 / 0.9 - 100, abs=1e-6)
    # Fewer bits at equal PSNR is a PSNR gain at equal rate.
    assert bd_psnr(RATE, PSNR, test_rate, PSNR) > 0


def test_psnr_shift_gives_bd_psnr():
    shifted = [p + 0.5 for p in PSNR]
    assert bd_psnr(RATE, PSNR, RATE, shifted) == pytest.approx(0.5, abs=1e-9)
    assert bd_rate(RATE, PSNR, RATE, shifted) < 0


def test_order_of_points_does_not_matter():
    perm = [3, 0, 4, 1, 2]
    a = bd_rate(RATE, PSNR, [0.8 * RATE[i] for i in perm], [PSNR[i] + 0.2 for i in perm])
    b = bd_rate(RATE, PSNR, [0.8 * r for r in RATE], [p + 0.2 for p in PSNR])
    assert a == pytest.approx(b)


def test_non_overlapping_is_nan_with_warning():
    high = [p + 20 for p in PSNR]
    with pytest.warns(BDWarning, match="do not overlap"):
        assert math.isnan(bd_rate(RATE, PSNR, RATE, high))
    with pytest.warns(BDWarning, match="do not overlap"):
        assert math.isnan(bd_psnr(RATE, PSNR, [r * 100 for r in RATE], PSNR))


def test_too_few_points_is_nan_with_warning():
    with pytest.warns(BDWarning):
        assert math.isnan(bd_rate(RATE, PSNR, [0.5], [33.0]))


def test_pchip_integral_exact_on_linear_and_matches_scipy():
    x = np.array([0.0, 1.0, 3.0])
    assert pchip_integral(x, 2 * x + 1, 0.5, 2.5) == pytest.approx((2.5**2 + 2.5) - (0.5**2 + 0.5))
    scipy_interp = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    for _ in range(20):
        xs = np.sort(rng.uniform(0, 10, 6))
        ys = rng.normal(size=6)
        lo, hi = np.sort(rng.uniform(xs[0], xs[-1], 2))
        ref = scipy_interp.PchipInterpolator(xs, ys).integrate(lo, hi)
        assert pchip_integral(xs, ys, lo, hi) == pytest.approx(ref, rel=1e-9, abs=1e-12)
