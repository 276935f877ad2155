"""Decode latency of the Triton GPU path vs the torch reference on the same GPU, side by side.

    python bench/bench_triton.py                      # table + bench/results/triton_<gpu>.json
    python bench/bench_triton.py --sizes 768x512 --presets default --no-compile
    python bench/bench_triton.py --sweep              # also try a few Triton tile shapes
    pytest bench/bench_triton.py --benchmark-enable   # pytest-benchmark variant

Every path decodes seed -> uint8 [H, W, C] pixels on the GPU, noise generation included:
``torch`` is `to_uint8(model(model.noise(...)))` in eager mode (what
`n2l.decoder.reconstruct(backend="torch")` runs, minus the copy to the host), ``compiled`` the
same function through torch.compile, ``triton`` is `n2l.kernels.decode_triton`. Sizes are
width x height. Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed). TF32 is
disabled so the reference computes in exact fp32, as the Triton path does.

Throughput is 2 x MACs / time, with MACs = ModelConfig.macs_per_pixel(H, W) x H x W (every
convolution tap, bilinear sample and reparameterization; the Philox noise and activations are
not counted). The physical limit is that many FMAs at the GPU's FP32 peak (H100 SXM: 67
TFLOP/s); set N2L_FP32_PEAK_TFLOPS for other cards. Needs a CUDA GPU; skips otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import pytest
import torch

# The reference runs in exact fp32 like the Triton path (cuDNN would otherwise use TF32 on
# Ampere and later: faster, but ~1e-3 relative error, not the reference arithmetic).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

from common import bench_model

from n2l.model import PRESETS, N2LModel, to_uint8

SIZES = ((768, 512), (2048, 1365))  # width x height
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 1234

# Dense FP32 peak (TFLOP/s, 2 per FMA) at boost clock, by device-name substring, most specific
# first. NVIDIA datasheets.
FP32_PEAK_TFLOPS = (
    ("H200", 67.0),
    ("H100 PCIe", 51.2),
    ("H100 NVL", 60.0),
    ("H100", 67.0),  # SXM5
    ("GH200", 67.0),
    ("A100", 19.5),
    ("L40S", 91.6),
    ("L4", 30.3),
    ("A10", 31.2),
    ("RTX 4090", 82.6),
)


def gpu_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: the Triton decode benchmark needs one (the kernels' CPU interpreter is for tests only)"
    from n2l import kernels

    reason = kernels.unavailable_reason()
    return f"Triton backend unavailable: {reason}" if reason else None


def fp32_peak_tflops(name: str) -> tuple[float | None, str]:
    """(peak, where it came from) for a device name."""
    env = os.environ.get("N2L_FP32_PEAK_TFLOPS")
    if env:
        return float(env), "N2L_FP32_PEAK_TFLOPS"
    for key, peak in FP32_PEAK_TFLOPS:
        if key in name:
            return peak, f"datasheet ({key})"
    return None, "unknown device: set N2L_FP32_PEAK_TFLOPS"


def torch_decoder(model: N2LModel, height: int, width: int, compiled: bool = False):
    """Zero-argument callable decoding SEED with the torch reference (optionally torch.compile'd)."""

    def decode() -> torch.Tensor:
        return to_uint8(model(model.noise(SEED, height, width)))

    fn = torch.compile(decode, fullgraph=False, dynamic=False) if compiled else decode

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return fn()

    return run


def triton_decoder(model: N2LModel, height: int, width: int, tiles=None):
    from n2l.kernels import _triton

    return lambda: _triton.decode_triton(model, SEED, height, width, tiles=tiles)


def time_ms(fn) -> float:
    """Median milliseconds per call (CUDA events around each call, L2 flushed between calls)."""
    import triton.testing

    fn()  # compile / autotune / allocate outside the timing
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got.int() - want.int()).abs()
    return {
        "max_level_diff": int(diff.max().item()),
        "mismatch_pixel_rate": float((diff > 0).any(dim=-1).float().mean().item()),
    }


SWEEP = (  # Tiles(gpp_bh, gpp_bw, gpp_warps, synth_th, synth_tw, synth_warps)
    (8, 32, 8, 16, 16, 8),
    (8, 32, 4, 16, 32, 8),
    (8, 32, 8, 32, 32, 8),
    (16, 32, 8, 16, 32, 8),
    (4, 32, 4, 16, 16, 4),
)


def run_case(
    preset: str, width: int, height: int, peak: float | None, with_compile: bool, sweep: bool
) -> dict:
    from n2l.kernels import _triton

    device = torch.device("cuda")
    model = bench_model(preset, device)
    config = model.config
    macs = config.macs_per_pixel(height, width) * height * width
    row: dict = {
        "preset": preset,
        "width": width,
        "height": height,
        "macs_per_pixel": config.macs_per_pixel(height, width),
        "gmacs": macs / 1e9,
    }
    reference = torch_decoder(model, height, width)
    with torch.inference_mode():
        want = reference()
    row["torch_ms"] = time_ms(reference)
    if with_compile:
        try:
            compiled = torch_decoder(model, height, width, compiled=True)
            row["compiled_ms"] = time_ms(compiled)
        except Exception as e:  # noqa: BLE001  torch.compile is optional: report why it did not run
            row["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
    tiles = _triton.Tiles.default(config.synth_residual)
    candidates = [tiles]
    if sweep:
        candidates += [_triton.Tiles(*t) for t in SWEEP if t[3] > 2 * config.synth_residual]
    best = None
    for t in candidates:
        ms = time_ms(triton_decoder(model, height, width, t))
        if best is None or ms < best[0]:
            best = (ms, t)
    row["triton_ms"], best_tiles = best
    row["triton_tiles"] = best_tiles.__dict__
    row.update(compare(triton_decoder(model, height, width, best_tiles)(), want))
    for key in ("torch", "compiled", "triton"):
        if f"{key}_ms" in row:
            row[f"{key}_gflops"] = 2 * macs / (row[f"{key}_ms"] * 1e-3) / 1e9
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
    if "compiled_ms" in row:
        row["speedup_vs_compiled"] = row["compiled_ms"] / row["triton_ms"]
    if peak:
        row["limit_ms"] = 2 * macs / (peak * 1e12) * 1e3
        row["triton_fraction_of_peak"] = row["limit_ms"] / row["triton_ms"]
    return row


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'preset':8s} {'size':>9s} {'MAC/px':>7s} {'torch ms':>9s} {'compiled':>9s} {'triton ms':>9s} "
        f"{'speedup':>8s} {'triton GFLOP/s':>14s} {'limit ms':>9s} {'of peak':>8s} {'max diff':>8s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        compiled = f"{r['compiled_ms']:9.3f}" if "compiled_ms" in r else f"{'n/a':>9s}"
        limit = f"{r['limit_ms']:9.3f}" if "limit_ms" in r else f"{'?':>9s}"
        frac = f"{r['triton_fraction_of_peak']:8.1%}" if "triton_fraction_of_peak" in r else f"{'?':>8s}"
        print(
            f"{r['preset']:8s} {r['width']:>4d}x{r['height']:<4d} {r['macs_per_pixel']:7.0f} {r['torch_ms']:9.3f} "
            f"{compiled} {r['triton_ms']:9.3f} {r['speedup_vs_torch']:7.1f}x {r['triton_gflops']:14.0f} "
            f"{limit} {frac} {r['max_level_diff']:8d}"
        )


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(SIZES), help="WIDTHxHEIGHT")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--sweep", action="store_true", help="try several Triton tile shapes, keep the best")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/triton_<gpu>.json)"
    )
    args = parser.parse_args(argv)

    reason = gpu_unavailable_reason()
    if reason:
        print(f"bench_triton: skipped: {reason}")
        return 0
    import triton

    name = torch.cuda.get_device_name()
    peak, peak_source = fp32_peak_tflops(name)
    print(
        f"{name}, FP32 peak {peak} TFLOP/s ({peak_source}); torch {torch.__version__}, triton {triton.__version__}"
    )
    rows = []
    for preset in args.presets:
        for width, height in args.sizes:
            rows.append(run_case(preset, width, height, peak, not args.no_compile, args.sweep))
            print(f"  done {preset} {width}x{height}", flush=True)
    print()
    print_table(rows)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or RESULTS_DIR / f"triton_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "fp32_peak_tflops": peak,
        "fp32_peak_source": peak_source,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: one group per (preset, size), the three paths side by side.

_REASON = gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@needs_gpu
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("path", ["torch", "compiled", "triton"])
def test_decode_latency(benchmark, path: str, preset: str, size: tuple[int, int]):
    width, height = size
    model = bench_model(preset, torch.device("cuda"))
    benchmark.group = f"{preset} {width}x{height}"
    macs = model.config.macs_per_pixel(height, width) * height * width
    benchmark.extra_info["macs_per_pixel"] = model.config.macs_per_pixel(height, width)
    peak, _ = fp32_peak_tflops(torch.cuda.get_device_name())
    if peak:
        benchmark.extra_info["limit_ms"] = 2 * macs / (peak * 1e12) * 1e3
    fn = (
        triton_decoder(model, height, width)
        if path == "triton"
        else torch_decoder(model, height, width, path == "compiled")
    )

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    synced()  # compile outside the timing
    out = benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=3)
    assert out.shape == (height, width, model.config.out_channels) and out.dtype == torch.uint8
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["gflops"] = 2 * macs / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    sys.exit(main())
