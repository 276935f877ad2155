"""BD-rate between the n2l curves of two `n2l eval` runs on the same images (e.g. pure vs hybrid).

    python bench/compare_runs.py bench/results/eval_kodak_crops8 bench/results/eval_kodak_crops8_hybrid

Prints, for both PSNR-averaging conventions, the BD-rate and BD-PSNR of the second run's n2l
curve against the first's (negative BD-rate = the second run needs fewer bits).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from n2l.evaluate.bdrate import bd_psnr, bd_rate
from n2l.evaluate.report import REFERENCE, dataset_curve


def n2l_curve(run: Path) -> tuple[dict[str, list], set[str]]:
    with open(run / "results.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["codec"] == REFERENCE]
    for r in rows:
        for key in ("quality", "bpp", "psnr", "mse", "ms_ssim", "enc_time_s", "dec_time_s", "macs_per_pixel"):
            r[key] = float(r[key])
    images = {r["image"] for r in rows}
    return dataset_curve(rows, sorted(images)), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anchor", type=Path, help="eval output folder of the anchor run")
    parser.add_argument("test", type=Path, help="eval output folder of the run compared with it")
    args = parser.parse_args()
    (a, a_images), (t, t_images) = n2l_curve(args.anchor), n2l_curve(args.test)
    if a_images != t_images:
        raise SystemExit(f"the runs cover different images: {sorted(a_images ^ t_images)}")
    for key in ("psnr", "psnr_of_mean_mse"):
        rate = bd_rate(a["bpp"], a[key], t["bpp"], t[key])
        gain = bd_psnr(a["bpp"], a[key], t["bpp"], t[key])
        print(f"{key}: BD-rate {rate:+.1f}%, BD-PSNR {gain:+.2f} dB ({len(a_images)} images)")


if __name__ == "__main__":
    main()
