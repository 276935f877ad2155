"""Is the result robust to the noise seed? Encode one image with several seeds, same settings.

    python bench/seed_robustness.py [IMAGE] --seeds 5 --crop 128 --quality 4

Prints and writes (bench/results/seed_robustness.json) the bpp and PSNR per seed and their spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import KODAK, REPO

import n2l
from n2l.evaluate.runner import center_crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=str(KODAK / "kodim23.png"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--quality", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/seed_robustness.json")
    args = parser.parse_args()
    c = args.crop
    img = center_crop(n2l.load_image(args.image), c)
    rows = []
    for seed in range(args.seeds):
        t = time.perf_counter()
        buf = n2l.encode(img, quality=args.quality, iterations=args.iterations, seed=seed, verbose=False)
        rows.append({"seed": seed, "bpp": 8 * len(buf) / (c * c),
                     "psnr": n2l.psnr(n2l.decode(buf, device="cpu", backend="torch"), img),
                     "encode_s": time.perf_counter() - t})
        print(rows[-1], flush=True)
    summary = {k: {"mean": statistics.mean(r[k] for r in rows), "stdev": statistics.stdev(r[k] for r in rows),
                   "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)} for k in ("bpp", "psnr")}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"image": Path(args.image).name, "crop": c, "quality": args.quality,
                                    "iterations": args.iterations, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
