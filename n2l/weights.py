"""Quantization and entropy coding of the payload: network weights and (hybrid mode) latents.

Each tensor (one per layer weight, one per layer bias, one per transmitted latent scale) is
quantized with its own power-of-two step 2^-exponent to integers q, and coded with
constriction's ANS coder under a quantized Laplace on [-max_abs, max_abs] whose scale
2^(scale_code / 8) is signalled. Weights use a zero-mean model. Latents [C, h, w] are coded in
two parallel halves of a checkerboard (a `LatentCode`): the anchors ((i + j) even) with a
zero-mean model, then the others with a mean predicted from their four anchor neighbours.
The prediction uses integer arithmetic and one correctly rounded division, so encoder and
decoder compute identical probabilities on any machine.
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


@dataclass(frozen=True)
class LatentCode(TensorCode):
    """A transmitted latent: `scale_code` is the anchors' Laplace scale; the other half has mean
    alpha / 16 x (mean of its anchor neighbours) and scale 2^(pred_scale_code / 8)."""

    pred_scale_code: int = 0
    alpha: int = 0  # 0..ALPHA_ONE

    @property
    def pred_scale(self) -> float:
        return 2.0 ** (self.pred_scale_code / 8)


ALPHA_ONE = 16


def quantize(w: torch.Tensor, exponent: int) -> np.ndarray:
    """Round a tensor to integer multiples of 2^-exponent, clipped to the codable range (same shape)."""
    q = torch.round(w.detach().double() * 2.0**exponent).clamp(-MAX_ABS, MAX_ABS)
    return q.to(torch.int32).cpu().numpy()


def dequantize(q: np.ndarray, exponent: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Integers back to float32 weights q * 2^-exponent (exact: a power-of-two scale)."""
    return torch.from_numpy(q).reshape(shape).double().mul(2.0**-exponent).float()


def _laplace(code: TensorCode):
    return constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs, 0.0, code.scale)


def _encode_others(coder, others: np.ndarray, means: np.ndarray, max_abs: int, scale: float) -> None:
    """Push the predicted half of a latent: per-symbol means, one Laplace scale."""
    family = constriction.stream.model.QuantizedLaplace(-max_abs, max_abs)
    coder.encode_reverse(others.astype(np.int32), family, means, np.full(others.size, scale))


def anchor_mask(height: int, width: int) -> np.ndarray:
    """True on the checkerboard anchors ((i + j) even) of an h x w grid."""
    return (np.add.outer(np.arange(height), np.arange(width)) % 2) == 0


def neighbour_sum_count(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the in-bounds 4-neighbours of every element of q [C, h, w] (int64)."""
    q = q.astype(np.int64)
    padded = np.pad(q, ((0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones(q.shape[1:], np.int64), 1)
    total = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    count = ones[:-2, 1:-1] + ones[2:, 1:-1] + ones[1:-1, :-2] + ones[1:-1, 2:]
    return total, np.broadcast_to(count, q.shape)


def checkerboard_halves(q: np.ndarray, code: LatentCode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchors, others, means of the others) of a latent [C, h, w], flattened."""
    mask = np.broadcast_to(anchor_mask(*q.shape[1:]), q.shape)
    total, count = neighbour_sum_count(np.where(mask, q, 0))
    # Integer numerator and denominator, one correctly rounded division: identical everywhere.
    means = (code.alpha * total[~mask]).astype(np.float64) / (ALPHA_ONE * count[~mask]).astype(np.float64)
    return q[mask], q[~mask], means


def _encode(coder, q: np.ndarray, code: TensorCode) -> None:
    """Push one tensor onto an ANS stack (decoded in the opposite order)."""
    if not code.max_abs:
        return
    q = q.astype(np.int32)
    if not isinstance(code, LatentCode):
        coder.encode_reverse(q.ravel(), _laplace(code))
        return
    anchors, others, means = checkerboard_halves(q, code)
    if others.size:
        _encode_others(coder, others, means, code.max_abs, code.pred_scale)
    coder.encode_reverse(anchors, _laplace(code))


def _decode(coder, code: TensorCode, shape: tuple[int, ...]) -> np.ndarray:
    size = math.prod(shape)
    if not code.max_abs:
        return np.zeros(shape, dtype=np.int32)
    if not isinstance(code, LatentCode):
        return coder.decode(_laplace(code), size).astype(np.int32).reshape(shape)
    mask = np.broadcast_to(anchor_mask(*shape[1:]), shape)
    q = np.zeros(shape, dtype=np.int32)
    q[mask] = coder.decode(_laplace(code), int(mask.sum()))
    n_others = size - int(mask.sum())
    if n_others:
        _, _, means = checkerboard_halves(q, code)
        family = constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs)
        q[~mask] = coder.decode(family, means, np.full(n_others, code.pred_scale))
    return q


def _bits_under(q: np.ndarray, code: TensorCode) -> float:
    """Information content of q under the code's model, in bits."""
    coder = constriction.stream.stack.AnsCoder()
    _encode(coder, q, code)
    return float(coder.num_valid_bits())


def _best_scale_code(values: np.ndarray, means: np.ndarray | float, cost) -> int:
    """The scale code that makes `cost` (the coded bits) smallest.

    Two estimates bracket it: the maximum-likelihood scale of a continuous Laplace (mean
    |value - mean|, right for dense tensors) and the scale that predicts the observed share of
    values in the central bin (right for sparse ones, where the mean |value| underestimates
    the scale up to tenfold and each nonzero value would cost some 20 bits). The codes between
    them are scanned in steps of 2, then the best is refined by 1.
    """
    lo, hi = SCALE_CODE_RANGE
    residual = np.abs(values - means)
    central = float(np.mean(residual < 0.5))
    ml = max(float(residual.mean()), 2.0**-8)
    sparse = -0.5 / math.log(1 - central) if 0 < central < 1 else ml
    ends = sorted(min(max(round(8 * math.log2(b)), lo), hi) for b in (ml, sparse))
    best = min(range(max(lo, ends[0] - 2), min(hi, ends[1] + 2) + 1, 2), key=cost)
    return min(range(max(lo, best - 1), min(hi, best + 1) + 1), key=cost)


def fit_code(q: np.ndarray, exponent: int, latent: bool = False) -> TensorCode:
    """The code for integers q: support from their range, Laplace scales (and for a latent
    [C, h, w] the prediction weight alpha) fitted to cost the least."""
    max_abs = int(np.abs(q).max()) if q.size else 0
    if max_abs == 0:
        return LatentCode(exponent, 0, 0) if latent else TensorCode(exponent, 0, 0)
    if not latent:
        scale = _best_scale_code(q, 0.0, lambda c: _bits_under(q, TensorCode(exponent, c, max_abs)))
        return TensorCode(exponent, scale, max_abs)
    probe = LatentCode(exponent, 0, max_abs, 0, ALPHA_ONE)
    anchors, others, means = checkerboard_halves(q, probe)  # means at alpha = 1
    scale = _best_scale_code(anchors, 0.0, lambda c: _bits_under(anchors, TensorCode(exponent, c, max_abs)))
    if not others.size:
        return LatentCode(exponent, scale, max_abs)
    dot = float(means @ means)
    alpha = min(ALPHA_ONE, max(0, round(ALPHA_ONE * float(others @ means) / dot))) if dot else 0
    _, _, means = checkerboard_halves(q, LatentCode(exponent, scale, max_abs, 0, alpha))  # exactly as coded

    def cost(c: int) -> float:
        coder = constriction.stream.stack.AnsCoder()
        _encode_others(coder, others, means, max_abs, 2.0 ** (c / 8))
        return coder.num_valid_bits()

    pred = _best_scale_code(others, means, cost)
    return LatentCode(exponent, scale, max_abs, pred, alpha)


def tensor_bits(q: np.ndarray, code: TensorCode) -> float:
    """Coded size of one tensor in bits (0 for an all-zero tensor)."""
    return _bits_under(q, code) if code.max_abs else 0.0


def encode_tensors(qs: list[np.ndarray], codes: list[TensorCode]) -> bytes:
    """Entropy-code integer tensors into one ANS stream (little-endian 32-bit words)."""
    coder = constriction.stream.stack.AnsCoder()
    for q, code in reversed(list(zip(qs, codes))):  # a stack: encode last first
        _encode(coder, q, code)
    return coder.get_compressed().astype("<u4").tobytes()


def decode_tensors(payload: bytes, codes: list[TensorCode], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Inverse of encode_tensors; `shapes` are known from the architecture and image size."""
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    return [_decode(coder, code, shape) for code, shape in zip(codes, shapes)]
