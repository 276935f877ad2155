"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import n2l
from n2l.evaluate.runner import center_crop
from n2l.model import PRESETS, N2LModel

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"  # development data beside the checkout


def kodak_crop(name: str, size: int) -> np.ndarray:
    """The centre size x size crop of a Kodak image by name (e.g. "kodim23"); 0: the whole image."""
    image = n2l.load_image(KODAK / f"{name}.png")
    return center_crop(image, size) if size else image


def rd_cost(psnr: float, bpp: float, lmbda: float) -> float:
    """J = MSE (on [0, 1]) + lambda x bpp, the encoder's training objective."""
    return 10 ** (-psnr / 10) + lmbda * bpp


def bench_model(name: str, device: torch.device | str = "cpu") -> N2LModel:
    """A preset network with fixed random weights (latency does not depend on the values)."""
    torch.manual_seed(0)
    model = N2LModel(PRESETS[name]).eval()
    with torch.no_grad():
        for _, conv in model.named_layers():
            conv.weight.normal_(0.0, 0.5 / conv.weight[0].numel() ** 0.5)
            conv.bias.uniform_(-0.1, 0.1)
    return model.to(device)
