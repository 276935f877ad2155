"""Fit the typical bpp and PSNR of plain hybrid encodes against quality and image texture.

    python bench/fit_typical_rd.py

Reads n2l's rows of an eight-crop eval and the plain encodes that rate control runs time
(bench/rate_control.py's JSON), one point per image and quality, and fits by least squares
log bpp and PSNR ~ c0 + c1 q + c2 q^2 + c3 log t + c4 q log t, t = `n2l.encoder.texture` of the
crop. Prints the coefficients (n2l.encoder.HYBRID_LOG_BPP_FIT, HYBRID_PSNR_FIT), the residuals'
spread, and the spread when each image is left out of the fit, against a fit without texture.
The fit describes encodes at each level's own lambda (QUALITY_LAMBDAS, where rate control
starts): give it runs from before the per-image lambda of `n2l.encoder.quality_lambda` (8h,
e.g. 8b's eval) or rescale, since a plain encode now trains at the image's own lambda.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from common import REPO, kodak_crop

from n2l.encoder import texture

RESULTS = REPO / "bench/results"


def points(eval_tsv: Path, rate_control: list[Path], crop: int = 256) -> dict[tuple[str, int], tuple[float, float]]:
    """(image, quality) -> (bpp, PSNR) of plain hybrid encodes of centre crops."""
    out = {}
    with open(eval_tsv) as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["codec"] == "n2l" and int(r["width"]) == crop:
                out[r["image"], int(r["quality"])] = (float(r["bpp"]), float(r["psnr"]))
    for path in rate_control:
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)["rows"]
        for r in rows:
            out.setdefault((r["image"], r["quality"]), (8 * r["plain_bytes"] / crop**2, r["plain_psnr"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, default=RESULTS / "eval_kodak_crops8_hybrid_trial18k/results.tsv")
    parser.add_argument("--rate-control", type=Path, nargs="*",
                        default=sorted((RESULTS / "rate_control_7z").glob("*.json*")))
    args = parser.parse_args()
    data = points(args.eval, args.rate_control)
    images = sorted({image for image, _ in data})
    log_t = {image: math.log(texture(kodak_crop(image, 256))) for image in images}
    keys = sorted(data)
    owner = np.array([image for image, _ in keys])
    print(f"{len(keys)} encodes of {len(images)} crops; texture:",
          ", ".join(f"{image} {math.exp(log_t[image]):.0f}" for image in images))

    def design(with_texture: bool) -> np.ndarray:
        return np.array([[1, q, q * q] + ([log_t[i], q * log_t[i]] if with_texture else []) for i, q in keys])

    for name, y in (("log bpp", np.log([data[k][0] for k in keys])), ("PSNR", np.array([data[k][1] for k in keys]))):
        for with_texture in (True, False):
            x = design(with_texture)
            coef = np.linalg.lstsq(x, y, rcond=None)[0]
            held_out = np.concatenate([y[owner == image] - x[owner == image] @ np.linalg.lstsq(
                x[owner != image], y[owner != image], rcond=None)[0] for image in images])
            label = "with texture" if with_texture else "without"
            print(f"{name:8s} {label:13s} coefficients ({', '.join(f'{c:.4g}' for c in coef)}); residual sd "
                  f"{np.std(y - x @ coef):.3f}, each image left out {np.std(held_out):.3f}")


if __name__ == "__main__":
    main()
