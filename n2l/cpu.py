"""The compiled C++ CPU decode core (``n2l._core``, built from csrc/ by ``pip install``).

Same network as the torch reference (n2l/model.py), row-streamed and multithreaded, with
run-time dispatch to AVX-512, AVX2 or baseline SSE2 code. The noise is bit-identical to
n2l.noise; pixels agree with the reference to within one level on rare pixels (float sums are
reordered and softplus/exp use polynomial approximations).

If the extension is missing (the build was skipped or failed) the package still works:
`unavailable_reason()` says why, and the decoder falls back to torch.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .model import N2LModel, Weights

try:
    from . import _core
except ImportError as e:  # the pure-Python install, or a failed build
    _core = None
    _IMPORT_ERROR: str | None = f"n2l._core cannot be imported ({e}); reinstall with a C++17 compiler and CMake"
else:
    _IMPORT_ERROR = None

_warned = False


def unavailable_reason() -> str | None:
    """None if the compiled core can be used, else a short reason (warned about once)."""
    global _warned
    if _IMPORT_ERROR is not None and not _warned:
        _warned = True
        warnings.warn(f"n2l C++ CPU core unavailable: {_IMPORT_ERROR}", RuntimeWarning, stacklevel=2)
    return _IMPORT_ERROR


def _require_core():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _core


def default_threads() -> int:
    """All cores this process may run on (respects CPU affinity, e.g. taskset or containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def isa() -> str:
    """Instruction-set variant in use: 'avx512', 'avx2' or 'base'."""
    return _require_core().isa()


def supported_isas() -> list[str]:
    """Variants this CPU can run, best first."""
    return list(_require_core().supported_isas())


def set_isa(name: str) -> None:
    """Force an instruction-set variant (for tests and benchmarks); the best one is the default."""
    _require_core().set_isa(name)


def noise_block(seed: int, scale: int, channels: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Noise of one scale on a window, [channels, height, width] float32; same bits as n2l.noise.noise_block."""
    core = _require_core()
    out = np.empty((channels, height, width), dtype=np.float32)
    core.noise_into(seed & 0xFFFFFFFF, scale, y0, x0, out)
    return out


def decode_cpu(
    net: N2LModel | Weights, seed: int, height: int, width: int, threads: int | None = None
) -> np.ndarray:
    """Decode with the C++ core: uint8 [height, width, out_channels]. threads=None uses all cores.

    Equal (within one level on rare pixels) to ``to_uint8(model(model.noise(seed, H, W)))``
    and identical for every thread count.
    """
    core = _require_core()
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    weights = (net.weights() if isinstance(net, N2LModel) else net).cpu()  # one copy from a GPU
    cfg = weights.config
    layers = weights.layers.values()  # bitstream order
    coded = [np.ascontiguousarray(y[0].numpy()) for y in weights.coded]
    out = np.empty((height, width, cfg.out_channels), dtype=np.uint8)
    core.decode(
        seed & 0xFFFFFFFF,
        height,
        width,
        cfg.n_scales,
        cfg.latent_channels,
        cfg.gpp_hidden,
        cfg.gpp_kernel,
        cfg.gpp_kernel_min_scale,
        list(cfg.synth_hidden),
        cfg.synth_residual,
        cfg.out_channels,
        [np.ascontiguousarray(w.numpy()) for w, _ in layers],
        [np.ascontiguousarray(b.numpy()) for _, b in layers],
        coded,
        out,
        default_threads() if threads is None else max(1, int(threads)),
    )
    return out
