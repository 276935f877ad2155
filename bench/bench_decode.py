"""End-to-end decode latency of real bitstreams: `n2l.decode(buf)` per backend (pytest-benchmark).

    python -m pytest bench/bench_decode.py --benchmark-enable --benchmark-columns=min,median,max

Includes parsing, entropy decoding, weight upload, noise, network and the copy of the pixels to
host memory. The streams are real encodes (few iterations: latency does not depend on how well
the weights are trained). GPU paths (torch and triton on cuda) run when a CUDA device is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import n2l
from n2l.decoder import backend_available

SIZES = ((256, 256), (768, 512))  # width x height
PATHS = (("torch", "cpu"), ("cpu", "cpu"), ("torch", "cuda"), ("triton", "cuda"))  # (backend, device)


STREAMS = [(size, mode) for size in SIZES for mode in ("pure", "hybrid")]


@pytest.fixture(scope="module", params=STREAMS, ids=lambda p: f"{p[0][0]}x{p[0][1]}-{p[1]}")
def stream(request) -> bytes:
    """Pure mode at the `default` preset; hybrid at quality 3 (its latents take most of the
    entropy decoding)."""
    (width, height), mode = request.param
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    if mode == "pure":
        return n2l.encode(image, quality=4, preset="default", iterations=2, verbose=False)
    return n2l.encode(image, quality=3, mode="hybrid", iterations=2, verbose=False)


@pytest.mark.parametrize(("backend", "device"), PATHS, ids=[f"{b}-{d}" for b, d in PATHS])
def test_decode_latency(benchmark, stream: bytes, backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not backend_available(backend):
        pytest.skip(f"backend {backend} unavailable")
    header = n2l.read_header(stream)
    benchmark.group = f"{header.width}x{header.height} {'hybrid' if header.config.coded_scales else 'pure'}"
    n2l.decode(stream, device=device, backend=backend)  # compile / warm up outside the timing
    pixels = benchmark(n2l.decode, stream, device=device, backend=backend)
    assert pixels.shape == (header.height, header.width, 3)
