"""Quantization and entropy coding of the payload: network weights and (hybrid mode) latents.

Each tensor (one per layer weight, one per layer bias, one per transmitted latent scale) is
quantized with its own power-of-two step 2^-exponent to integers q, and coded with
constriction's ANS coder under quantized Laplace models on [-max_abs, max_abs]. Weights use
one zero-mean Laplace of signalled scale 2^(scale_code / 8). Latents [C, h, w] are coded in
parallel passes over interleaved subgrids, coarse to fine (a `LatentCode`): each value's mean
is predicted from its neighbours decoded in earlier passes and its scale grows with their
magnitude (a context level). Predictions and levels use integer arithmetic and one correctly
rounded division, so encoder and decoder compute identical probabilities on any machine.
"""

from __future__ import annotations

import functools
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
class PassCode:
    """The model of one pass over a latent: each value is Laplace distributed with mean
    weight / 16 x (mean of its already decoded neighbours) and scale 2^(code / 8), where
    code = scale_code + slope x (context level of those neighbours), see `context_levels`."""

    scale_code: int
    slope: int = 0  # 0..MAX_SLOPE
    weight: int = 0  # 0..WEIGHT_ONE


@dataclass(frozen=True)
class LatentCode:
    """A transmitted latent [C, h, w], coded in passes over interleaved subgrids.

    1 + 2 x depth passes (formats 4-6; format 4 and 5 have depth 1). With s = 2^depth: the
    grid of every s-th row and column, zero mean, one scale; then for each spacing d = s/2, ...,
    1, two passes that halve the grid's spacing: the centres of its d-spaced cells, predicted
    from their 4 diagonal neighbours at distance d, then the rest of the d-spaced grid, from
    their 4 direct neighbours at distance d (see `pass_geometry`). Two passes (formats 1-3,
    read only): the checkerboard anchors with a zero mean, then the others from their 4 direct
    neighbours; no context levels (slope 0)."""

    exponent: int  # step = 2 ** -exponent
    max_abs: int  # symbols lie in [-max_abs, max_abs]; 0: all zero, nothing coded
    passes: tuple[PassCode, ...]

    @property
    def depth(self) -> int:
        """Spacing halvings of the passes (0 for the two checkerboard passes of formats 1-3)."""
        return (len(self.passes) - 1) // 2


WEIGHT_ONE = 16
MAX_DEPTH = 4  # passes start from every 2^depth-th row and column, depth 1..MAX_DEPTH
MAX_SLOPE = 32
CONTEXT_LEVELS = 8  # context level = bit length of the neighbours' sum |q|, capped at 7
_CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def quantize(w: torch.Tensor, exponent: int) -> np.ndarray:
    """Round a tensor to integer multiples of 2^-exponent, clipped to the codable range (same shape)."""
    q = torch.round(w.detach().double() * 2.0**exponent).clamp(-MAX_ABS, MAX_ABS)
    return q.to(torch.int32).cpu().numpy()


def dequantize(q: np.ndarray, exponent: int) -> np.ndarray:
    """Integers back to float32 weights q * 2^-exponent (exact: a power-of-two scale)."""
    return (q * 2.0**-exponent).astype(np.float32)


def _laplace(code: TensorCode):
    return constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs, 0.0, code.scale)


def pass_geometry(n_passes: int, height: int, width: int) -> list[tuple[np.ndarray, tuple]]:
    """(mask [h, w], neighbour offsets) of each pass of a latent coded in `n_passes` passes
    (see `LatentCode`).

    Every neighbour of a pass's value belongs to an earlier pass, so a decoder knows them."""
    i, j = np.arange(height)[:, None], np.arange(width)[None]
    if n_passes == 2:
        cross = (i + j) % 2 == 1
        return [(~cross, ()), (cross, _CROSS)]
    spacing = 2 ** ((n_passes - 1) // 2)
    out = [((i % spacing == 0) & (j % spacing == 0), ())]
    while spacing > 1:
        d = spacing // 2
        on_grid = (i % d == 0) & (j % d == 0)
        out.append((on_grid & (i % spacing == d) & (j % spacing == d), tuple((d * a, d * b) for a, b in _DIAGONAL)))
        out.append((on_grid & ((i // d + j // d) % 2 == 1), tuple((d * a, d * b) for a, b in _CROSS)))
        spacing = d
    return out


def context_levels(magnitude: np.ndarray) -> np.ndarray:
    """Context level of a neighbourhood from its sum of |q|: 0 for 0, else the bit length
    (1 for 1, 2 for 2-3, 3 for 4-7, ...), capped at CONTEXT_LEVELS - 1. Exact (frexp)."""
    return np.minimum(np.frexp(magnitude.astype(np.float64))[1], CONTEXT_LEVELS - 1)


def _pass_positions(n_passes: int, height: int, width: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per pass of `pass_geometry`: its positions ys, xs in row-major order, their in-bounds
    neighbour count, and the neighbour offsets. Fixed per geometry: cached up to
    _CACHED_POSITIONS values (read-only arrays), so large latents hold no memory after decoding."""
    if height * width <= _CACHED_POSITIONS:
        return _cached_pass_positions(n_passes, height, width)
    return _cached_pass_positions.__wrapped__(n_passes, height, width)


_CACHED_POSITIONS = 1 << 20


@functools.lru_cache(maxsize=64)
def _cached_pass_positions(n_passes: int, height: int, width: int) -> tuple[tuple[np.ndarray, ...], ...]:
    out = []
    for mask, offsets in pass_geometry(n_passes, height, width):
        ys, xs = np.nonzero(mask)
        count = sum(((ys + di >= 0) & (ys + di < height) & (xs + dj >= 0) & (xs + dj < width)).astype(np.int64)
                    for di, dj in offsets) if offsets else np.zeros(ys.size, np.int64)
        for a in (ys, xs, count):
            a.flags.writeable = False
        out.append((ys, xs, count, offsets))
    return tuple(out)


def _pass_context(q: np.ndarray, ys: np.ndarray, xs: np.ndarray, count: np.ndarray,
                  offsets: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neighbour sum, sum of |neighbours|, in-bounds neighbour count) of the values of
    q [C, h, w] at positions (ys, xs) of every channel, flattened like q[:, ys, xs]; zeros for
    a pass without neighbours. Only those positions are gathered."""
    c = q.shape[0]
    total, magnitude = np.zeros((c, ys.size), np.int64), np.zeros((c, ys.size), np.int64)
    if offsets:
        r = max(max(abs(di), abs(dj)) for di, dj in offsets)
        padded = np.pad(q.astype(np.int64), ((0, 0), (r, r), (r, r)))
        for di, dj in offsets:
            values = padded[:, ys + r + di, xs + r + dj]
            total += values
            magnitude += np.abs(values)
    return total.ravel(), magnitude.ravel(), np.broadcast_to(count, (c, ys.size)).ravel()


def _pass_models(q: np.ndarray, n_passes: int) -> list[tuple[np.ndarray, ...]]:
    """Per pass of a latent q [C, h, w]: (ys, xs, neighbour sum, sum of |neighbours|, neighbour
    count), the last three flattened like q[:, ys, xs]. Only earlier passes' values are read."""
    return [(ys, xs, *_pass_context(q, ys, xs, count, offsets))
            for ys, xs, count, offsets in _pass_positions(n_passes, *q.shape[1:])]


def _pass_means_scales(pc: PassCode, total: np.ndarray, magnitude: np.ndarray, count: np.ndarray):
    # Integer numerator and denominator, one correctly rounded division: identical everywhere.
    means = (pc.weight * total).astype(np.float64) / np.maximum(WEIGHT_ONE * count, 1).astype(np.float64)
    lo, hi = SCALE_CODE_RANGE
    scales = np.exp2(np.clip(pc.scale_code + pc.slope * context_levels(magnitude), lo, hi) / 8.0)
    return means, scales


def _latent_context(q: np.ndarray, n_passes: int) -> tuple[np.ndarray, ...]:
    """The fields of `_pass_models` as arrays [C, h, w] (int64): (pass, neighbour sum, sum of
    |neighbours|, neighbour count) of every value."""
    fields = [np.zeros(q.shape, np.int64) for _ in range(4)]
    for p, (ys, xs, *values) in enumerate(_pass_models(q, n_passes)):
        fields[0][:, ys, xs] = p
        for field, value in zip(fields[1:], values):
            field[:, ys, xs] = value.reshape(q.shape[0], ys.size)
    return tuple(fields)


def _laplace_params(code: LatentCode, passes: np.ndarray, total: np.ndarray, magnitude: np.ndarray,
                    count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-value Laplace (mean, scale) of a latent's values from their `_latent_context` fields."""
    mean, scale = np.zeros(passes.shape), np.ones(passes.shape)
    for p, pc in enumerate(code.passes):
        at = passes == p
        mean[at], scale[at] = _pass_means_scales(pc, total[at], magnitude[at], count[at])
    return mean, scale


def _encode_latent(coder, q: np.ndarray, code: LatentCode) -> None:
    family = constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs)
    for pc, (ys, xs, *context) in reversed(list(zip(code.passes, _pass_models(q, len(code.passes))))):
        if ys.size:
            coder.encode_reverse(q[:, ys, xs].ravel().astype(np.int32), family, *_pass_means_scales(pc, *context))


def _decode_latent(coder, code: LatentCode, shape: tuple[int, ...]) -> np.ndarray:
    q = np.zeros(shape, dtype=np.int32)
    family = constriction.stream.model.QuantizedLaplace(-code.max_abs, code.max_abs)
    for pc, (ys, xs, count, offsets) in zip(code.passes, _pass_positions(len(code.passes), *shape[1:])):
        if ys.size:
            values = coder.decode(family, *_pass_means_scales(pc, *_pass_context(q, ys, xs, count, offsets)))
            q[:, ys, xs] = values.reshape(shape[0], ys.size)
    return q


def _encode(coder, q: np.ndarray, code: TensorCode | LatentCode) -> None:
    """Push one tensor onto an ANS stack (decoded in the opposite order)."""
    if not code.max_abs:
        return
    if isinstance(code, LatentCode):
        _encode_latent(coder, q, code)
    else:
        coder.encode_reverse(q.astype(np.int32).ravel(), _laplace(code))


def _decode(coder, code: TensorCode | LatentCode, shape: tuple[int, ...]) -> np.ndarray:
    if not code.max_abs:
        return np.zeros(shape, dtype=np.int32)
    if isinstance(code, LatentCode):
        return _decode_latent(coder, code, shape)
    return coder.decode(_laplace(code), math.prod(shape)).astype(np.int32).reshape(shape)


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


def laplace_bin_bits(d: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """Bits of integers at distance d from the mean of a Laplace of scale b, unit bins (no
    truncation; broadcasts). Differentiable: the encoder's rate proxy uses it too."""
    def exp(x: torch.Tensor) -> torch.Tensor:  # e^-80 is as good as 0 here; float32 denormals
        return torch.exp(x.clamp_min(-80.0))  # below it make exp several times slower on CPU

    lo = d - 0.5
    tail = math.log(0.5) - lo.clamp_min(0) / b + torch.log1p(-exp(-1 / torch.as_tensor(b)))
    centre = torch.log((1 - 0.5 * (exp(-(d + 0.5) / b) + exp(lo.clamp_max(0) / b))).clamp_min(1e-12))
    return -torch.where(lo >= 0, tail, centre) / math.log(2)


def _bin_bits(distance: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """laplace_bin_bits on numpy arrays, in float64."""
    return laplace_bin_bits(torch.from_numpy(np.asarray(distance, np.float64)),
                            torch.from_numpy(np.asarray(scale, np.float64))).numpy()


def move_bits(q: np.ndarray, code: LatentCode) -> np.ndarray:
    """[2, values] estimated change of a latent's coded bits when one value of q [C, h, w] moves
    by -1 or +1, all else held: its own bits, and those of the later-pass values that have it as
    a neighbour (their mean and context level change). The scales are not re-fitted."""
    passes, total, magnitude, count = _latent_context(q, len(code.passes))
    mean, scale = _laplace_params(code, passes, total, magnitude, count)
    bits = _bin_bits(np.abs(q - mean), scale)
    _, h, w = q.shape
    out = []
    for d in (-1, 1):
        delta = _bin_bits(np.abs(q + d - mean), scale) - bits
        grown = np.abs(q + d) - np.abs(q)
        for p, (_, offsets) in enumerate(pass_geometry(len(code.passes), h, w)):
            for di, dj in offsets:  # y = x - (di, dj) has x as a neighbour if y is in pass p
                if abs(di) >= h or abs(dj) >= w:  # no such pair (deep passes of a small latent)
                    continue
                ys = (slice(None), slice(max(0, -di), h - max(0, di)), slice(max(0, -dj), w - max(0, dj)))
                xs = (slice(None), slice(max(0, di), h - max(0, -di)), slice(max(0, dj), w - max(0, -dj)))
                y_mean, y_scale = _laplace_params(code, passes[ys], total[ys] + d, magnitude[ys] + grown[xs], count[ys])
                change = _bin_bits(np.abs(q[ys] - y_mean), y_scale) - bits[ys]
                delta[xs] += np.where(passes[ys] == p, change, 0.0)
        out.append(delta.ravel())
    return np.stack(out)


def _scan_pass(values: np.ndarray, total: np.ndarray, magnitude: np.ndarray, count: np.ndarray) -> tuple[PassCode, float]:
    """Prediction weight by least squares, then (scale code, slope) for the fewest bits: a scan
    of every pair under the continuous Laplace's bin probabilities. Returns the model and its
    estimated bits."""
    values = values.astype(np.float64)
    neighbour_mean = total / np.maximum(count, 1)
    dot = float(neighbour_mean @ neighbour_mean)
    weight = min(WEIGHT_ONE, max(0, round(WEIGHT_ONE * float(values @ neighbour_mean) / dot))) if dot else 0
    means, _ = _pass_means_scales(PassCode(0, 0, weight), total, magnitude, count)
    level = context_levels(magnitude)
    # Distances are multiples of 1/192 (means have denominators 16 x count, count <= 4): bin them.
    distance = np.round(np.abs(values - means) * 192).astype(np.int64)
    keys, counts = np.unique(level * (2 * 192 * MAX_ABS + 1) + distance, return_counts=True)
    key_level, key_distance = np.divmod(keys, 2 * 192 * MAX_ABS + 1)
    lo, hi = SCALE_CODE_RANGE
    codes = np.arange(lo, hi + 1)
    per_level = np.zeros((CONTEXT_LEVELS, codes.size))  # bits of each level's values at each code
    np.add.at(per_level, key_level, (_bin_bits(key_distance[None] / 192, np.exp2(codes / 8)[:, None]) * counts).T)
    used = np.flatnonzero(per_level.any(axis=1))
    best = (math.inf, 0, 0)
    for slope in range(MAX_SLOPE + 1 if used.size > 1 else 1):
        shifted = np.clip(codes[None] + slope * used[:, None], lo, hi) - lo
        bits = np.take_along_axis(per_level[used], shifted, axis=1).sum(axis=0)
        c = int(np.argmin(bits))
        if bits[c] < best[0]:
            best = (float(bits[c]), int(codes[c]), slope)
    bits, scale_code, slope = best
    return PassCode(scale_code, slope, weight), bits


def _refine_pass(pc: PassCode, values: np.ndarray, total: np.ndarray, magnitude: np.ndarray, count: np.ndarray,
                 max_abs: int) -> PassCode:
    """The scale code of a scanned model that costs the fewest bits with the real coder. The
    scan's bins differ from the coder's (a truncated support, fixed-point probabilities), most
    on sparse values: scan the real cost around its pick in steps of 2, then refine by 1."""
    def cost(c: int) -> float:
        coder = constriction.stream.stack.AnsCoder()
        family = constriction.stream.model.QuantizedLaplace(-max_abs, max_abs)
        model = PassCode(c, pc.slope, pc.weight)
        coder.encode_reverse(values.astype(np.int32), family, *_pass_means_scales(model, total, magnitude, count))
        return coder.num_valid_bits()

    lo, hi = SCALE_CODE_RANGE
    best = min(range(max(lo, pc.scale_code - 4), min(hi, pc.scale_code + 4) + 1, 2), key=cost)
    return PassCode(min(range(max(lo, best - 1), min(hi, best + 1) + 1), key=cost), pc.slope, pc.weight)


def fit_latent(q: np.ndarray, exponent: int, depth: int | None = None) -> LatentCode:
    """The code of a latent q [C, h, w]: its depth (unless given, the one whose scanned models
    cost the fewest bits, header fields included) and every pass's model, fitted to cost the
    least."""
    max_abs = int(np.abs(q).max()) if q.size else 0
    if not max_abs:  # nothing coded: the form a reader returns
        return LatentCode(0, 0, (PassCode(0),) * 3)
    deepest = min(MAX_DEPTH, max(1, (max(q.shape[1:]) - 1).bit_length()))  # deeper: the same first pass
    scanned = {}  # depth -> [(values, context, (model, estimated bits))] per pass
    for d in [depth] if depth else range(1, deepest + 1):
        passes = [(q[:, ys, xs].ravel(), context) for ys, xs, *context in _pass_models(q, 1 + 2 * d)]
        scanned[d] = [(v, c, _scan_pass(v, *c) if v.size else (PassCode(0), 0.0)) for v, c in passes]
    from .bitstream import latent_header_bits  # (bitstream imports this module)

    def bits(ps: list) -> float:
        return sum(b for *_, (_, b) in ps) + latent_header_bits(LatentCode(exponent, max_abs, tuple(m for *_, (m, _) in ps)))

    best = min(scanned.values(), key=bits)
    return LatentCode(exponent, max_abs, tuple(_refine_pass(m, v, *c, max_abs) if v.size else m for v, c, (m, _) in best))


def fit_code(q: np.ndarray, exponent: int, latent: bool = False, depth: int | None = None) -> TensorCode | LatentCode:
    """The code for integers q: support from their range and, fitted to cost the least, the
    Laplace scale (a weight tensor) or the depth (unless given) and every pass's model (a
    latent [C, h, w])."""
    if latent:
        return fit_latent(q, exponent, depth)
    max_abs = int(np.abs(q).max()) if q.size else 0
    if max_abs == 0:
        return TensorCode(0, 0, 0)
    scale = _best_scale_code(q, 0.0, lambda c: _bits_under(q, TensorCode(exponent, c, max_abs)))
    return TensorCode(exponent, scale, max_abs)


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
