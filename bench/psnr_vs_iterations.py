"""Encode cost: PSNR, bpp and RD cost against the number of training iterations.

    python bench/psnr_vs_iterations.py [IMAGE] --crop 256 --quality 4 --iterations 500 1000 2000 4000
    python bench/psnr_vs_iterations.py --mode hybrid --iterations 2000 4000 8000
    python bench/psnr_vs_iterations.py IMAGE --crop 0 --device cuda   # whole image, GPU encode

Writes bench/results/psnr_vs_iterations[_hybrid].json; tells whether the presets stop where more
iterations stop paying.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import KODAK, REPO, rd_cost

import n2l
from n2l.encoder import quality_lambda
from n2l.evaluate.runner import center_crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=str(KODAK / "kodim23.png"))
    parser.add_argument("--crop", type=int, default=256, help="center NxN crop; 0: the whole image")
    parser.add_argument("--quality", type=int, default=4)
    parser.add_argument("--iterations", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--mode", choices=("pure", "hybrid"), default="pure")
    parser.add_argument("--device", default="cpu", help="torch device for encoding")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = "_hybrid" if args.mode == "hybrid" else ""
    args.out = args.out or REPO / f"bench/results/psnr_vs_iterations{suffix}.json"
    img = n2l.load_image(args.image)
    img = center_crop(img, args.crop) if args.crop else img
    pixels = img.shape[0] * img.shape[1]
    rows = []
    for iterations in args.iterations:
        t = time.perf_counter()
        buf = n2l.encode(img, quality=args.quality, mode=args.mode, iterations=iterations, device=args.device,
                         verbose=False)
        psnr = n2l.psnr(n2l.decode(buf, device="cpu", backend="torch"), img)
        bpp = 8 * len(buf) / pixels
        rows.append({"iterations": iterations, "bpp": bpp, "psnr": psnr, "encode_s": time.perf_counter() - t,
                     "rd_cost": rd_cost(psnr, bpp, quality_lambda(args.quality, args.mode, img))})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"image": Path(args.image).name, "crop": args.crop, "device": args.device,
                                    "height": img.shape[0], "width": img.shape[1], "quality": args.quality,
                                    "mode": args.mode, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
