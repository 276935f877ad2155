"""The noise generator: golden values, an independent pure-Python Philox, statistics, tiling."""

import struct

import pytest
import torch

from n2l.noise import noise_block, noise_pyramid, scale_shape

M32 = 0xFFFFFFFF


def philox_python(seed: int, ctr: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Philox4x32-10 written from the Random123 paper with Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = seed, 0
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def sample_python(seed: int, scale: int, channel: int, y: int, x: int) -> float:
    words = philox_python(seed, (x, y, channel, scale))
    m = sum((w >> 16) + (w & 0xFFFF) for w in words) - 262140
    k = struct.unpack("<f", bytes.fromhex("71c49c37"))[0]  # 0x379CC471
    return struct.unpack("<f", struct.pack("<f", float(m) * k))[0]  # the product rounded to float32


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


# (seed, scale, channel, y, x) -> float32 bits; any change here is a format break.
GOLDEN = {
    (0, 0, 0, 0, 0): 0x400FBC8B,
    (1, 0, 0, 0, 0): 0xBD2F2376,
    (0, 3, 2, 5, 7): 0x3EA42773,
    (123456789, 6, 7, 1, 3): 0x3EB3A046,
    (0xFFFFFFFF, 11, 31, 16383, 16383): 0x3F15AFD2,
}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_values(key):
    seed, scale, channel, y, x = key
    z = noise_block(seed, scale, channel + 1, y, x, 1, 1)[channel, 0, 0].item()
    assert bits(z) == GOLDEN[key]
    assert bits(sample_python(*key)) == GOLDEN[key]


def test_matches_independent_python_implementation():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        seed, scale, channel, y, x = (int(v) for v in torch.randint(0, 2**31, (5,), generator=g))
        scale, channel, y, x = scale % 12, channel % 8, y % 5000, x % 5000
        z = noise_block(seed, scale, channel + 1, y, x, 1, 1)[channel, 0, 0].item()
        assert bits(z) == bits(sample_python(seed, scale, channel, y, x))


def test_statistics_close_to_standard_gaussian():
    z = noise_block(7, 0, 4, 0, 0, 256, 256)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.01
    assert z.abs().max().item() < 4.95  # Irwin-Hall(8) support
    # Channels and scales are different streams.
    assert not torch.equal(z[0], z[1])
    assert not torch.equal(noise_block(7, 1, 1, 0, 0, 8, 8), noise_block(7, 0, 1, 0, 0, 8, 8))


def test_any_window_equals_the_slice_of_the_whole():
    whole = noise_block(99, 2, 3, 0, 0, 37, 53)
    assert torch.equal(whole[:, 11:20, 30:53], noise_block(99, 2, 3, 11, 30, 9, 23))
    assert torch.equal(whole[:, 36:37, 0:1], noise_block(99, 2, 3, 36, 0, 1, 1))


def test_pyramid_shapes():
    pyramid = noise_pyramid(5, 33, 7, 4, 2)
    assert [tuple(z.shape) for z in pyramid] == [(2, 33, 7), (2, 17, 4), (2, 9, 2), (2, 5, 1)]
    assert scale_shape(1, 1, 6) == (1, 1)
    assert all(z.dtype == torch.float32 for z in pyramid)
