"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import torch

from n2l.model import PRESETS, N2LModel


def bench_model(name: str, device: torch.device | str = "cpu") -> N2LModel:
    """A preset network with fixed random weights (latency does not depend on the values)."""
    torch.manual_seed(0)
    model = N2LModel(PRESETS[name]).eval()
    with torch.no_grad():
        for _, conv in model.named_layers():
            conv.weight.normal_(0.0, 0.5 / conv.weight[0].numel() ** 0.5)
            conv.bias.uniform_(-0.1, 0.1)
    return model.to(device)
