"""Seeded, device-independent noise pyramid.

Every sample is a pure function of (seed, scale, channel, y, x):

1. Philox4x32-10 (Salmon et al., 2011; the generator behind ``tl.randint``) with key
   (k0, k1) = (seed, 0) and counter (c0, c1, c2, c3) = (x, y, channel, scale) gives four
   uint32 words.
2. The eight 16-bit halves of those words are summed (Irwin-Hall of 8 uniforms: close to
   Gaussian, support +-4.9 sigma); the centred integer sum ``m`` is exact.
3. ``z = float32(m) * NOISE_SCALE`` — one exactly rounded float32 multiply, so torch CPU,
   torch CUDA, Triton and C++ all produce the same bits (no log/cos/fma involved).

See docs/FORMAT.md for the exact specification. The torch code below keeps integers in
int64 and splits 32x32-bit products into 16-bit halves so nothing ever overflows.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
# Centre of the sum of eight uniform 16-bit integers: 8 * 65535 / 2.
NOISE_CENTER = 262140
# float32(1 / sqrt(8 * (65536**2 - 1) / 12)) = 0x379CC471, the standard deviation of that sum.
NOISE_SCALE = 1.8688124328036793e-05


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a constant a and uint32 b."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2**48
    p_hi = b * a_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi & MASK32, lo


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; key = (seed, 0)."""
    k0, k1 = seed & MASK32, 0
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def words_to_noise(words: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Map four uint32 words (int64 tensors) to float32 samples of unit variance."""
    total = sum((w >> 16) + (w & 0xFFFF) for w in words)
    return (total - NOISE_CENTER).to(torch.float32) * NOISE_SCALE


def noise_block(
    seed: int,
    scale: int,
    channels: int,
    y0: int,
    x0: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise of one scale on the window [y0, y0+height) x [x0, x0+width): [channels, height, width]."""
    kw = dict(dtype=torch.int64, device=device)
    c = torch.arange(channels, **kw).view(-1, 1, 1)
    y = torch.arange(y0, y0 + height, **kw).view(1, -1, 1)
    x = torch.arange(x0, x0 + width, **kw).view(1, 1, -1)
    shape = (channels, height, width)
    counters = (
        x.expand(shape),
        y.expand(shape),
        c.expand(shape),
        torch.full(shape, scale, **kw),
    )
    return words_to_noise(philox4x32(seed, *counters))


def scale_shape(height: int, width: int, scale: int) -> tuple[int, int]:
    """Size of scale `scale` of the pyramid: ceil(H / 2**s) x ceil(W / 2**s)."""
    f = 1 << scale
    return -(-height // f), -(-width // f)


def noise_pyramid(
    seed: int,
    height: int,
    width: int,
    n_scales: int,
    channels: int,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """The whole pyramid, finest first: list of [channels, ceil(H/2^s), ceil(W/2^s)]."""
    return [
        noise_block(seed, s, channels, 0, 0, *scale_shape(height, width, s), device=device)
        for s in range(n_scales)
    ]
