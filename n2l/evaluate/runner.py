"""Running an evaluation: images x codecs x qualities, measured, cached in OUTDIR/cache.jsonl."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .codecs import Codec

CACHE_NAME = "cache.jsonl"
MS_SSIM_MIN_SIDE = 161  # pytorch-msssim, win 11 and 5 scales: min side > (11 - 1) * 2**4
ROW_FIELDS = (
    "image", "codec", "quality", "width", "height", "bytes", "bpp", "psnr", "mse", "ms_ssim",
    "enc_time_s", "dec_time_s", "macs_per_pixel", "seed", "device", "note", "image_sha256", "key",
)


@dataclass
class EvalImage:
    """One image as evaluated (after the optional center crop)."""

    name: str
    path: str
    pixels: np.ndarray  # uint8 [H, W, 3]
    sha256: str
    crop: int | None
    source_size: tuple[int, int]  # (width, height) before cropping

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def center_crop(img: np.ndarray, n: int) -> np.ndarray:
    """The center n x n crop (n clipped to the image size)."""
    h, w = img.shape[:2]
    ch, cw = min(n, h), min(n, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[top : top + ch, left : left + cw])


def load_images(paths: Sequence[str | Path], crop: int | None = None) -> list[EvalImage]:
    """Read images as RGB uint8, center-crop them, and hash the pixels that are evaluated."""
    from PIL import Image

    images: list[EvalImage] = []
    seen: dict[str, int] = {}
    for p in paths:
        p = Path(p)
        with Image.open(p) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)  # writable copy
        src = (int(arr.shape[1]), int(arr.shape[0]))
        if crop:
            arr = center_crop(arr, crop)
        name = p.stem
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        digest = hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()
        images.append(EvalImage(name, str(p), arr, digest, crop, src))
    return images


def psnr_mse(ref: np.ndarray, rec: np.ndarray) -> tuple[float, float]:
    """PSNR (dB, peak 255) and MSE over all pixels and the 3 channels of two uint8 images."""
    mse = float(np.mean((ref.astype(np.float64) - rec.astype(np.float64)) ** 2))
    return (10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf), mse


def ms_ssim_rgb(ref: np.ndarray, rec: np.ndarray) -> tuple[float, str]:
    """MS-SSIM (pytorch-msssim, data_range 255) of two uint8 RGB images, or (NaN, reason)."""
    h, w = ref.shape[:2]
    if min(h, w) < MS_SSIM_MIN_SIDE:
        return math.nan, f"ms-ssim needs a side >= {MS_SSIM_MIN_SIDE} px (image is {w}x{h})"
    try:
        import torch
        from pytorch_msssim import ms_ssim
    except ImportError as e:
        return math.nan, f"ms-ssim unavailable ({e})"

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]

    with torch.no_grad():
        return float(ms_ssim(t(ref), t(rec), data_range=255, size_average=True)), ""


def job_key(image_sha: str, codec: Codec, quality: float) -> str:
    """Cache key: image content, codec name, quality and the codec's result-changing settings."""
    blob = json.dumps(
        {"image": image_sha, "codec": codec.name, "quality": quality, "settings": codec.settings},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ResultCache:
    """Append-only JSONL of finished measurements, keyed by `job_key`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            with path.open() as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption
                        continue
                    self.records[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        with self.path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _from_cache(rec: dict[str, Any]) -> dict[str, Any]:
    row = dict(rec)
    for k in ("psnr", "mse", "ms_ssim", "bpp", "enc_time_s", "dec_time_s", "macs_per_pixel"):
        if row.get(k) is None:
            row[k] = math.inf if (k == "psnr" and row.get("mse") == 0) else math.nan
    return row


def _quality_tag(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else f"{q:g}"


def measure(
    image: EvalImage, codec: Codec, quality: float, bitstream_dir: Path | None
) -> dict[str, Any]:
    """Encode, (write and re-read the bitstream), decode and measure one point."""
    t0 = time.perf_counter()
    buf = codec.encode(image.pixels, quality)
    enc_time = time.perf_counter() - t0
    if bitstream_dir is not None:
        bitstream_dir.mkdir(parents=True, exist_ok=True)
        path = bitstream_dir / f"{image.name}_q{_quality_tag(quality)}.{codec.name}"
        path.write_bytes(buf)
        buf = path.read_bytes()  # what is measured and decoded is what is on disk
        n_bytes = path.stat().st_size
    else:
        n_bytes = len(buf)
    t0 = time.perf_counter()
    rec = codec.decode(buf)
    dec_time = time.perf_counter() - t0
    if rec.shape != image.pixels.shape:
        raise ValueError(f"decoded shape {rec.shape} != input shape {image.pixels.shape}")
    psnr, mse = psnr_mse(image.pixels, rec)
    msssim, note = ms_ssim_rgb(image.pixels, rec)
    row: dict[str, Any] = {
        "image": image.name,
        "codec": codec.name,
        "quality": quality,
        "width": image.width,
        "height": image.height,
        "bytes": n_bytes,
        "bpp": 8.0 * n_bytes / (image.width * image.height),
        "psnr": psnr,
        "mse": mse,
        "ms_ssim": msssim,
        "enc_time_s": enc_time,
        "dec_time_s": dec_time,
        "macs_per_pixel": math.nan,
        "seed": None,
        "device": "cpu",
        "note": note,
        "image_sha256": image.sha256,
    }
    row.update(codec.info(buf, image.height, image.width))
    return row


def _worker_threads(threads: int) -> None:
    """Worker process set-up: its share of the cores (n2l's streams do not depend on it)."""
    import torch

    torch.set_num_threads(threads)


def run_jobs(
    images: Sequence[EvalImage],
    codecs: Sequence[Codec],
    outdir: Path,
    *,
    quiet: bool = False,
    keep_bitstreams: Sequence[str] = ("n2l",),
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Measure every (image, codec, quality), reusing OUTDIR/cache.jsonl; one row per point.

    Failures become rows with NaN metrics and the error in `note` (they are not cached, so a
    rerun retries them). Bitstreams of codecs named in `keep_bitstreams` go to OUTDIR/bitstreams.
    With `jobs` > 1, n2l's points (minutes each; the classical codecs take well under a second
    and run first, here) are measured `jobs` at a time in worker processes, each on its share of the
    cores, so their encode times are those of encodes side by side.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    outdir.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(outdir / CACHE_NAME)
    # Fast classical codecs first, n2l (slow to encode) last: partial runs already hold the anchors.
    ordered = sorted(codecs, key=lambda c: c.name == "n2l")
    points = [(img, c, q) for c in ordered for img in images for q in c.qualities]
    rows: list[dict[str, Any]] = [{} for _ in points]
    bar = tqdm(total=len(points), disable=quiet, desc="eval", unit="pt", file=sys.stderr, dynamic_ncols=True)
    n_cached = 0
    pending: list[tuple[int, str, Path | None]] = []  # (index, cache key, bitstream folder)
    for i, (img, codec, q) in enumerate(points):
        key = job_key(img.sha256, codec, q)
        cached = cache.get(key)
        if cached is not None:
            rows[i] = _from_cache(cached)
            n_cached += 1
            bar.update(1)
        else:
            pending.append((i, key, outdir / "bitstreams" if codec.name in keep_bitstreams else None))

    def finish(i: int, key: str, measured: Callable[[], dict[str, Any]]) -> None:
        img, codec, q = points[i]
        try:
            row = measured()
            row["key"] = key
            cache.add(row)
        except Exception as e:  # noqa: BLE001 - one failed point must not end the run
            row = {f: math.nan for f in ROW_FIELDS}
            row.update(image=img.name, codec=codec.name, quality=q, width=img.width, height=img.height,
                       bytes=None, seed=None, device=None, image_sha256=img.sha256, key=key,
                       note=f"FAILED: {type(e).__name__}: {e}")
            bar.write(f"warning: {codec.name} q={q} on {img.name} failed: {e}")
        rows[i] = row
        bar.update(1)

    in_workers = [p for p in pending if jobs > 1 and points[p[0]][1].name == "n2l"]
    for i, key, bdir in (p for p in pending if p not in in_workers):
        img, codec, q = points[i]
        bar.set_postfix_str(f"{codec.name} q={_quality_tag(q)} {img.name}", refresh=False)
        finish(i, key, functools.partial(measure, img, codec, q, bdir))
    if in_workers:
        # The cores this process may run on (a container's share, not the host's count).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // jobs)
        bar.set_postfix_str(f"n2l, {jobs} at a time", refresh=False)
        # spawn: a fork of a process whose OpenMP threads already ran can hang.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(measure, *points[i], bdir): (i, key) for i, key, bdir in in_workers}
            for future in as_completed(futures):
                finish(*futures[future], future.result)
    bar.close()
    if not quiet and n_cached:
        print(f"{n_cached}/{len(points)} points reused from {cache.path}", file=sys.stderr)
    return rows
