"""RD evaluation on center 256x256 crops of 8 Kodak images, or 4 held-out ones (CPU), via `n2l eval`.

    python bench/eval_kodak.py --jobs 2             # the full run (slow on CPU), two encodes at a time
    python bench/eval_kodak.py --images 2 --qualities 2 6 --iterations 50   # a smoke run
    python bench/eval_kodak.py --heldout --qualities 1 4 7 --jobs 2 --out bench/results/eval_kodak_heldout4

Writes bench/results/eval_kodak_crops/ (summary.md, results.tsv, json/, rd.png, cache.jsonl);
an interrupted run resumes from the cache. Extra arguments go to `n2l eval`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from n2l.evaluate import main as eval_main

# Spread over the set: landscapes, faces, textures, flat areas.
KODAK_IDS = (1, 4, 5, 7, 13, 15, 20, 23)
# Never used to tune or screen the encoder (bench/RESULTS.md 8o): a check of the ladder on unseen images.
HELDOUT_IDS = (10, 17, 21, 11)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak-dir", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    parser.add_argument("--images", type=int, default=len(KODAK_IDS), help="use the first N of the images")
    parser.add_argument("--heldout", action="store_true", help=f"the held-out images {HELDOUT_IDS} instead of {KODAK_IDS}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_kodak_crops")
    args, rest = parser.parse_known_args(argv)
    ids = HELDOUT_IDS if args.heldout else KODAK_IDS
    paths = [args.kodak_dir / f"kodim{i:02d}.png" for i in ids[: args.images]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"Kodak images not found: {', '.join(map(str, missing))} (use --kodak-dir)", file=sys.stderr)
        return 2
    return eval_main([*map(str, paths), "--crop", "256", "--device", "cpu", "-o", str(args.out), *rest])


if __name__ == "__main__":
    sys.exit(main())
