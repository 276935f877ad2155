"""Quantization and entropy coding of the network weights (the whole payload of n2l).

Each tensor (one per layer weight, one per layer bias) is quantized with its own power-of-two
step 2^-exponent to integers q, and coded with constriction's ANS coder under a zero-mean
quantized Laplace model on [-max_abs, max_abs] whose scale 2^(scale_code / 8) is signalled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch

MAX_EXPONENT = 24
MAX_ABS = 0xFFFF
SCALE_CODE_RANGE = (-64, 127)  # int8 in the bitstream; scales 2^-8 .. 2^15.9


@dataclass(frozen=True)
class TensorCode:
    """How one tensor is quantized and coded. max_abs == 0 means all zero (nothing coded)."""

    exponent: int  # step = 2 ** -exponent
    scale_code: int  # Laplace scale = 2 ** (scale_code / 8), in units of the step
    max_abs: int  # symbols lie in [-max_abs, max_abs]

    @property
    def scale(self) -> float:
        return 2.0 ** (self.scale_code / 8)


def quantize(w: torch.Tensor, exponent: int) -> np.ndarray:
    """Round a tensor to integer multiples of 2^-exponent, clipped to the codable range."""
    q = torch.round(w.detach().double() * 2.0**exponent).clamp(-MAX_ABS, MAX_ABS)
    return q.to(torch.int32).flatten().cpu().numpy()


def dequantize(q: np.ndarray, exponent: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Integers back to float32 weights q * 2^-exponent (exact: a power-of-two scale)."""
    return torch.from_numpy(q).view(shape).double().mul(2.0**-exponent).float()


def _laplace(code: TensorCode):
    return constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs, 0.0, code.scale)


def _bits_under(q: np.ndarray, code: TensorCode) -> float:
    """Information content of q under the code's model, in bits."""
    model = _laplace(code)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(q, model)
    return float(coder.num_valid_bits())


def fit_code(q: np.ndarray, exponent: int) -> TensorCode:
    """The code for integers q: support from their range, Laplace scale fitted to cost the least."""
    max_abs = int(np.abs(q).max()) if q.size else 0
    if max_abs == 0:
        return TensorCode(exponent, 0, 0)
    lo, hi = SCALE_CODE_RANGE
    ml = max(float(np.abs(q).mean()), 2.0**-8)  # maximum-likelihood Laplace scale
    centre = min(max(round(8 * math.log2(ml)), lo), hi)
    candidates = [TensorCode(exponent, c, max_abs) for c in range(max(lo, centre - 2), min(hi, centre + 2) + 1)]
    return min(candidates, key=lambda code: _bits_under(q, code))


def tensor_bits(q: np.ndarray, code: TensorCode) -> float:
    """Coded size of one tensor in bits (0 for an all-zero tensor)."""
    return _bits_under(q, code) if code.max_abs else 0.0


def encode_tensors(qs: list[np.ndarray], codes: list[TensorCode]) -> bytes:
    """Entropy-code integer tensors into one ANS stream (little-endian 32-bit words)."""
    coder = constriction.stream.stack.AnsCoder()
    for q, code in reversed(list(zip(qs, codes))):  # a stack: encode last first
        if code.max_abs:
            coder.encode_reverse(q.astype(np.int32), _laplace(code))
    return coder.get_compressed().astype("<u4").tobytes()


def decode_tensors(payload: bytes, codes: list[TensorCode], sizes: list[int]) -> list[np.ndarray]:
    """Inverse of encode_tensors; `sizes` are the element counts (known from the architecture)."""
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    out = []
    for code, size in zip(codes, sizes):
        if code.max_abs:
            out.append(coder.decode(_laplace(code), size).astype(np.int32))
        else:
            out.append(np.zeros(size, dtype=np.int32))
    return out
