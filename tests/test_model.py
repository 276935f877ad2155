"""Model configuration: presets, exact MAC counting, bitstream layer order, upsampling."""

import math

import pytest
import torch

from n2l import model
from n2l.model import PRESETS, ModelConfig, N2LModel, upsample


def test_presets_span_the_decode_cost_range():
    macs = {name: cfg.macs_per_pixel() for name, cfg in PRESETS.items()}
    assert 300 <= macs["fast"] < macs["default"] < macs["best"] <= 3000


def test_macs_count_matches_a_hand_count():
    # One scale, 1x1 GPP: gpp.0.0 (C -> G), gpp.0.1 (G -> 2C), reparameterization (C),
    # then synth.0 (C -> 5), synth.1 (5 -> 3) and one 3x3 residual (3 -> 3).
    cfg = ModelConfig(n_scales=1, latent_channels=2, gpp_hidden=4, gpp_kernel=1, synth_hidden=(5,), synth_residual=1)
    assert cfg.macs_per_pixel(7, 9) == 2 * 4 + 4 * 4 + 2 + 2 * 5 + 5 * 3 + 9 * 3 * 3


def test_macs_with_a_size_count_the_real_scale_areas():
    cfg = PRESETS["default"]
    assert cfg.macs_per_pixel(4096, 4096) == pytest.approx(cfg.macs_per_pixel(), rel=1e-3)
    assert cfg.macs_per_pixel(5, 3) > cfg.macs_per_pixel()  # ceil() makes tiny scales relatively dearer


def test_parameters_and_layer_order_match_the_module():
    for cfg in PRESETS.values():
        model = N2LModel(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.n_params()
        names = [name for name, _ in model.named_layers()]
        assert names[0] == f"gpp.{cfg.n_scales - 1}.0" and names[-1].startswith("synth")


def test_invalid_configs_are_rejected():
    for bad in (dict(n_scales=0), dict(gpp_kernel=2), dict(synth_hidden=(0,)), dict(out_channels=2)):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


@pytest.mark.parametrize("big", [False, True], ids=["matrices", "interpolate"])
def test_bicubic_upsample_follows_the_documented_formula(big, monkeypatch):
    """docs/FORMAT.md: t = (i + 0.5) / f - 0.5, taps floor(t) - 1 .. floor(t) + 2 clamped,
    cubic convolution weights with a = -0.75 (which sum to 1)."""
    if big:
        monkeypatch.setattr(model, "MATRIX_UPSAMPLE_MAX_INPUT", 5 * 4 - 1)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    f, h, w = 4, 19, 13
    out = upsample(x, f, h, w, "bicubic")
    assert out.shape == (1, 2, 19, 13)

    def c1(u):
        return (1.25 * u - 2.25) * u * u + 1

    def c2(u):
        return ((-0.75 * u + 3.75) * u - 6) * u + 3

    def taps(n, i):
        t = (i + 0.5) / f - 0.5
        lo, d = math.floor(t), t - math.floor(t)
        weights = (c2(d + 1), c1(d), c1(1 - d), c2(2 - d))
        assert sum(weights) == pytest.approx(1)
        return [(min(max(lo - 1 + k, 0), n - 1), weights[k]) for k in range(4)]

    for i in range(h):
        for j in range(w):
            expect = sum(a * b * x[..., y0, x0] for y0, a in taps(5, i) for x0, b in taps(4, j))
            assert torch.allclose(out[..., i, j], expect, atol=1e-12)


@pytest.mark.parametrize("big", [False, True], ids=["matrices", "interpolate"])
def test_upsample_follows_the_documented_formula(big, monkeypatch):
    """docs/FORMAT.md: t = max(0, (i + 0.5) / f - 0.5), taps floor(t) and +1 clamped; the
    same on both sides of the size where the matrix products give way to F.interpolate."""
    if big:
        monkeypatch.setattr(model, "MATRIX_UPSAMPLE_MAX_INPUT", 5 * 4 - 1)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    f, h, w = 4, 19, 13
    out = upsample(x, f, h, w)
    assert out.shape == (1, 2, 19, 13)

    def taps(n, i):
        t = max(0.0, (i + 0.5) / f - 0.5)
        i0 = min(math.floor(t), n - 1)
        return i0, min(i0 + 1, n - 1), t - i0

    for i in range(h):
        y0, y1, a = taps(5, i)
        for j in range(w):
            x0, x1, b = taps(4, j)
            expect = (1 - a) * ((1 - b) * x[..., y0, x0] + b * x[..., y0, x1]) + a * (
                (1 - b) * x[..., y1, x0] + b * x[..., y1, x1]
            )
            assert torch.allclose(out[..., i, j], expect, atol=1e-12)
