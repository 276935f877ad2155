"""Shared fixtures: small committed Kodak crops and one encoded stream reused across tests."""

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import n2l

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def crop64() -> np.ndarray:
    """Centre 64x64 crop of kodim15 (uint8 [64, 64, 3])."""
    return np.asarray(Image.open(DATA / "kodim15_64.png").convert("RGB"))


@pytest.fixture
def quick_polish(monkeypatch) -> None:
    """The encoder's final RD polish in one cycle at a tenth of its exact-move budgets, for
    tests of control flow (rate control, seeds, the eval) that need not polish their streams in
    full: on small images its forward pass per try dominates their time. The polish's own
    tests run it whole."""
    from n2l import encoder

    monkeypatch.setattr(encoder, "POLISH_CYCLES", 1)
    monkeypatch.setattr(encoder, "_refine_weights", functools.partial(encoder._refine_weights, budget=200))
    monkeypatch.setattr(encoder, "_refine_coarse_latents", functools.partial(encoder._refine_coarse_latents, budget=300))


@pytest.fixture(scope="session")
def encoded64(crop64) -> bytes:
    """crop64 encoded in pure mode at the default quality with a short schedule."""
    return n2l.encode(crop64, quality=4, mode="pure", iterations=400, verbose=False)


@pytest.fixture(scope="session")
def tiny_stream() -> bytes:
    """A very small valid stream (12x10 RGB, pure mode, fast preset) for exhaustive corruption tests."""
    rng = np.random.default_rng(0)
    img = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
    return n2l.encode(img, quality=0, mode="pure", iterations=20, verbose=False)
