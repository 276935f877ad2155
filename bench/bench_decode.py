"""End-to-end decode latency of real bitstreams: `n2l.decode(buf)` per backend (pytest-benchmark).

    python -m pytest bench/bench_decode.py --benchmark-enable --benchmark-columns=min,median,max

Includes parsing, entropy decoding, weight upload, noise and network. The streams are real
encodes (few iterations: latency does not depend on how well the weights are trained).
"""

from __future__ import annotations

import numpy as np
import pytest

import n2l
from n2l.decoder import backend_available

SIZES = ((256, 256), (768, 512))  # width x height


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def stream(request) -> bytes:
    width, height = request.param
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return n2l.encode(image, quality=4, preset="default", iterations=2, verbose=False)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_decode_latency(benchmark, stream: bytes, backend: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"backend {backend} unavailable")
    pixels = benchmark(n2l.decode, stream, device="cpu", backend=backend)
    header = n2l.read_header(stream)
    assert pixels.shape == (header.height, header.width, 3)
