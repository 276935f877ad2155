"""Rate-distortion evaluation of n2l against classical codecs and published curves (`n2l eval`).

    n2l eval IMAGES... [--crop N] [--qualities Q...] [--iterations N] [--preset P]
             [--device D] [--jobs N] [--codecs jpeg,webp,avif,jxl,hevc] -o OUTDIR

The core, `evaluate`, takes the codecs as objects (see .codecs.Codec) so tests can inject
stand-ins; `run_eval` builds the real n2l adapter and the classical codecs from the CLI args.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..encoder import DEFAULT_MODE, MODES
from .anchors import default_anchor_dir, is_full_kodak, load_kodak_anchors
from .bdrate import BDWarning, bd_psnr, bd_rate
from .codecs import ALL_QUALITIES, CLASSICAL_CODECS, Codec, N2LCodec, classical_codecs, parse_codec_names
from .report import (
    REFERENCE,
    bd_tables,
    dataset_curve,
    plot_rd,
    published_bd_table,
    summary_markdown,
    write_bd_tsv,
    write_compressai_json,
    write_tsv,
)
from .runner import _jsonable, load_images, run_jobs

__all__ = ["BDWarning", "add_eval_arguments", "bd_psnr", "bd_rate", "evaluate", "main", "run_eval"]


def evaluate(
    image_paths: Sequence[str | Path],
    codecs: Sequence[Codec],
    outdir: str | Path,
    *,
    crop: int | None = None,
    quiet: bool = False,
    anchors_dir: str | Path | None = None,
    skipped_codecs: dict[str, str] | None = None,
    keep_bitstreams: Sequence[str] = (REFERENCE,),
    extra_info: dict[str, Any] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Measure every codec on every image, write the report files to `outdir`, return the results.

    The codec named "n2l" is the one BD-rates are computed for; the others are its anchors.
    `jobs` > 1 measures that many n2l points at a time in worker processes (see `run_jobs`).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    images = load_images(image_paths, crop)
    names = [im.name for im in images]
    rows = run_jobs(images, codecs, outdir, quiet=quiet, keep_bitstreams=keep_bitstreams, jobs=jobs)

    notes: list[str] = []
    msssim_notes = sorted({r["note"] for r in rows if r.get("note") and str(r["note"]).startswith("ms-ssim")})
    notes += [f"MS-SSIM is NaN: {n}" for n in msssim_notes]
    failed = [r for r in rows if str(r.get("note") or "").startswith("FAILED")]
    notes += [f"{r['codec']} q={r['quality']} on {r['image']}: {r['note']}" for r in failed]

    curves = {c.name: dataset_curve([r for r in rows if r["codec"] == c.name], names) for c in codecs}
    for name, cur in curves.items():
        if cur["incomplete_qualities"]:
            notes.append(f"{name}: qualities {cur['incomplete_qualities']} lack some images and are left "
                         "out of the dataset averages")
    per_image_bd, dataset_bd, bd_notes = bd_tables(rows, curves, names)
    notes += bd_notes

    published = None
    published_reason = ""
    if not is_full_kodak(names, crop):
        published_reason = ("the images are not the full uncropped Kodak set (kodim01..kodim24), so "
                            "published Kodak curves do not apply.")
    elif REFERENCE not in curves or len(curves[REFERENCE]["bpp"]) < 2:
        published_reason = "n2l has fewer than 2 complete rate points."
    else:
        anchors, anchor_notes = load_kodak_anchors(Path(anchors_dir) if anchors_dir else None)
        notes += anchor_notes
        if anchors:
            published, pub_notes = published_bd_table(curves[REFERENCE], anchors)
            notes += pub_notes
        else:
            published_reason = "; ".join(anchor_notes)
    anchors_for_plot = load_kodak_anchors(Path(anchors_dir) if anchors_dir else None)[0] if published else []

    info: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": len(images),
        "images": names,
        "image_files": [im.path for im in images],
        "image_sha256": {im.name: im.sha256 for im in images},
        "image_sizes": {im.name: [im.width, im.height] for im in images},
        "crop": crop,
        "codecs": {c.name: {"versions": c.versions, "settings": c.settings, "qualities": list(c.qualities),
                            "quality_label": getattr(c, "quality_label", "quality")} for c in codecs},
        "skipped_codecs": dict(skipped_codecs or {}),
        "published_anchors": str(anchors_dir or default_anchor_dir()) if published else None,
        "published_reason": published_reason,
        "platform": {"python": sys.version.split()[0], "machine": platform.machine(),
                     "system": platform.platform()},
        **(extra_info or {}),
    }

    write_tsv(rows, outdir / "results.tsv")
    jdir = outdir / "json"
    jdir.mkdir(exist_ok=True)
    for c in codecs:
        desc = (f"{c.name} on {len(images)} image(s){' (center ' + str(crop) + ' crop)' if crop else ''}; "
                f"psnr-rgb = mean per-image PSNR; measured by n2l eval; "
                f"{', '.join(f'{k} {v}' for k, v in c.versions.items())}")
        write_compressai_json(c.name, curves[c.name], desc,
                              {"source": "n2l eval (our measurement)", "settings": c.settings,
                               "versions": c.versions, "images": names, "crop": crop,
                               "averaging": "over images at the same quality setting"},
                              jdir / f"{c.name}.json")
    bd_doc = {"reference": REFERENCE, "dataset": dataset_bd, "per_image": per_image_bd,
              "published": published, "notes": notes}
    write_bd_tsv(per_image_bd, outdir / "bd_rate_per_image.tsv")
    (outdir / "bd_rate.json").write_text(json.dumps(_jsonable(bd_doc), indent=2) + "\n")
    (outdir / "run.json").write_text(json.dumps(_jsonable(info), indent=2) + "\n")
    title = f"{len(images)} image(s)" + (f", center {crop}x{crop}" if crop else "")
    try:
        plot_rd(curves, anchors_for_plot, outdir / "rd.png", title)
    except ImportError as e:  # matplotlib is in the `eval` extra
        notes.append(f"no RD plot: {e} (pip install 'n2l[eval]')")
    summary = summary_markdown(info, curves, dataset_bd, published, notes)
    (outdir / "summary.md").write_text(summary)
    return {"rows": rows, "curves": curves, "bd": bd_doc, "info": info, "summary": summary}


def _qualities(items: Sequence[str]) -> list[int]:
    """`0,2,4` or `0 2 4` or `0-8` -> sorted unique ints in 0..8."""
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    if not out or any(not 0 <= q <= 8 for q in out):
        raise argparse.ArgumentTypeError(f"qualities must be in 0..8, got {items}")
    return sorted(out)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `n2l eval` options."""
    parser.add_argument("images", nargs="+", help="image files (PNG, ...)")
    parser.add_argument("-o", "--output", "--outdir", dest="outdir", required=True,
                        help="output folder (results, report, resumable cache)")
    parser.add_argument("--crop", type=int, default=None, metavar="N", help="evaluate the center NxN crop")
    # Every level by default: BD-rate over a curve through every other level misses where it bends
    # (bench/RESULTS.md 8m); fewer levels make a quicker, rougher run.
    parser.add_argument("--qualities", nargs="+", default=list(ALL_QUALITIES), metavar="Q",
                        help="n2l qualities (0..8), e.g. '0 2 4' or '0,2,4' or '0-8' (default 0-8, every level)")
    parser.add_argument("--iterations", type=int, default=None, help="n2l training iterations (default: n2l's)")
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=MODES,
                        help=f"n2l mode: hybrid (transmitted coarse latents) or pure (generated latents); "
                             f"default {DEFAULT_MODE}")
    parser.add_argument("--preset", default=None, help="n2l model preset (default: n2l's choice per quality)")
    parser.add_argument("--lmbda", type=float, default=None, help="n2l rate-distortion lambda override")
    parser.add_argument("--seeds", type=int, default=1, help="n2l seeds tried per image (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="n2l's (first) noise seed: repeat a run with another to see the seed's noise (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for n2l encoding/decoding (default cpu)")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="n2l encodes side by side, each in its own process on 1/N of the cores (default 1)")
    parser.add_argument("--codecs", default="jpeg,webp,avif,jxl,hevc",
                        help="classical codecs: comma list of jpeg (=jpeg420+jpeg444), "
                             f"{', '.join(CLASSICAL_CODECS)}, all or none (default jpeg,webp,avif,jxl,hevc)")
    parser.add_argument("--no-n2l", action="store_true", help="only the classical codecs")
    parser.add_argument("--keep-bitstreams", action="store_true",
                        help="also write the classical codecs' files to OUTDIR/bitstreams (n2l's always are)")
    parser.add_argument("--anchors", default=None,
                        help="folder of published RD curves (default $N2L_RD_ANCHORS or ../shared/data/rd)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary on stdout")


def run_eval(args: argparse.Namespace) -> int:
    """`n2l eval`: build the codecs from `args`, run `evaluate`, print the summary. Returns an exit code."""
    try:
        names = parse_codec_names(args.codecs)
        qualities = _qualities(args.qualities)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"n2l eval: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"n2l eval: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.preset is not None:
        from ..model import PRESETS

        if args.preset not in PRESETS:
            print(f"n2l eval: unknown preset {args.preset!r}; choose from {sorted(PRESETS)}", file=sys.stderr)
            return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classical, skipped = classical_codecs(names)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    codecs: list[Codec] = []
    if not args.no_n2l:
        codecs.append(N2LCodec(qualities, mode=args.mode, preset=args.preset, iterations=args.iterations, lmbda=args.lmbda,
                               seeds=args.seeds, seed=args.seed, device=args.device))
    codecs += classical
    if not codecs:
        print("n2l eval: no codec to evaluate", file=sys.stderr)
        return 2
    keep = [c.name for c in codecs] if args.keep_bitstreams else [REFERENCE]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(args.images, codecs, args.outdir, crop=args.crop, quiet=args.quiet,
                          anchors_dir=args.anchors, skipped_codecs=skipped, keep_bitstreams=keep,
                          extra_info={"argv": sys.argv, "device": args.device, "jobs": args.jobs},
                          jobs=args.jobs)
    if not args.quiet:
        for message in dict.fromkeys(f"warning: {w.category.__name__}: {w.message}" for w in caught):
            print(message, file=sys.stderr)
        print(result["summary"])
        print(f"results written to {args.outdir}")
    failed = sum(1 for r in result["rows"] if str(r.get("note") or "").startswith("FAILED"))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m n2l.evaluate ...``."""
    parser = argparse.ArgumentParser(prog="n2l eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


