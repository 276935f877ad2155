"""Published Kodak rate-distortion curves (not our measurements) from shared/data/rd.

The folder is found at ``../shared/data/rd`` next to the repository (or via the
N2L_RD_ANCHORS environment variable / --anchors); a user's clone usually lacks it, in which
case `load_kodak_anchors` returns no curves and says why.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

KODAK_NAMES = tuple(f"kodim{i:02d}" for i in range(1, 25))


@dataclass
class Anchor:
    """One published dataset-average curve."""

    name: str
    bpp: list[float]
    psnr: list[float]  # dataset average in the `convention` below
    convention: str  # "mean per-image PSNR" or "PSNR of mean MSE"
    source: str  # file relative to the rd folder, plus where it came from
    extra: dict = field(default_factory=dict)


def default_anchor_dir() -> Path:
    """``$N2L_RD_ANCHORS``, else ``<repo>/../shared/data/rd``."""
    env = os.environ.get("N2L_RD_ANCHORS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rd"


def is_full_kodak(names: list[str], crop: int | None) -> bool:
    """True when the images are exactly kodim01..kodim24, uncropped."""
    return not crop and sorted(names) == list(KODAK_NAMES)


def _compressai(rd: Path, rel: str, name: str) -> Anchor:
    d = json.loads((rd / rel).read_text())
    return Anchor(name, d["results"]["bpp"], d["results"]["psnr-rgb"], "mean per-image PSNR",
                  f"{rel} (CompressAI results/image, '{d.get('name')}': {d.get('description')})")


def _c3(rd: Path, key: str, name: str) -> Anchor:
    d = json.loads((rd / "c3" / "kodak.json").read_text())["RESULTS"][key]
    return Anchor(name, d["bpp"], d["psnr"], "mean per-image PSNR",
                  f"c3/kodak.json['{key}'] (C3 repository baselines/kodak.py; {d['meta'].get('reference')})",
                  {"macs_per_pixel": d["meta"].get("macs_per_pixel")})


def coolchic_curves(tsv: Path) -> dict[str, list[float]]:
    """Per-lambda Kodak averages from Cool-chic's per-image TSV: bpp, mean PSNR, PSNR of mean MSE."""
    by_lmbda: dict[float, list[tuple[float, float]]] = {}
    with tsv.open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            by_lmbda.setdefault(float(row["lmbda"]), []).append((float(row["rate_bpp"]), float(row["psnr_db"])))
    out: dict[str, list[float]] = {"lmbda": [], "bpp": [], "psnr_mean": [], "psnr_of_mean_mse": [], "n": []}
    for lm in sorted(by_lmbda, reverse=True):  # low rate first
        pts = by_lmbda[lm]
        mse = [255.0**2 * 10 ** (-p / 10) for _, p in pts]
        out["lmbda"].append(lm)
        out["bpp"].append(sum(b for b, _ in pts) / len(pts))
        out["psnr_mean"].append(sum(p for _, p in pts) / len(pts))
        out["psnr_of_mean_mse"].append(10 * math.log10(255.0**2 / (sum(mse) / len(mse))))
        out["n"].append(len(pts))
    return out


def load_kodak_anchors(rd: Path | None = None) -> tuple[list[Anchor], list[str]]:
    """The published Kodak anchors that exist under `rd`, and notes on those that do not."""
    rd = default_anchor_dir() if rd is None else Path(rd)
    if not rd.is_dir():
        return [], [f"published anchors not found at {rd} (they live outside the repository); skipped"]
    anchors: list[Anchor] = []
    notes: list[str] = []
    loaders = [
        ("VTM", lambda: _compressai(rd, "compressai/kodak/vtm.json", "VTM (VVC intra)")),
        ("HEVC (HM)", lambda: _compressai(rd, "compressai/kodak/hm.json", "HEVC (HM)")),
        ("BPG", lambda: _compressai(rd, "compressai/kodak/bpg_444_x265_ycbcr.json", "BPG 4:4:4 (HEVC x265)")),
        ("Cheng 2020", lambda: _compressai(
            rd, "compressai/8bit-decoded/kodak/compressai-cheng2020-anchor_mse_ans_cuda.json",
            "Cheng 2020 anchor (CompressAI, 8-bit)")),
        ("ELIC", lambda: _compressai(rd, "compressai/kodak/paper-elic2022_mse.json", "ELIC (paper)")),
        ("C3", lambda: _c3(rd, "C3", "C3")),
    ]
    for label, load in loaders:
        try:
            anchors.append(load())
        except (OSError, KeyError, ValueError) as e:
            notes.append(f"published anchor {label} unavailable: {type(e).__name__}: {e}")
    tsv = rd / "coolchic" / "v5.0" / "image-kodak.tsv"
    try:
        cc = coolchic_curves(tsv)
        src = "coolchic/v5.0/image-kodak.tsv (Cool-chic 5.0.1, per-image TSV, averaged here)"
        anchors.append(Anchor("Cool-chic 5.0.1", cc["bpp"], cc["psnr_mean"], "mean per-image PSNR", src,
                              {"lmbda": cc["lmbda"]}))
        anchors.append(Anchor("Cool-chic 5.0.1", cc["bpp"], cc["psnr_of_mean_mse"], "PSNR of mean MSE", src,
                              {"lmbda": cc["lmbda"]}))
    except (OSError, KeyError, ValueError) as e:
        notes.append(f"published anchor Cool-chic 5.0.1 unavailable: {type(e).__name__}: {e}")
    return anchors, notes
