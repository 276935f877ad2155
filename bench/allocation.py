"""How much of a dataset BD-rate is the codec's rate allocation across images, not its per-image RD.

    python bench/allocation.py bench/results/eval_kodak_crops8_hybrid_polish --anchors avif hevc jxl

A dataset curve averages bpp and PSNR (or MSE) over the images at each quality setting, so it
depends on how a setting spreads bits over the images. n2l's quality is a lambda of
MSE + lambda x bpp, the allocation that is optimal for the mean MSE at a given mean rate; the
mean of per-image PSNRs is instead best served by a fixed trade-off of PSNR against bpp. From
each image's n2l points (PSNR linear in log bpp between them) this script builds the dataset
curves of both allocations, sweeping lambda or the slope, and prints their BD-rates against each
anchor's dataset curve in both averaging conventions. Nothing is encoded: it reads results.tsv.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from n2l.evaluate.bdrate import bd_rate
from n2l.evaluate.report import read_tsv


def _aggregate(points: list[tuple[float, float]], convention: str) -> tuple[float, float]:
    bpp = float(np.mean([b for b, _ in points]))
    if convention == "psnr":
        return bpp, float(np.mean([p for _, p in points]))
    return bpp, float(-10 * np.log10(np.mean([10 ** (-p / 10) for _, p in points])))


def _allocate(curves: dict[str, tuple[np.ndarray, np.ndarray]], criterion: str, knob: float) -> list[tuple[float, float]]:
    """Each image's point that minimizes MSE + knob x bpp (criterion "mse") or maximizes
    PSNR - knob x bpp ("psnr"), on a fine grid of its interpolated curve."""
    points = []
    for log_bpp, psnr in curves.values():
        grid = np.linspace(log_bpp[0], log_bpp[-1], 4000)
        p = np.interp(grid, log_bpp, psnr)
        cost = 10 ** (-p / 10) + knob * np.exp(grid) if criterion == "mse" else knob * np.exp(grid) - p
        k = int(np.argmin(cost))
        points.append((float(np.exp(grid[k])), float(p[k])))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an n2l eval output folder (results.tsv)")
    parser.add_argument("--anchors", nargs="+", default=["avif", "hevc", "jxl", "webp"])
    args = parser.parse_args()
    rows = read_tsv(args.run / "results.tsv")
    per_image: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["codec"] == "n2l":
            per_image[r["image"]].append((r["bpp"], r["psnr"]))
    curves = {img: (np.log([b for b, _ in sorted(pts)]), np.array([p for _, p in sorted(pts)]))
              for img, pts in per_image.items()}
    sweeps = {"mse": np.geomspace(1e-5, 1e-1, 24), "psnr": np.geomspace(0.3, 100, 24)}
    print("anchor  convention  lambda allocation (n2l's)  PSNR-slope allocation")
    for anchor in args.anchors:
        settings: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["codec"] == anchor:
                settings[r["quality"]].append((r["bpp"], r["psnr"]))
        complete = [pts for pts in settings.values() if len(pts) == len(curves)]
        for convention in ("psnr", "mse"):
            a = sorted(_aggregate(pts, convention) for pts in complete)
            out = []
            for criterion in ("mse", "psnr"):
                t = sorted({_aggregate(_allocate(curves, criterion, k), convention) for k in sweeps[criterion]})
                out.append(bd_rate([b for b, _ in a], [p for _, p in a], [b for b, _ in t], [p for _, p in t]))
            name = "mean PSNR" if convention == "psnr" else "PSNR of mean MSE"
            print(f"{anchor:7s} {name:17s} {out[0]:+6.1f}%  {out[1]:+6.1f}%")


if __name__ == "__main__":
    main()
