"""Entropy coding of weights and transmitted latents (n2l.weights), and the encoder's rate proxy."""

import dataclasses

import numpy as np
import pytest
import torch

from n2l.encoder import checkerboard_bits, checkerboard_residuals, laplace_bits
from n2l.weights import (
    SCALE_CODE_RANGE,
    LatentCode,
    TensorCode,
    decode_tensors,
    encode_tensors,
    fit_code,
    fit_latent,
    move_bits,
    tensor_bits,
)


def _smooth_latent(shape, seed=0) -> np.ndarray:
    """Integers with strong spatial correlation, like a trained coarse latent."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    field = np.cumsum(np.cumsum(rng.normal(size=(c, h, w)), axis=1), axis=2) / 3
    return np.round(field).astype(np.int32)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 5), (2, 7, 13), (1, 32, 33)])
def test_latent_round_trip(shape):
    q = _smooth_latent(shape)
    weights = np.array([3, -1, 0, 2, 0, 0, -7], dtype=np.int32)
    codes = [fit_code(weights, 5), fit_code(q, 0, latent=True)]
    assert isinstance(codes[1], LatentCode) and not isinstance(codes[0], LatentCode)
    payload = encode_tensors([weights, q], codes)
    back = decode_tensors(payload, codes, [weights.shape, q.shape])
    np.testing.assert_array_equal(back[0], weights)
    np.testing.assert_array_equal(back[1], q)


def test_prediction_pays_on_smooth_latents_and_not_on_noise():
    smooth = _smooth_latent((1, 48, 48))
    code = fit_code(smooth, 0, latent=True)
    assert code.passes[1].weight > 8 and code.passes[2].weight > 8
    flat = TensorCode(0, fit_code(smooth.ravel(), 0).scale_code, code.max_abs)
    assert tensor_bits(smooth, code) < 0.8 * tensor_bits(smooth.ravel(), flat)
    noise = np.random.default_rng(1).laplace(0, 2, size=(1, 48, 48)).round().astype(np.int32)
    assert all(p.weight <= 2 for p in fit_code(noise, 0, latent=True).passes)  # no spatial correlation


def test_context_levels_pay_where_activity_is_clustered():
    """Zeros on one half, large values on the other: the scale must follow the neighbours."""
    rng = np.random.default_rng(5)
    q = np.zeros((1, 48, 48), np.int32)
    q[:, :, 24:] = rng.laplace(0, 6, size=(1, 48, 24)).round()
    code = fit_code(q, 0, latent=True)
    assert code.passes[1].slope > 0 and code.passes[2].slope > 0
    # Without context levels: passes B and C at the best scale they can share.
    flat = min((dataclasses.replace(code, passes=(code.passes[0], *(dataclasses.replace(p, scale_code=c, slope=0)
                                                                     for p in code.passes[1:])))
                for c in range(-16, 48)), key=lambda f: tensor_bits(q, f))
    assert tensor_bits(q, code) < 0.8 * tensor_bits(q, flat)


def test_rate_proxies_follow_the_real_coder():
    """The differentiable estimates used in training: within 10% of the coded size for weights;
    for latents, the checkerboard model charges more than the coder's passes, which also
    predict the anchors (smooth latents: 15-35% more than depth 1, 50-90% more than the best depth)."""
    smooth = _smooth_latent((1, 48, 48), seed=2)
    proxy = checkerboard_bits(torch.from_numpy(smooth).float()).item()
    code = fit_code(smooth, 0, latent=True)
    depth1 = fit_latent(smooth, 0, 1)
    assert 1.15 * tensor_bits(smooth, depth1) < proxy < 1.35 * tensor_bits(smooth, depth1)
    assert 1.5 * tensor_bits(smooth, code) < proxy < 1.9 * tensor_bits(smooth, code)


@pytest.mark.parametrize("shape", [(1, 48, 48), (1, 33, 70)])
def test_deeper_passes_pay_on_smooth_latents(shape):
    """The coder picks the depth with the fewest bits, header included: on a smooth latent a
    deeper one, whose first pass holds few values and the others are predicted."""
    smooth = _smooth_latent(shape, seed=4)
    code = fit_code(smooth, 0, latent=True)
    assert code.depth > 1 and len(code.passes) == 1 + 2 * code.depth
    depth1 = fit_latent(smooth, 0, 1)
    assert tensor_bits(smooth, code) < 0.9 * tensor_bits(smooth, depth1)
    payload = encode_tensors([smooth], [code])
    np.testing.assert_array_equal(decode_tensors(payload, [code], [shape])[0], smooth)
    w = np.random.default_rng(3).laplace(0, 3, size=500).round().astype(np.int32)
    assert laplace_bits(torch.from_numpy(w).float()).item() == pytest.approx(tensor_bits(w, fit_code(w, 0)), rel=0.1)


def _sparse(shape, seed=0) -> np.ndarray:
    """Mostly zeros with a few small values, like a trained full-resolution latent at low rate."""
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < 0.03
    return np.where(keep, rng.laplace(0, 1.5, shape).round(), 0).astype(np.int32)


@pytest.mark.parametrize("latent", [False, True])
def test_fitted_scale_costs_what_the_best_signalled_scale_costs(latent):
    """On sparse tensors the mean |q| underestimates the Laplace scale tenfold; the fit must
    still find (within 0.5%) the cheapest of all signalled scales (of each latent pass, the
    others held)."""
    q = _sparse((1, 64, 64), seed=4)
    q = q if latent else q.ravel()
    code = fit_code(q, 0, latent=latent)
    if not latent:
        brute = min(tensor_bits(q, dataclasses.replace(code, scale_code=c)) for c in range(*SCALE_CODE_RANGE))
        assert tensor_bits(q, code) <= 1.005 * brute
        return
    def with_scale(p: int, c: int) -> LatentCode:
        passes = list(code.passes)
        passes[p] = dataclasses.replace(passes[p], scale_code=c)
        return dataclasses.replace(code, passes=tuple(passes))

    for p in range(3):
        brute = min(tensor_bits(q, with_scale(p, c)) for c in range(*SCALE_CODE_RANGE))
        assert tensor_bits(q, code) <= 1.005 * brute


def test_coarse_latent_rate_weights_all_but_the_finest_latent():
    """The training proxy charges the coarse coded latents `coarse_latent_rate` x their
    checkerboard bits; the layers and the finest coded latent keep full weight."""
    from n2l.encoder import HYBRID_CONFIGS, _RateProxy
    from n2l.model import N2LModel

    model = N2LModel(HYBRID_CONFIGS[0], 32, 32)
    params = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    coarse = [p for n, p in params.items() if n.startswith("coded.")][:-1]
    coarse_bits = laplace_bits(*(r for parts in checkerboard_residuals(*(p[0] for p in coarse)) for r in parts))
    full, light = _RateProxy(model, -8.0), _RateProxy(model, -8.0, 0.4)  # latents start at step 1
    assert len(coarse) > 1 and coarse_bits > 0
    assert (full.bits(params) - light.bits(params)).item() == pytest.approx(0.6 * coarse_bits.item(), rel=1e-4)


def test_calibration_weights_each_latent_by_the_coders_bits_over_the_proxys():
    """`_RateProxy.calibrate` weights each coded latent's proxy bits by what the coder spends
    on its rounded values over what the checkerboard charges: well under 1 on smooth latents,
    1 on white noise (the coder can predict nothing), and the proxy's bits follow."""
    from n2l.encoder import HYBRID_CONFIGS, LATENT_FACTOR_MIN, _RateProxy
    from n2l.model import N2LModel

    model = N2LModel(HYBRID_CONFIGS[0], 128, 128)
    rate = _RateProxy(model, -8.0)  # latents at step 1
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    coded = [n for n in params if n.startswith("coded.")]
    for i, n in enumerate(coded):  # odd: smooth integers; even: white Laplace noise
        shape = params[n].shape[1:]
        values = _smooth_latent(shape, seed=i) if i % 2 else np.random.default_rng(i).laplace(size=shape) * 3
        params[n] = torch.from_numpy(values).float()[None] + 0.2  # off the integers: calibrate rounds
    before = rate.bits(params)
    rate.calibrate(params)
    for i, (n, factor) in enumerate(zip(coded, rate.latent_factors)):
        q = np.round(params[n][0].numpy()).astype(np.int32)
        ratio = tensor_bits(q, fit_latent(q, 0)) / laplace_bits(*checkerboard_residuals(torch.from_numpy(q).float())[0])
        assert factor == pytest.approx(min(max(ratio.item(), LATENT_FACTOR_MIN), 1.0), rel=1e-6)
        if q.size >= 1024:  # the two finest
            assert factor < 0.8 if i % 2 else factor == 1.0
    weighted = sum(f * laplace_bits(*checkerboard_residuals(params[n][0])[0]) for n, f in zip(coded, rate.latent_factors))
    full = sum(laplace_bits(*checkerboard_residuals(params[n][0])[0]) for n in coded)
    assert (before - rate.bits(params)).item() == pytest.approx((full - weighted).item(), rel=1e-4)


def test_move_bits_on_latents_smaller_than_their_pass_spacing():
    """Deep passes of a thin latent have neighbour offsets beyond its size: no pair, no error."""
    q = _smooth_latent((1, 1, 9), seed=6)
    code = fit_latent(q, 0, 4)
    assert move_bits(q, code).shape == (2, q.size)
