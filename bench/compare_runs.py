"""BD-rate between the n2l curves of two `n2l eval` runs on the same images (e.g. pure vs hybrid),
or, with --pool, of n2l over several runs pooled against the other codecs of those runs.

    python bench/compare_runs.py bench/results/eval_kodak_crops8 bench/results/eval_kodak_crops8_hybrid
    python bench/compare_runs.py --pool bench/results/eval_kodak_crops8_hybrid_dbslope \\
        bench/results/eval_kodak_crops8_hybrid_seed1

Two runs: prints, for both PSNR-averaging conventions, the BD-rate and BD-PSNR of the second run's
n2l curve against the first's (negative BD-rate = the second run needs fewer bits).
--pool: each image of each run (e.g. evals with different noise seeds) counts as an image of its
own, for n2l and for every other codec; prints n2l's dataset BD-rates against each codec.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from n2l.evaluate.bdrate import bd_psnr, bd_rate
from n2l.evaluate.report import REFERENCE, bd_tables, dataset_curve, read_tsv


def n2l_curve(run: Path) -> tuple[dict[str, list], set[str]]:
    rows = [r for r in read_tsv(run / "results.tsv") if r["codec"] == REFERENCE]
    images = {r["image"] for r in rows}
    return dataset_curve(rows, sorted(images)), images


def compare(anchor: Path, test: Path) -> None:
    (a, a_images), (t, t_images) = n2l_curve(anchor), n2l_curve(test)
    if a_images != t_images:
        raise SystemExit(f"the runs cover different images: {sorted(a_images ^ t_images)}")
    for key in ("psnr", "psnr_of_mean_mse"):
        rate = bd_rate(a["bpp"], a[key], t["bpp"], t[key])
        gain = bd_psnr(a["bpp"], a[key], t["bpp"], t[key])
        print(f"{key}: BD-rate {rate:+.1f}%, BD-PSNR {gain:+.2f} dB ({len(a_images)} images)")


def pool(runs: list[Path]) -> None:
    rows = [dict(r, image=f"{r['image']}@{k}") for k, run in enumerate(runs) for r in read_tsv(run / "results.tsv")]
    names = sorted({r["image"] for r in rows if r["codec"] == REFERENCE})
    curves = {c: dataset_curve([r for r in rows if r["codec"] == c], names) for c in sorted({r["codec"] for r in rows})}
    _, dataset, notes = bd_tables(rows, curves, names)
    print(f"n2l over {len(runs)} runs pooled ({len(names)} image-run pairs): BD-rate by the mean PSNR / "
          "by the PSNR of the mean MSE / mean of per-image BD-rates")
    for d in dataset:
        print(f"  vs {d['anchor']}: {d['bd_rate_pct_mean_psnr']:+.1f}% / {d['bd_rate_pct_psnr_of_mean_mse']:+.1f}% / "
              f"{d['mean_of_per_image_bd_rate_pct']:+.1f}% ({d['images_with_bd_rate']} pairs)")
    for note in notes:
        print("  note:", note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="eval output folders: the anchor run and the run compared with it, or the runs to pool")
    parser.add_argument("--pool", action="store_true", help="pool the runs and compare n2l with their other codecs")
    args = parser.parse_args()
    if args.pool:
        pool(args.runs)
    elif len(args.runs) == 2:
        compare(*args.runs)
    else:
        parser.error("give two runs, or --pool and one or more")


if __name__ == "__main__":
    main()
