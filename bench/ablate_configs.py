"""Architecture ablation: RD cost of network variants against the quality level's own network.

    python bench/ablate_configs.py --images kodim23 kodim07 --qualities 0 3 \
        --variants res2:synth_residual=2 gpp8:gpp_hidden=8 "deep:synth_hidden=(16,16)"

For each image crop and quality, encodes (hybrid mode, default schedule, the quality's lambda)
with the level's network from HYBRID_CONFIGS and with each variant (fields replaced), and prints
J = MSE + lambda x bpp per variant relative to the base. Writes bench/results/ablate_configs.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import REPO, kodak_crop, rd_cost

import n2l
from n2l.encoder import HYBRID_CONFIGS, quality_lambda


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME:field=value;field=value (values as Python literals, e.g. synth_hidden=(16,16))."""
    name, _, fields = text.partition(":")
    return name, {k: ast.literal_eval(v) for k, v in (f.split("=", 1) for f in fields.split(";") if f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=["kodim23"])
    parser.add_argument("--qualities", nargs="+", type=int, default=[0, 3])
    parser.add_argument("--variants", nargs="+", type=parse_variant, required=True)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: n2l's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/ablate_configs.json")
    args = parser.parse_args()
    rows = []
    for image in args.images:
        img = kodak_crop(image, args.crop)
        for q in args.qualities:
            lmbda = quality_lambda(q, "hybrid", img)
            base = None
            for name, fields in [("base", {}), *args.variants]:
                config = replace(HYBRID_CONFIGS[q], **fields)
                if name != "base" and config == HYBRID_CONFIGS[q]:
                    print(f"{image} q{q} {name}: same network as the level's own, skipped")
                    continue
                t = time.perf_counter()
                buf = n2l.encode(img, q, mode="hybrid", config=config, iterations=args.iterations, verbose=False)
                seconds = time.perf_counter() - t
                psnr = n2l.psnr(n2l.decode(buf, device="cpu"), img)
                bpp = 8 * len(buf) / (img.shape[0] * img.shape[1])
                j = rd_cost(psnr, bpp, lmbda)
                base = j if name == "base" else base
                row = {"image": image, "quality": q, "variant": name, "fields": {k: str(v) for k, v in fields.items()},
                       "bpp": bpp, "psnr": psnr, "J": j, "J_vs_base": j / base - 1, "encode_s": seconds,
                       "macs_per_pixel": config.macs_per_pixel(*img.shape[:2])}
                rows.append(row)
                print(f"{image} q{q} {name:10s} {bpp:.4f} bpp {psnr:.2f} dB J {j:.4e} ({row['J_vs_base']:+.1%}) "
                      f"{seconds:.0f} s {row['macs_per_pixel']:.0f} MAC/px", flush=True)
    for name in ["base", *(n for n, _ in args.variants)]:
        changes = [r["J_vs_base"] for r in rows if r["variant"] == name]
        if changes:
            print(f"{name:10s} mean J vs base {np.mean(changes):+.2%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
