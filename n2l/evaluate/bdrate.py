"""Bjøntegaard delta rate and PSNR with piecewise cubic Hermite (pchip) interpolation.

BD-rate: log-rate as a pchip function of PSNR for both curves, integrated over the common
PSNR range; the mean log-rate difference is turned into a percentage (negative = the test
codec needs fewer bits than the anchor at equal quality). BD-PSNR: PSNR as a pchip function
of log-rate, integrated over the common log-rate range (positive = the test codec is better).

The pchip here is Fritsch-Carlson with SciPy's end conditions (``PchipInterpolator``) and
is integrated exactly, so no SciPy is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np


class BDWarning(RuntimeWarning):
    """A Bjøntegaard delta could not be computed (too few points, no overlap)."""


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Derivatives at the knots, as scipy.interpolate.PchipInterpolator computes them."""
    h = np.diff(x)
    delta = np.diff(y) / h
    n = len(x)
    if n == 2:
        return np.array([delta[0], delta[0]])
    d = np.zeros(n)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = (np.sign(delta[:-1]) * np.sign(delta[1:])) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    d[1:-1] = np.where(same_sign, harmonic, 0.0)

    def edge(h0: float, h1: float, m0: float, m1: float) -> float:
        e = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        if np.sign(e) != np.sign(m0):
            return 0.0
        if np.sign(m0) != np.sign(m1) and abs(e) > abs(3 * m0):
            return 3 * m0
        return e

    d[0] = edge(h[0], h[1], delta[0], delta[1])
    d[-1] = edge(h[-1], h[-2], delta[-1], delta[-2])
    return d


def pchip_integral(x: Sequence[float], y: Sequence[float], lo: float, hi: float) -> float:
    """Exact integral over [lo, hi] of the pchip interpolant through (x, y); x strictly increasing."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError("pchip needs at least 2 points with strictly increasing x")
    if not (x[0] - 1e-9 <= lo <= hi <= x[-1] + 1e-9):
        raise ValueError(f"integration range [{lo}, {hi}] outside the data [{x[0]}, {x[-1]}]")
    d = _pchip_slopes(x, y)
    total = 0.0
    for k in range(len(x) - 1):
        a, b = max(lo, x[k]), min(hi, x[k + 1])
        if b <= a:
            continue
        h = x[k + 1] - x[k]
        c0 = y[k]
        c1 = h * d[k]
        c2 = 3 * (y[k + 1] - y[k]) - 2 * h * d[k] - h * d[k + 1]
        c3 = 2 * (y[k] - y[k + 1]) + h * d[k] + h * d[k + 1]
        ta, tb = (a - x[k]) / h, (b - x[k]) / h

        prim_b = c0 * tb + c1 * tb**2 / 2 + c2 * tb**3 / 3 + c3 * tb**4 / 4
        prim_a = c0 * ta + c1 * ta**2 / 2 + c2 * ta**3 / 3 + c3 * ta**4 / 4
        total += h * (prim_b - prim_a)
    return float(total)


def _clean_curve(rate: Sequence[float], psnr: Sequence[float], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite, positive-rate points sorted by `key` ("psnr" or "rate"), duplicates of the key dropped."""
    r = np.asarray(rate, dtype=np.float64)
    p = np.asarray(psnr, dtype=np.float64)
    ok = np.isfinite(r) & np.isfinite(p) & (r > 0)
    r, p = r[ok], p[ok]
    lr = np.log(r)
    k = p if key == "psnr" else lr
    order = np.argsort(k, kind="stable")
    lr, p, k = lr[order], p[order], k[order]
    keep = np.concatenate([[True], np.diff(k) > 1e-12]) if len(k) else np.zeros(0, bool)
    return lr[keep], p[keep]


def _mean_gap(anchor: tuple, test: tuple, along: str, metric: str) -> float:
    """Mean of test minus anchor over their common range of `along` ("psnr": gap in log-rate;
    "rate": gap in PSNR); NaN with a BDWarning when the curves are too short or do not overlap."""
    (la, pa), (lt, pt) = _clean_curve(*anchor, along), _clean_curve(*test, along)
    if len(pa) < 2 or len(pt) < 2:
        warnings.warn(f"{metric}: each curve needs at least 2 distinct points", BDWarning, stacklevel=3)
        return math.nan
    # x is the axis integrated over, y the one whose gap is averaged.
    (xa, ya), (xt, yt) = ((pa, la), (pt, lt)) if along == "psnr" else ((la, pa), (lt, pt))
    lo, hi = max(xa[0], xt[0]), min(xa[-1], xt[-1])
    if hi <= lo:
        show = (lambda v: f"{v:.2f}") if along == "psnr" else (lambda v: f"{math.exp(v):.3f}")
        unit = "dB" if along == "psnr" else "bpp"
        warnings.warn(
            f"{metric}: {'PSNR' if along == 'psnr' else 'rate'} ranges do not overlap (anchor "
            f"{show(xa[0])}-{show(xa[-1])}, test {show(xt[0])}-{show(xt[-1])} {unit})",
            BDWarning,
            stacklevel=3,
        )
        return math.nan
    return (pchip_integral(xt, yt, lo, hi) - pchip_integral(xa, ya, lo, hi)) / (hi - lo)


def bd_rate(
    anchor_rate: Sequence[float],
    anchor_psnr: Sequence[float],
    test_rate: Sequence[float],
    test_psnr: Sequence[float],
) -> float:
    """BD-rate of `test` against `anchor` in percent; NaN with a BDWarning when it is undefined."""
    gap = _mean_gap((anchor_rate, anchor_psnr), (test_rate, test_psnr), "psnr", "BD-rate")
    return float((math.exp(gap) - 1) * 100)


def bd_psnr(
    anchor_rate: Sequence[float],
    anchor_psnr: Sequence[float],
    test_rate: Sequence[float],
    test_psnr: Sequence[float],
) -> float:
    """BD-PSNR of `test` against `anchor` in dB; NaN with a BDWarning when it is undefined."""
    return float(_mean_gap((anchor_rate, anchor_psnr), (test_rate, test_psnr), "rate", "BD-PSNR"))
