"""Rate control on given targets: where each stream lands and its time against a plain encode.

    python bench/rate_control.py --targets kodim23:6000B kodim15:4000B kodim20:30dB
    python bench/rate_control.py --random 4 --seed 1        # random images and size targets
    python bench/rate_control.py --random-psnr 2 --seed 1   # random images and PSNR targets

Each target is IMAGE:SIZE (bytes, e.g. 6000B or 20KB) or IMAGE:PSNR (e.g. 30dB), on the centre
crop of that Kodak image, hybrid mode, default schedule. Every target is followed by a plain
encode at the quality level rate control picked, timed in the same conditions, for the time
ratio and its RD point (the controlled stream should lie near the curve through it).
Writes bench/results/rate_control.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from common import REPO, kodak_crop

import n2l
from n2l.encoder import _quality_for_target


def parse_target(text: str) -> tuple[str, int | None, float | None]:
    m = re.fullmatch(r"(\w+):(\d+(?:\.\d+)?)(B|KB|dB)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"target must be IMAGE:NB, IMAGE:NKB or IMAGE:NdB, got {text!r}")
    image, value, unit = m.groups()
    if unit == "dB":
        return image, None, float(value)
    return image, int(float(value) * (1000 if unit == "KB" else 1)), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*", type=parse_target, default=[])
    parser.add_argument("--random", type=int, default=0, help="add N random size targets (0.15-1.5 bpp)")
    parser.add_argument("--random-psnr", type=int, default=0, help="add N random PSNR targets (26-40 dB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/rate_control.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    targets = list(args.targets)
    for _ in range(args.random):
        bpp = 0.15 * 10 ** rng.random()
        targets.append((f"kodim{rng.randint(1, 24):02d}", int(bpp * args.crop**2 / 8), None))
    for _ in range(args.random_psnr):
        targets.append((f"kodim{rng.randint(1, 24):02d}", None, round(26 + 14 * rng.random(), 1)))
    rows = []
    for image, target_bytes, target_psnr in targets:
        img = kodak_crop(image, args.crop)
        t = time.perf_counter()
        buf = n2l.encode(img, mode="hybrid", target_bytes=target_bytes, target_psnr=target_psnr, verbose=False)
        controlled_s = time.perf_counter() - t
        quality = _quality_for_target("hybrid", img, target_bytes, target_psnr)
        t = time.perf_counter()
        plain = n2l.encode(img, quality=quality, mode="hybrid", verbose=False)
        plain_s = time.perf_counter() - t
        row = {
            "image": image,
            "target_bytes": target_bytes,
            "target_psnr": target_psnr,
            "bytes": len(buf),
            "psnr": n2l.psnr(n2l.decode(buf, device="cpu"), img),
            "quality": quality,
            "encode_s": controlled_s,
            "plain_bytes": len(plain),  # the RD point the controlled stream should lie near
            "plain_psnr": n2l.psnr(n2l.decode(plain, device="cpu"), img),
            "plain_encode_s": plain_s,
            "time_ratio": controlled_s / plain_s,
        }
        if target_bytes:
            row["of_target"] = len(buf) / target_bytes
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"crop": args.crop, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
