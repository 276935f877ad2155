"""Decode latency of the C++ CPU core vs the torch reference CPU path, side by side.

    python bench/bench_cpu.py                     # table + bench/results/cpu.json
    python bench/bench_cpu.py --sizes 768x512 --presets default --threads 2
    pytest bench/bench_cpu.py --benchmark-enable  # pytest-benchmark variant (768x512)

The torch path is what `n2l.decoder.reconstruct(backend="torch")` runs: the int64 torch noise
generator (n2l.noise) and the network (n2l.model); both parts are timed. Times are wall-clock
on a possibly shared machine: the JSON records the load average before and after, and we
report the minimum (least disturbed) and the median of the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import bench_model

from n2l import cpu
from n2l.model import PRESETS, to_uint8

SIZES = ((768, 512), (2048, 1365))  # width x height
RESULTS = Path(__file__).resolve().parent / "results" / "cpu.json"


def time_calls(fn, min_reps: int, max_reps: int, budget_s: float) -> list[float]:
    """Seconds per call: one warm-up, then min_reps..max_reps calls within about budget_s."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def cpu_info() -> dict:
    """Model, cores, SIMD width and clock from /proc/cpuinfo and lscpu, and the fp32 FMA peak.

    Peak = cores x fp32 lanes per vector x FMA pipes x clock, in MAC/s (one FMA = one MAC).
    We assume 2 FMA pipes per core (Intel since Haswell, AMD Zen 1..5) and full-width vectors.
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE).group(1).split()) if "flags" in text else set()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    max_mhz = re.search(r"CPU max MHz:\s*([\d.]+)", lscpu)
    clock_ghz = (float(max_mhz.group(1)) if max_mhz else (max(mhz) if mhz else 0.0)) / 1000
    cores = cpu.default_threads()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_pipes = 2
    return {
        "model": model.group(1) if model else platform.processor(),
        "cores": cores,
        "clock_ghz": clock_ghz,
        "clock_source": "lscpu CPU max MHz" if max_mhz else "/proc/cpuinfo cpu MHz (nominal; turbo not visible)",
        "fp32_lanes": lanes,
        "fma_pipes_assumed": fma_pipes,
        "peak_gmac_s": cores * lanes * fma_pipes * clock_ghz,
        "isa_used": cpu.isa(),
        "l2_l3": re.findall(r"(L[23] cache:\s*.*)", lscpu),
    }


def run(sizes, presets, thread_counts, torch_reps: int, quiet: bool = False) -> dict:
    info = cpu_info()
    rows = []
    load_before = os.getloadavg()
    header = (
        f"{'preset':8} {'size':>9} {'thr':>3} {'MAC/px':>7} {'C++ min':>8} {'C++ med':>8} {'GMAC/s':>7} "
        f"{'%peak':>6} {'torch':>9} {'(noise':>9} {'+ net)':>8} {'speedup':>8}"
    )
    if not quiet:
        print(f"CPU: {info['model']}, {info['cores']} cores, {info['fp32_lanes']} fp32 lanes x "
              f"{info['fma_pipes_assumed']} FMA x {info['clock_ghz']:.2f} GHz = peak {info['peak_gmac_s']:.0f} GMAC/s "
              f"(core uses {info['isa_used']}); load average {load_before[0]:.2f}")
        print(header)
    for name in presets:
        model = bench_model(name)
        cfg = model.config
        for width, height in sizes:
            macs = cfg.macs_per_pixel(height, width)
            for threads in thread_counts:
                seed = 1234
                cpp = time_calls(lambda: cpu.decode_cpu(model, seed, height, width, threads=threads), 5, 30, 2.0)
                torch.set_num_threads(threads)
                noise_t, net_t = [], []
                with torch.inference_mode():
                    for _ in range(torch_reps):
                        t0 = time.perf_counter()
                        noise = model.noise(seed, height, width)
                        t1 = time.perf_counter()
                        to_uint8(model(noise)).numpy()
                        t2 = time.perf_counter()
                        noise_t.append(t1 - t0)
                        net_t.append(t2 - t1)
                        del noise
                cpp_min, cpp_med = min(cpp), statistics.median(cpp)
                torch_total = min(a + b for a, b in zip(noise_t, net_t))
                gmac = macs * width * height / cpp_min / 1e9
                row = {
                    "preset": name, "width": width, "height": height, "threads": threads,
                    "macs_per_pixel": macs, "cpp_ms_min": cpp_min * 1e3, "cpp_ms_median": cpp_med * 1e3,
                    "cpp_reps": len(cpp), "cpp_gmac_s": gmac, "cpp_fraction_of_peak": gmac / info["peak_gmac_s"],
                    "torch_ms": torch_total * 1e3, "torch_noise_ms": min(noise_t) * 1e3,
                    "torch_network_ms": min(net_t) * 1e3, "torch_reps": torch_reps,
                    "speedup": torch_total / cpp_min,
                    "speedup_vs_torch_network_only": min(net_t) / cpp_min,
                }
                rows.append(row)
                if not quiet:
                    print(f"{name:8} {f'{width}x{height}':>9} {threads:>3} {macs:>7.0f} {cpp_min * 1e3:>7.1f}ms "
                          f"{cpp_med * 1e3:>6.1f}ms {gmac:>7.1f} {100 * gmac / info['peak_gmac_s']:>5.1f}% "
                          f"{torch_total * 1e3:>7.0f}ms {min(noise_t) * 1e3:>7.0f}ms {min(net_t) * 1e3:>6.0f}ms "
                          f"{torch_total / cpp_min:>7.0f}x", flush=True)
    torch.set_num_threads(info["cores"])
    return {
        "machine": info, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "command": " ".join(["python", "bench/bench_cpu.py", *sys.argv[1:]]), "results": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in SIZES], help="WIDTHxHEIGHT")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--torch-reps", type=int, default=2, help="repetitions of the (slow) torch path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    reason = cpu.unavailable_reason()
    if reason:
        sys.exit(f"C++ core unavailable: {reason}")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    result = run(sizes, args.presets, args.threads, args.torch_reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average after: {result['load_average_after'][0]:.2f}; wrote {args.out}")


# pytest-benchmark variant: pytest bench/bench_cpu.py --benchmark-enable
try:
    import pytest
except ImportError:  # plain script mode does not need pytest
    pytest = None

if pytest is not None:
    _skip = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="C++ core not built")

    @_skip
    @pytest.mark.parametrize("threads", [1, 2])
    @pytest.mark.parametrize("name", sorted(PRESETS))
    def test_bench_cpp_768x512(benchmark, name: str, threads: int) -> None:
        model = bench_model(name)
        benchmark.group = f"{name} 768x512 {threads} thread(s)"
        out = benchmark(cpu.decode_cpu, model, 1234, 512, 768, threads=threads)
        assert out.shape == (512, 768, 3)

    @_skip
    @pytest.mark.parametrize("threads", [1, 2])
    @pytest.mark.parametrize("name", sorted(PRESETS))
    def test_bench_torch_768x512(benchmark, name: str, threads: int) -> None:
        model = bench_model(name)
        benchmark.group = f"{name} 768x512 {threads} thread(s)"
        torch.set_num_threads(threads)

        def decode():
            with torch.inference_mode():
                return to_uint8(model(model.noise(1234, 512, 768))).numpy()

        out = benchmark.pedantic(decode, rounds=2, iterations=1, warmup_rounds=0)
        assert out.shape == (512, 768, 3)


if __name__ == "__main__":
    main()
