"""The C++ CPU decode core (n2l._core via n2l.cpu) against the torch reference."""

from __future__ import annotations

import functools
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from n2l import cpu
from n2l.model import PRESETS, ModelConfig, N2LModel, to_uint8
from n2l.noise import noise_block, noise_pyramid, scale_shape

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason() is not None, reason=f"C++ core not built: {cpu.unavailable_reason()}"
)

SIZES = [(1, 1), (7, 13), (65, 33), (256, 256)]


def random_model(cfg: ModelConfig, seed: int, height: int | None = None, width: int | None = None) -> N2LModel:
    """Random weights scaled to unit gain, so latents stay O(1) and pixels span [0, 1] unclamped.
    Hybrid configs need the size; their coded latents are random small integers."""
    gen = torch.Generator().manual_seed(seed)
    model = N2LModel(cfg, height, width)
    last_synth = f"synth.{len(cfg.synth_hidden)}"
    with torch.no_grad():
        for name, conv in model.named_layers():
            fan_in = conv.weight[0].numel()
            gain = 0.3 if name.startswith("synth_res") else 1.0
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * gain / fan_in**0.5)
            conv.bias.copy_(torch.rand(conv.bias.shape, generator=gen) * 0.2 - 0.1)
            if name == last_synth:  # centre the output in [0, 1] with a spread of ~0.3
                conv.weight.mul_(0.15)
                conv.bias.fill_(0.5)
        for y in model.coded:
            y.copy_(torch.round(torch.randn(y.shape, generator=gen) * 1.5))
    return model


def random_config(rng: random.Random) -> ModelConfig:
    return ModelConfig(
        n_scales=rng.randint(1, 7),
        latent_channels=rng.randint(1, 6),
        gpp_hidden=rng.randint(1, 20),
        gpp_kernel=rng.choice([1, 3]),
        gpp_kernel_min_scale=rng.randint(0, 3),
        synth_hidden=tuple(rng.randint(1, 24) for _ in range(rng.randint(0, 2))),
        synth_residual=rng.randint(0, 2),
        out_channels=rng.choice([1, 3]),
    )


def reference(model: N2LModel, seed: int, height: int, width: int, torch_noise: bool = False) -> np.ndarray:
    """The torch network's pixels. The noise comes from the C++ generator unless torch_noise:
    it is bit-identical (test_noise_*), and n2l.noise in int64 torch ops costs seconds."""
    cfg = model.config
    if torch_noise:
        noise = model.noise(seed, height, width)
    else:
        noise = [
            torch.from_numpy(cpu.noise_block(seed, s, cfg.latent_channels, 0, 0, *scale_shape(height, width, s)))[None]
            for s in range(cfg.n_scales)
        ]
    with torch.inference_mode():
        return to_uint8(model(noise)).numpy()


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    """Within one level everywhere, and off by one on at most 0.1% of the values (at least 1)."""
    assert out.shape == ref.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert np.count_nonzero(diff) <= max(1, ref.size // 1000), f"{np.count_nonzero(diff)} values differ"


@pytest.fixture
def each_isa():
    """Iterate over every instruction-set variant this CPU runs (avx512, avx2, base)."""
    default = cpu.isa()

    def variants():
        for name in cpu.supported_isas():
            cpu.set_isa(name)
            yield name

    yield variants
    cpu.set_isa(default)


@pytest.mark.parametrize("case", range(6))
def test_random_configs_match_torch(case: int, each_isa) -> None:
    rng = random.Random(1000 + case)
    cfg = random_config(rng)
    # Make sure the edge cases are covered whatever the draws: both kernels, 0..2 residual
    # layers, grey and RGB.
    cfg = ModelConfig(**{
        **cfg.to_dict(),
        "gpp_kernel": (1, 3)[case % 2],
        "synth_residual": case % 3,
        "out_channels": (1, 3)[(case // 2) % 2],
    })
    model = random_model(cfg, seed=case)
    for height, width in SIZES:
        seed = rng.randrange(2**32)
        ref = reference(model, seed, height, width)
        if height * width > 100:
            assert len(np.unique(ref)) > 20, "test weights should not saturate the output"
        for _isa in each_isa():
            assert_close(cpu.decode_cpu(model, seed, height, width, threads=2), ref)


@pytest.mark.parametrize("upsampling", ["bilinear", "bicubic"])
@pytest.mark.parametrize("coded", [1, 3, 4])
def test_hybrid_coded_latents_match_torch(coded: int, upsampling: str, each_isa) -> None:
    """Transmitted coarse latents (and, with coded == n_scales, every latent) feed the same
    network, with either synthesis upsampling kernel."""
    cfg = ModelConfig(n_scales=4, latent_channels=2, gpp_hidden=6, gpp_kernel_min_scale=0, synth_hidden=(8,),
                      synth_residual=1, coded_scales=coded, synth_upsampling=upsampling)
    for height, width in [(1, 1), (7, 13), (65, 33)]:
        model = random_model(cfg, seed=coded, height=height, width=width)
        ref = reference(model, 5, height, width)
        for _isa in each_isa():
            assert_close(cpu.decode_cpu(model, 5, height, width, threads=2), ref)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_torch_end_to_end(name: str, each_isa) -> None:
    """Everything from the torch reference, its own noise generator included."""
    model = random_model(PRESETS[name], seed=7)
    ref = reference(model, 12345, 37, 70, torch_noise=True)
    for _isa in each_isa():
        assert_close(cpu.decode_cpu(model, 12345, 37, 70), ref)


def test_thread_counts_give_identical_pixels() -> None:
    cfg = ModelConfig(gpp_kernel_min_scale=0, synth_residual=2, synth_hidden=(12, 8))
    model = random_model(cfg, seed=3)
    # 300 rows: several 32-row bands at full resolution and several bands at the coarse scales.
    one = cpu.decode_cpu(model, 99, 300, 257, threads=1)
    for threads in (2, 3, None):
        np.testing.assert_array_equal(cpu.decode_cpu(model, 99, 300, 257, threads=threads), one)
    assert_close(one, reference(model, 99, 300, 257))


def test_noise_pyramid_bit_identical(each_isa) -> None:
    ref = noise_pyramid(77, 45, 67, n_scales=7, channels=3)
    for _isa in each_isa():
        for s, z in enumerate(ref):
            out = cpu.noise_block(77, s, 3, 0, 0, *z.shape[-2:])
            np.testing.assert_array_equal(out.view(np.uint32), z.numpy().view(np.uint32))


@pytest.mark.parametrize(
    "seed, scale, channels, y0, x0, height, width",
    [(0, 0, 1, 0, 0, 1, 1), (123, 2, 3, 5, 7, 9, 40), (2**32 - 1, 11, 4, 1000, 2000, 3, 77), (7, 0, 2, 0, 0, 33, 65)],
)
def test_noise_bit_identical(seed, scale, channels, y0, x0, height, width, each_isa) -> None:
    ref = noise_block(seed, scale, channels, y0, x0, height, width).numpy()
    for _isa in each_isa():
        out = cpu.noise_block(seed, scale, channels, y0, x0, height, width)
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_seed_is_taken_modulo_2_32() -> None:
    a = cpu.noise_block(-1, 0, 1, 0, 0, 2, 3)
    np.testing.assert_array_equal(a, cpu.noise_block(2**32 - 1, 0, 1, 0, 0, 2, 3))


def test_bad_weights_are_rejected() -> None:
    model = random_model(PRESETS["fast"], seed=0)
    with torch.no_grad():
        model.layer("synth.0").weight = torch.nn.Parameter(torch.zeros(8, 3, 1, 1))
    with pytest.raises(ValueError, match="synth.0"):
        cpu.decode_cpu(model, 0, 8, 8)


def test_decoder_backend_dispatch() -> None:
    from n2l.decoder import reconstruct, resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    model = random_model(PRESETS["fast"], seed=1)
    assert_close(reconstruct(model, 5, 40, 50, backend="cpu", threads=1), reference(model, 5, 40, 50))


def test_package_works_without_the_extension(tmp_path) -> None:
    """With n2l._core unimportable, n2l.cpu reports why (one warning), and decoding and the
    encoder's training fall back to torch."""
    code = """
import sys, warnings
sys.modules["n2l._core"] = None  # makes `from . import _core` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from n2l import cpu
    from n2l.decoder import backend_available, resolve_backend
    import torch
    assert cpu.unavailable_reason() and "n2l._core" in cpu.unavailable_reason()
    assert cpu.unavailable_reason()
    assert not backend_available("cpu")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    import numpy as np
    import n2l
    image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert n2l.decode(n2l.encode(image, iterations=3, verbose=False)).shape == image.shape
assert sum("C++ CPU core unavailable" in str(w.message) for w in caught) == 1, caught
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# The encoder's training kernels (n2l.cpu.conv3x3, upsample, pointwise) against the reference ops.

def _value_and_grads(f, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    out = f(*inputs)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return [out.detach(), *torch.autograd.grad(out, inputs, gy)]


def _assert_rel_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert not g.numel() or (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("c_in, c_out, height, width", [(3, 3, 64, 64), (8, 12, 33, 17), (3, 3, 1, 1),
                                                       (2, 5, 1, 7), (4, 3, 9, 1), (1, 1, 2, 40)])
def test_training_conv3x3_matches_torch(c_in, c_out, height, width, each_isa) -> None:
    gen = torch.Generator().manual_seed(c_in * 100 + height)
    inputs = [torch.randn(shape, generator=gen).requires_grad_()
              for shape in ((1, c_in, height, width), (c_out, c_in, 3, 3), (c_out,))]

    def reference_conv(x, w, b):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1,) * 4, mode="replicate"), w, b)

    want = _value_and_grads(reference_conv, inputs, 1)
    for _ in each_isa():
        _assert_rel_close(_value_and_grads(cpu.conv3x3, inputs, 1), want)


@pytest.mark.parametrize("channels, h, w, factor, height, width", [(1, 128, 128, 2, 256, 256), (3, 4, 5, 8, 29, 40),
                                                                 (1, 1, 1, 64, 64, 64), (2, 3, 7, 2, 5, 13)])
@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
def test_training_upsample_matches_torch(channels, h, w, factor, height, width, kernel, each_isa) -> None:
    from n2l.model import upsample

    x = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(h)).requires_grad_()
    want = _value_and_grads(lambda t: upsample(t, factor, height, width, kernel), [x], 2)
    for _ in each_isa():
        _assert_rel_close(_value_and_grads(lambda t: cpu.upsample(t, factor, height, width, kernel), [x], 2), want)


def _pointwise_inputs(widths: tuple[int, ...], height: int, width: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, widths[0], height, width)]
    shapes += [(cout, cin, 1, 1) for cin, cout in zip(widths[:-1], widths[1:])] + [(cout,) for cout in widths[1:]]
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]


def _pointwise(x: torch.Tensor, *params: torch.Tensor, threads: int = 1) -> torch.Tensor:
    n = len(params) // 2
    return cpu.pointwise(x, list(zip(params[:n], params[n:])), threads)


@pytest.mark.parametrize("widths, height, width", [((7, 12, 3), 64, 64), ((2, 4, 2), 5, 7), ((1, 1), 1, 1),
                                                   ((28, 40, 24, 3), 9, 33), ((3, 64, 64, 1), 3, 300)])
def test_training_pointwise_matches_torch(widths, height, width, each_isa) -> None:
    inputs = _pointwise_inputs(widths, height, width, sum(widths))

    def reference_stack(x, *params):
        n = len(params) // 2
        for i, (w, b) in enumerate(zip(params[:n], params[n:])):
            x = torch.nn.functional.conv2d(x if i == 0 else torch.relu(x), w, b)
        return x

    want = _value_and_grads(reference_stack, inputs, 4)
    for _ in each_isa():
        _assert_rel_close(_value_and_grads(_pointwise, inputs, 4), want)


def _rate_parts(seed: int) -> list[torch.Tensor]:
    """Parts like the rate proxy's: dense weights, sparse latents (many values near 0, the
    Laplace's centre bin), an all-zero part, an empty one, one whose scale is clamped, and one
    long enough to span several bands."""
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.randn(5000, generator=gen).round() * (torch.rand(5000, generator=gen) < 0.2)
    return [p.requires_grad_() for p in (
        torch.randn(300, generator=gen) * 30, sparse + torch.rand(5000, generator=gen) - 0.5, torch.zeros(10),
        torch.zeros(0), torch.randn(7, generator=gen) * 1e-5, torch.randn(9, generator=gen) * 0.2,
        torch.randn(12000, generator=gen) * 2)]


def _rate_reference(*parts: torch.Tensor, weights: list[float]) -> torch.Tensor:
    from n2l.encoder import laplace_bits

    return sum(w * laplace_bits(p) if p.numel() else p.sum() for w, p in zip(weights, parts))


def test_training_rate_proxy_matches_torch() -> None:
    parts, weights = _rate_parts(7), [1.0, 0.4, 1.0, 1.0, 1.0, 2.0, 0.4]
    want = _value_and_grads(functools.partial(_rate_reference, weights=weights), parts, 5)
    got = _value_and_grads(lambda *ps: cpu.laplace_bits(list(ps), weights, 2), parts, 5)
    assert abs(got[0].item() / want[0].item() - 1) < 1e-5
    _assert_rel_close(got[1:], want[1:])


@pytest.mark.parametrize("coarse_latent_rate", [1.0, 0.4])
def test_training_rate_proxy_of_a_network_matches_torch(coarse_latent_rate: float) -> None:
    from n2l.encoder import _RateProxy

    cfg = ModelConfig(latent_channels=1, coded_scales=5, gpp_hidden=4, n_scales=6)
    net = random_model(cfg, seed=3, height=37, width=45)
    results = []
    for threads in (None, 2):
        rate = _RateProxy(net, -6.0, coarse_latent_rate, threads)
        rate.latent_factors = [0.3 + 0.1 * i for i in range(len(rate.latent_factors))]  # as calibrated
        params = dict(net.named_parameters())
        bits = rate.bits(params)
        results.append([bits.detach(), *torch.autograd.grad(bits, [*params.values(), rate.log2_steps])])
    assert abs(results[1][0].item() / results[0][0].item() - 1) < 1e-5
    _assert_rel_close(results[1][1:], results[0][1:])


@pytest.mark.parametrize("channels", [1, 2])
def test_training_checkerboard_matches_torch_bit_for_bit(channels: int) -> None:
    """The core's checkerboard model gives the reference's residuals and gradients exactly, so
    moving it changes no stream (some values exactly 0, as trained latents have)."""
    from n2l.encoder import checkerboard_residuals

    gen = torch.Generator().manual_seed(11)
    shapes = ((1, 1), (2, 3), (5, 4), (16, 16), (33, 47))
    latents = [torch.randn(channels, h, w, generator=gen) * 3 * (torch.rand(channels, h, w, generator=gen) < 0.5)
               for h, w in shapes]

    def flat(f, *vs: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.flatten() for parts in f(*vs) for part in parts])

    want = _value_and_grads(functools.partial(flat, checkerboard_residuals), [v.requires_grad_() for v in latents], 2)
    got = _value_and_grads(functools.partial(flat, cpu.checkerboard_residuals), latents, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_training_kernels_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(5)
    conv = [torch.randn(shape, generator=gen).requires_grad_() for shape in ((1, 3, 70, 50), (3, 3, 3, 3), (3,))]
    stack = _pointwise_inputs((7, 12, 3), 90, 101, 6)  # several bands of pixels

    def rate(*parts: torch.Tensor, threads: int) -> torch.Tensor:
        return cpu.laplace_bits(list(parts), [1.0, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0], threads)

    for f, inputs in ((cpu.conv3x3, conv), (_pointwise, stack), (rate, _rate_parts(8))):
        one, three = (_value_and_grads(functools.partial(f, threads=n), inputs, 3) for n in (1, 3))
        for a, b in zip(one, three):
            assert torch.equal(a, b)


def test_training_kernels_called_from_several_threads_at_once() -> None:
    """Candidates trained side by side call the core at the same time: one borrows its worker
    threads, the others run alone, and every call gives the result of a call made alone."""
    from concurrent.futures import ThreadPoolExecutor

    stacks = [_pointwise_inputs((7, 16, 3), 64, 80, seed) for seed in range(4)]
    run = functools.partial(_value_and_grads, functools.partial(_pointwise, threads=2), seed=3)
    alone = [run(inputs) for inputs in stacks]
    for _ in range(5):
        with ThreadPoolExecutor(len(stacks)) as pool:
            together = list(pool.map(run, stacks))
        for a, b in zip(alone, together):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("cfg", [ModelConfig(gpp_kernel_min_scale=0, synth_residual=2),
                                 ModelConfig(latent_channels=1, coded_scales=5, gpp_hidden=4, n_scales=6)])
def test_training_network_matches_the_reference(cfg: ModelConfig) -> None:
    from n2l.encoder import _TrainingModel

    reference_net = random_model(cfg, seed=4, height=37, width=45)
    training_net = _TrainingModel(cfg, 37, 45)
    training_net.load_state_dict(reference_net.state_dict())
    noise = reference_net.noise(8, 37, 45)
    results = []
    for net in (reference_net, training_net):
        out = net(noise)
        loss = (out - 0.5).square().mean()
        results.append([out.detach(), *torch.autograd.grad(loss, list(net.parameters()))])
    _assert_rel_close(results[1], results[0])


def test_training_kernels_reject_bad_shapes() -> None:
    from n2l import _core

    x, w, b = (np.zeros(s, np.float32) for s in ((3, 8, 8), (3, 3, 3, 3), (3,)))
    with pytest.raises(ValueError, match="conv3x3"):
        _core.conv3x3_forward(x, np.zeros((3, 2, 3, 3), np.float32), b, np.zeros((3, 8, 8), np.float32), 1)
    with pytest.raises(ValueError, match="conv3x3"):
        _core.conv3x3_forward(x, w, b, np.zeros((3, 8, 7), np.float32), 1)
    with pytest.raises(ValueError, match="upsample"):
        _core.upsample_forward(np.zeros((1, 4, 4), np.float32), 2, np.zeros((1, 9, 8), np.float32))
    with pytest.raises(ValueError, match="pointwise"):
        _core.pointwise_forward(np.zeros((7, 10), np.float32), [np.zeros((12, 6), np.float32)],
                                [np.zeros(12, np.float32)], np.zeros((12, 10), np.float32), 1)
    with pytest.raises(ValueError, match="pointwise"):
        _core.pointwise_forward(np.zeros((7, 10), np.float32), [np.zeros((65, 7), np.float32)],
                                [np.zeros(65, np.float32)], np.zeros((65, 10), np.float32), 1)
    shapes = np.array(((2, 2), (3, 2)), np.int32)
    with pytest.raises(ValueError, match="checkerboard"):
        _core.checkerboard_forward(np.zeros((1, 11), np.float32), shapes, np.zeros(11, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="checkerboard"):
        _core.checkerboard_backward(np.zeros(10, np.float32), shapes, np.zeros(2, np.float32), np.zeros((2, 10), np.float32))
    values, grad = np.zeros(10, np.float32), np.zeros(10, np.float32)
    for offsets in ((0, 4, 9), (0, 6, 3, 10), (1, 10)):
        with pytest.raises(ValueError, match="laplace_bits"):
            _core.laplace_bits(values, np.array(offsets, np.int32), np.ones(len(offsets) - 1, np.float32), grad, 1)
    with pytest.raises(ValueError, match="laplace_bits"):
        _core.laplace_bits(values, np.array((0, 10), np.int32), np.ones(1, np.float32), np.zeros(9, np.float32), 1)
