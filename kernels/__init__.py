"""Triton GPU decode path, installed as `n2l.kernels` (see kernels/_triton.py).

Importing this package never needs triton: `unavailable_reason()` says why the backend cannot
run, and the kernels are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from n2l.model import N2LModel, Weights

__all__ = [
    "decode_triton",
    "interpreted",
    "latents_triton",
    "noise_triton",
    "synthesis_triton",
    "unavailable_reason",
]


def interpreted() -> bool:
    """True when TRITON_INTERPRET=1 (kernels run in Triton's CPU interpreter, for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason() -> str | None:
    """None when the Triton backend can run here, else a short reason."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'n2l[triton]'"
    if interpreted():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU for testing)"
    return None


def _impl():
    from . import _triton

    return _triton


def decode_triton(
    net: N2LModel | Weights, seed: int, height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 [H, W, C_out] on `device` (default: the weights' device), equal to the torch
    reference within 1 level. `net` is a model or its bare Weights (n2l.decoder.load_weights)."""
    return _impl().decode_triton(net, seed, height, width, device=device)


def latents_triton(
    net: N2LModel | Weights, seed: int, height: int, width: int, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """GPP stage only: latents y_s, finest first, each [1, C, h_s, w_s]."""
    return _impl().latents_triton(net, seed, height, width, device=device)


def synthesis_triton(net: N2LModel | Weights, ys: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Synthesis stage only (on the latents' device): latents -> float32 [1, C_out, H, W], not clamped."""
    return _impl().synthesis_triton(net, ys, height, width)


def noise_triton(seed: int, scale: int, channels: int, height: int, width: int, device) -> torch.Tensor:
    """Noise of one whole scale from the Triton noise code, [channels, height, width]."""
    return _impl().noise_triton(seed, scale, channels, height, width, device)
