"""Aggregation, BD-rate tables and the files of an evaluation: TSV, CompressAI JSON, plot, summary."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .anchors import Anchor
from .bdrate import BDWarning, bd_psnr, bd_rate
from .runner import ROW_FIELDS, _jsonable

REFERENCE = "n2l"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_tsv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per image, codec and quality."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(ROW_FIELDS)
        for r in rows:
            w.writerow(["" if r.get(k) is None else (f"{r[k]:.10g}" if isinstance(r.get(k), float) else r[k])
                        for k in ROW_FIELDS])


_NUMERIC_FIELDS = ("quality", "width", "height", "bytes", "bpp", "psnr", "mse", "ms_ssim", "enc_time_s",
                   "dec_time_s", "macs_per_pixel")


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.tsv written by `write_tsv`, numbers as floats (empty: NaN)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        for k in _NUMERIC_FIELDS:
            r[k] = float(r[k]) if r.get(k) else math.nan
    return rows


def write_bd_tsv(per_image: Sequence[dict[str, Any]], path: Path) -> None:
    """Per-image BD-rate / BD-PSNR of n2l against each codec."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["image", "anchor", "bd_rate_pct", "bd_psnr_db", "note"])
        for d in per_image:
            w.writerow([d["image"], d["anchor"], f"{d['bd_rate_pct']:.4f}", f"{d['bd_psnr_db']:.4f}", d["note"]])


def dataset_curve(rows: Sequence[dict[str, Any]], image_names: Sequence[str]) -> dict[str, list]:
    """Averages over images at each quality setting; only settings measured on every image.

    psnr: mean of per-image PSNR (CompressAI / C3 convention); psnr_of_mean_mse: PSNR of the
    mean MSE (Cool-chic convention); bpp and the rest: plain means.
    """
    by_q: dict[float, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if _finite(r.get("bpp")) and _finite(r.get("mse")):
            by_q.setdefault(r["quality"], {})[r["image"]] = r
    out: dict[str, list] = {k: [] for k in ("quality", "bpp", "psnr", "psnr_of_mean_mse", "ms_ssim",
                                            "enc_time_s", "dec_time_s", "macs_per_pixel")}
    out["incomplete_qualities"] = []
    for q in sorted(by_q):
        pts = by_q[q]
        if any(n not in pts for n in image_names):
            out["incomplete_qualities"].append(q)
            continue
        sel = [pts[n] for n in image_names]

        def mean(k: str, sel: list[dict[str, Any]] = sel) -> float:
            vals = [float(r[k]) if r.get(k) is not None else math.nan for r in sel]
            return float(np.mean(vals)) if vals else math.nan

        mse = mean("mse")
        out["quality"].append(q)
        out["bpp"].append(mean("bpp"))
        out["psnr"].append(mean("psnr"))
        out["psnr_of_mean_mse"].append(10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf)
        for k in ("ms_ssim", "enc_time_s", "dec_time_s", "macs_per_pixel"):
            out[k].append(mean(k))
    order = np.argsort(out["bpp"], kind="stable")
    for k in ("quality", "bpp", "psnr", "psnr_of_mean_mse", "ms_ssim", "enc_time_s", "dec_time_s",
              "macs_per_pixel"):
        out[k] = [out[k][i] for i in order]
    return out


def _bd(anchor_r, anchor_p, test_r, test_p, notes: list[str], what: str, emit: bool = True
        ) -> tuple[float, float]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BDWarning)
        r = bd_rate(anchor_r, anchor_p, test_r, test_p)
        p = bd_psnr(anchor_r, anchor_p, test_r, test_p)
    for w in caught:
        msg = f"{what}: {w.message}"
        notes.append(msg)
        if emit:
            warnings.warn(msg, BDWarning, stacklevel=3)
    return r, p


def _overlap(ref: Sequence[float], other: Sequence[float]) -> float:
    """Fraction of the PSNR range of `ref` that `other` also covers (where BD-rate is measured)."""
    r = [x for x in ref if _finite(x)]
    o = [x for x in other if _finite(x)]
    if len(r) < 2 or len(o) < 2 or max(r) <= min(r):
        return math.nan
    return max(0.0, min(max(r), max(o)) - max(min(r), min(o))) / (max(r) - min(r))


def bd_tables(
    rows: Sequence[dict[str, Any]], curves: dict[str, dict[str, list]], image_names: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Per-image and dataset BD-rate/BD-PSNR of n2l against every other codec, and notes."""
    notes: list[str] = []
    per_image: list[dict[str, Any]] = []
    dataset: list[dict[str, Any]] = []
    if REFERENCE not in curves:
        return per_image, dataset, ["no n2l results: BD-rates not computed"]

    def pts(codec: str, image: str) -> tuple[list[float], list[float]]:
        sel = [r for r in rows if r["codec"] == codec and r["image"] == image and _finite(r.get("bpp"))
               and _finite(r.get("psnr"))]
        return [r["bpp"] for r in sel], [r["psnr"] for r in sel]

    ref = curves[REFERENCE]
    for codec, cur in curves.items():
        if codec == REFERENCE:
            continue
        img_rates = []
        for name in image_names:
            tr, tp = pts(REFERENCE, name)
            ar, ap = pts(codec, name)
            img_notes: list[str] = []
            r, p = _bd(ar, ap, tr, tp, img_notes, f"n2l vs {codec} on {name}", emit=False)
            per_image.append({"image": name, "anchor": codec, "bd_rate_pct": r, "bd_psnr_db": p,
                              "note": "; ".join(img_notes)})
            img_rates.append(r)
        r_mean, p_mean = _bd(cur["bpp"], cur["psnr"], ref["bpp"], ref["psnr"], notes,
                             f"n2l vs {codec} (dataset, mean PSNR)")
        r_mse, p_mse = _bd(cur["bpp"], cur["psnr_of_mean_mse"], ref["bpp"], ref["psnr_of_mean_mse"], notes,
                           f"n2l vs {codec} (dataset, PSNR of mean MSE)")
        finite = [x for x in img_rates if math.isfinite(x)]
        if len(finite) < len(img_rates):
            notes.append(f"n2l vs {codec}: per-image BD-rate undefined on {len(img_rates) - len(finite)} of "
                         f"{len(img_rates)} image(s) (curves too short or not overlapping; see bd_rate.json)")
        dataset.append({
            "anchor": codec,
            "bd_rate_pct_mean_psnr": r_mean,
            "bd_psnr_db_mean_psnr": p_mean,
            "bd_rate_pct_psnr_of_mean_mse": r_mse,
            "bd_psnr_db_psnr_of_mean_mse": p_mse,
            "mean_of_per_image_bd_rate_pct": float(np.mean(finite)) if finite else math.nan,
            "images_with_bd_rate": len(finite),
            "psnr_overlap_fraction": _overlap(ref["psnr"], cur["psnr"]),
            "anchor_bpp_range": [min(cur["bpp"], default=math.nan), max(cur["bpp"], default=math.nan)],
            "anchor_psnr_range": [min(cur["psnr"], default=math.nan), max(cur["psnr"], default=math.nan)],
        })
    return per_image, dataset, notes


def published_bd_table(n2l_curve: dict[str, list], anchors: Sequence[Anchor]) -> tuple[list[dict], list[str]]:
    """BD-rate of n2l's dataset curve against published curves, each in that curve's own convention."""
    notes: list[str] = []
    table = []
    for a in anchors:
        key = "psnr_of_mean_mse" if a.convention == "PSNR of mean MSE" else "psnr"
        r, p = _bd(a.bpp, a.psnr, n2l_curve["bpp"], n2l_curve[key], notes, f"n2l vs published {a.name}")
        table.append({"anchor": a.name, "convention": a.convention, "source": a.source, "bd_rate_pct": r,
                      "bd_psnr_db": p, "bpp_range": [min(a.bpp), max(a.bpp)],
                      "psnr_range": [min(a.psnr), max(a.psnr)]})
    return table, notes


def write_compressai_json(codec: str, curve: dict[str, list], description: str, meta: dict,
                          path: Path) -> None:
    """CompressAI results schema: {"name", "description", "results": {"bpp", "psnr-rgb", ...}} + meta."""
    doc = {
        "name": codec,
        "description": description,
        "meta": meta,
        "results": {
            "bpp": curve["bpp"],
            "psnr-rgb": curve["psnr"],
            "ms-ssim-rgb": curve["ms_ssim"],
            "encoding_time": curve["enc_time_s"],
            "decoding_time": curve["dec_time_s"],
            "psnr-rgb-of-mean-mse": curve["psnr_of_mean_mse"],
            "quality": curve["quality"],
            "macs_per_pixel": curve["macs_per_pixel"],
        },
    }
    path.write_text(json.dumps(_jsonable(doc), indent=2) + "\n")


def plot_rd(curves: dict[str, dict[str, list]], anchors: Sequence[Anchor], path: Path, title: str) -> None:
    """PSNR vs bpp (and MS-SSIM in dB when measured) for every codec, n2l highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_msssim = any(any(_finite(v) for v in c["ms_ssim"]) for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_msssim else 1, figsize=(13 if has_msssim else 7.5, 5.5), squeeze=False)
    ax = axes[0][0]
    for name, c in curves.items():
        if not c["bpp"]:
            continue
        hi = name == REFERENCE
        ax.plot(c["bpp"], c["psnr"], marker="o" if hi else ".", lw=2.8 if hi else 1.2,
                color="crimson" if hi else None, zorder=10 if hi else 2, label=name, ms=6 if hi else 4)
    for a in anchors:
        if a.convention != "mean per-image PSNR":
            continue
        ax.plot(a.bpp, a.psnr, ls="--", lw=1, marker="x", ms=3, alpha=0.8, label=f"{a.name} (published)")
    ax.set_xlabel("bpp")
    ax.set_ylabel("PSNR RGB (dB, mean over images)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if has_msssim:
        ax2 = axes[0][1]
        for name, c in curves.items():
            db = [-10 * math.log10(1 - v) if _finite(v) and v < 1 else math.nan for v in c["ms_ssim"]]
            hi = name == REFERENCE
            ax2.plot(c["bpp"], db, marker="o" if hi else ".", lw=2.8 if hi else 1.2,
                     color="crimson" if hi else None, zorder=10 if hi else 2, label=name)
        ax2.set_xlabel("bpp")
        ax2.set_ylabel("MS-SSIM (dB, -10 log10(1 - MS-SSIM))")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x: Any, fmt: str = ".2f", unit: str = "") -> str:
    return format(x, fmt) + unit if _finite(x) else ("inf" if x == math.inf else "n/a")


def summary_markdown(info: dict[str, Any], curves: dict[str, dict[str, list]], dataset_bd: list[dict],
                     published: list[dict] | None, notes: Sequence[str]) -> str:
    """The human-readable report."""
    L = ["# n2l rate-distortion evaluation", ""]
    L.append(f"- images: {info['n_images']} ({', '.join(info['images'][:8])}"
             f"{', ...' if info['n_images'] > 8 else ''}); crop: "
             f"{'center ' + str(info['crop']) + 'x' + str(info['crop']) if info['crop'] else 'none'}")
    L.append(f"- n2l settings: {json.dumps(info['codecs'].get(REFERENCE, {}).get('settings', {}))}")
    L.append("- bpp = 8 x bytes / (W x H) of the real bitstream file; PSNR on 8-bit RGB, MSE over 3 channels;"
             " MS-SSIM from pytorch-msssim (data_range 255).")
    L.append("- Dataset averages are taken over images at the same quality index (n2l) or the same quality "
             "setting (classical codecs). **PSNR (mean)** = mean of per-image PSNR (CompressAI/C3 convention); "
             "**PSNR (mean MSE)** = PSNR of the mean MSE (Cool-chic convention).")
    L.append("- BD-rate: Bjøntegaard, pchip of log-rate vs PSNR over the common PSNR range; negative = n2l "
             "needs fewer bits than the anchor. BD-PSNR: positive = n2l better.")
    L.append("")
    if REFERENCE in curves:
        c = curves[REFERENCE]
        L += ["## n2l dataset averages", "",
              "| quality | bpp | PSNR (mean) dB | PSNR (mean MSE) dB | MS-SSIM | enc s/img | dec s/img | MAC/px |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i in range(len(c["bpp"])):
            L.append(f"| {c['quality'][i]} | {_f(c['bpp'][i], '.4f')} | {_f(c['psnr'][i])} | "
                     f"{_f(c['psnr_of_mean_mse'][i])} | {_f(c['ms_ssim'][i], '.4f')} | "
                     f"{_f(c['enc_time_s'][i], '.2f')} | {_f(c['dec_time_s'][i], '.3f')} | "
                     f"{_f(c['macs_per_pixel'][i], '.0f')} |")
        L.append("")
    if dataset_bd:
        L += ["## BD-rate of n2l against codecs measured in this run", "",
              ("| anchor | BD-rate (mean PSNR) | BD-PSNR (mean PSNR) | BD-rate (PSNR of mean MSE) | "
               "mean of per-image BD-rate | images with BD | n2l PSNR range covered | anchor bpp range |"),
              "|---|---:|---:|---:|---:|---:|---:|---|"]
        for d in dataset_bd:
            lo, hi = d["anchor_bpp_range"]
            L.append(f"| {d['anchor']} | {_f(d['bd_rate_pct_mean_psnr'], '+.1f', '%')} | "
                     f"{_f(d['bd_psnr_db_mean_psnr'], '+.2f', ' dB')} | "
                     f"{_f(d['bd_rate_pct_psnr_of_mean_mse'], '+.1f', '%')} | "
                     f"{_f(d['mean_of_per_image_bd_rate_pct'], '+.1f', '%')} | {d['images_with_bd_rate']}/{info['n_images']} | "
                     f"{_f(100 * d['psnr_overlap_fraction'], '.0f', '%')} | "
                     f"{_f(lo, '.3f')}-{_f(hi, '.3f')} |")
        L.append("")
    L.append("## Published anchors (Kodak)")
    L.append("")
    if published is None:
        L.append(f"Not compared: {info.get('published_reason', '')}")
    elif not published:
        L.append("No published anchor files found.")
    else:
        L.append("These are **published numbers** copied from other projects' repositories, not measured in "
                 "this run. Each comparison uses the anchor's own PSNR-averaging convention (n2l's curve is "
                 "averaged the same way).")
        L += ["", "| anchor | convention | BD-rate | BD-PSNR | anchor bpp range | source |",
              "|---|---|---:|---:|---|---|"]
        for d in published:
            L.append(f"| {d['anchor']} | {d['convention']} | {_f(d['bd_rate_pct'], '+.1f', '%')} | "
                     f"{_f(d['bd_psnr_db'], '+.2f', ' dB')} | {_f(d['bpp_range'][0], '.3f')}-"
                     f"{_f(d['bpp_range'][1], '.3f')} | {d['source']} |")
    L.append("")
    L += ["## Codecs, versions and settings", "", "| codec | points | versions | settings |", "|---|---:|---|---|"]
    for name, ci in info["codecs"].items():
        L.append(f"| {name} | {len(curves.get(name, {}).get('bpp', []))} | "
                 f"{', '.join(f'{k} {v}' for k, v in ci['versions'].items())} | "
                 f"{json.dumps(ci['settings'])} (sweep over {ci['quality_label']}: {ci['qualities']}) |")
    for name, why in info.get("skipped_codecs", {}).items():
        L.append(f"| {name} | skipped | | {why} |")
    L.append("")
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    L += ["## Files", "", "- `results.tsv`: one row per image, codec and quality",
          "- `json/<codec>.json`: dataset averages, CompressAI results schema",
          "- `bd_rate.json`: per-image and dataset BD-rates; `bd_rate_per_image.tsv`: the per-image ones", "- `rd.png`: RD plot",
          "- `run.json`: versions, settings, images", "- `cache.jsonl`: resumable measurement cache", ""]
    return "\n".join(L)
