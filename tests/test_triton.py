"""Triton decode path (n2l.kernels) against the torch reference.

Runs the kernels on a GPU when one is present, else on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set below before triton is imported). Skipped without triton.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton/n2l.kernels._triton: @triton.jit decides at
    # decoration time whether it builds an interpreted function.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import n2l.kernels as nk

import n2l
from n2l.decoder import reconstruct, resolve_backend
from n2l.model import PRESETS, ModelConfig, N2LModel, to_uint8
from n2l.noise import noise_block

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The reference must be exact fp32 on the GPU too: cuDNN convolutions default to TF32 there.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
INTERPRETED = nk.interpreted()

# Measured in the interpreter over these configs and sizes up to 96x80: latent error <= 1.2e-5
# absolute (<= 4e-7 relative to the largest latent, |y| up to ~30; float sums in another order),
# synthesis output <= 2e-6, 1-level pixel flips on <= 0.013% of pixels. Tolerances leave ~10x headroom for GPU exp/log approximations.
LATENT_RTOL, LATENT_ATOL = 2e-5, 1e-4
SYNTH_RTOL, SYNTH_ATOL = 2e-5, 2e-5
# Pixels: at most 1 level off, on at most 0.1% of the pixels. A 1-level flip happens when a
# value lies within ~1e-6 of a rounding boundary (seen once in 273 values of a 7x13 image), so
# one flipped pixel is always tolerated on images too small for 0.1% to reach one pixel.
MAX_MISMATCH_RATE = 1e-3


def random_config(rng: random.Random, **fixed) -> ModelConfig:
    fields = {
        "n_scales": rng.randint(1, 4),
        "latent_channels": rng.randint(1, 5),
        "gpp_hidden": rng.randint(1, 20),
        "gpp_kernel": rng.choice((1, 3)),
        "gpp_kernel_min_scale": rng.randint(0, 2),
        "synth_hidden": tuple(rng.randint(1, 24) for _ in range(rng.randint(0, 2))),
        "synth_residual": rng.randint(0, 2),
        "out_channels": rng.choice((1, 3)),
    }
    fields.update(fixed)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int, height: int = 24, width: int = 24) -> N2LModel:
    """Random weights scaled so latents and pixels span a useful range (not all clamped).
    Hybrid configs are made for one image size; their coded latents are random small integers."""
    torch.manual_seed(seed)
    model = N2LModel(config, height, width)
    n_synth = len(config.synth_hidden) + 1
    with torch.no_grad():
        for name, conv in model.named_layers():
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0, 1.2 / fan_in**0.5)
            conv.bias.normal_(0, 0.2)
            if name.startswith("synth_res"):
                conv.weight.mul_(0.3)
        for y in model.coded:
            y.copy_(torch.round(torch.randn(y.shape) * 1.5))
        # Calibrate the last 1x1 layer on a probe image so every output channel is centred at
        # mid-grey with a spread of ~0.2 (twice: the residual layers shift it a little).
        last = model.layer(f"synth.{n_synth - 1}")
        for _ in range(2):
            out = model(model.noise(99, height, width))[0].flatten(1)
            spread = out.std(dim=1, correction=0)  # 0 on a 1x1 image (not NaN): then only centred
            gain = torch.where(spread > 1e-3, 0.2 / spread.clamp_min(1e-3), 1.0)
            last.weight.mul_(gain[:, None, None, None])
            last.bias.mul_(gain).add_(0.5 - out.mean(dim=1) * gain)
    return model.to(DEVICE)


# Fixed, reproducible random configs, plus hand-picked corners (both GPP kernel sizes at
# every scale, a single scale, grayscale with no hidden synthesis layer, wide channels).
_rng = random.Random(1234)
CONFIGS = [random_config(_rng) for _ in range(4)] + [
    ModelConfig(n_scales=3, latent_channels=3, gpp_hidden=10, gpp_kernel=3, gpp_kernel_min_scale=0,
                synth_hidden=(12,), synth_residual=2, out_channels=3),
    ModelConfig(n_scales=1, latent_channels=2, gpp_hidden=5, gpp_kernel=1, gpp_kernel_min_scale=0,
                synth_hidden=(), synth_residual=1, out_channels=1),
    ModelConfig(n_scales=4, latent_channels=6, gpp_hidden=17, gpp_kernel=3, gpp_kernel_min_scale=2,
                synth_hidden=(24, 16), synth_residual=0, out_channels=3),
]  # fmt: skip
SIZES = [(1, 1), (7, 13), (65, 33)]


def config_id(config: ModelConfig) -> str:
    return (
        f"M{config.n_scales}C{config.latent_channels}G{config.gpp_hidden}k{config.gpp_kernel}"
        f"from{config.gpp_kernel_min_scale}S{'-'.join(map(str, config.synth_hidden)) or 'none'}"
        f"R{config.synth_residual}O{config.out_channels}"
    )


def reference(model: N2LModel, seed: int, height: int, width: int):
    with torch.no_grad():
        noise = model.noise(seed, height, width)
        ys = model.latents(noise)
        image = model.synthesis(ys, height, width)
    return noise, ys, image


def assert_pixels_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """[H, W, C] uint8: at most 1 level off, on at most MAX_MISMATCH_RATE of the pixels (or 1 pixel)."""
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert diff.max().item() <= 1, f"pixel off by {diff.max().item()} levels"
    n_bad = (diff > 0).any(dim=-1).sum().item()
    n_pixels = want.shape[0] * want.shape[1]
    assert n_bad <= max(1, MAX_MISMATCH_RATE * n_pixels), f"{n_bad} of {n_pixels} pixels differ"
    return n_bad / n_pixels


# ---------------------------------------------------------------------------------------------


def test_availability():
    assert nk.unavailable_reason() is None
    assert nk.interpreted() == (os.environ.get("TRITON_INTERPRET") == "1")
    assert resolve_backend("triton", DEVICE) == "triton"


@pytest.mark.parametrize(
    "seed,scale,channels,height,width",
    [(0, 0, 3, 1, 1), (12345, 2, 4, 7, 13), (0xFFFFFFFF, 11, 2, 33, 65), (2**31 + 7, 1, 1, 40, 3)],
)
def test_noise_bit_exact(seed, scale, channels, height, width):
    got = nk.noise_triton(seed, scale, channels, height, width, DEVICE)
    want = noise_block(seed, scale, channels, 0, 0, height, width, device=DEVICE)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # torch on the GPU and on the CPU too: the same bits on every device
    on_cpu = noise_block(seed, scale, channels, 0, 0, height, width, device="cpu")
    assert torch.equal(want.cpu().view(torch.int32), on_cpu.view(torch.int32))


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_latents_synthesis_decode(config: ModelConfig):
    """Each stage against the reference, on the odd sizes, for one random model per config."""
    model = random_model(config, seed=zlib.crc32(config_id(config).encode()) % 1000)
    for height, width in SIZES:
        seed = height * 1000 + width
        _, ys, image = reference(model, seed, height, width)

        got_ys = nk.latents_triton(model, seed, height, width)
        assert len(got_ys) == config.n_scales
        for s, (got, want) in enumerate(zip(got_ys, ys)):
            assert got.shape == want.shape, f"scale {s}"
            torch.testing.assert_close(
                got, want, rtol=LATENT_RTOL, atol=LATENT_ATOL, msg=f"latents, scale {s}"
            )

        # Synthesis alone, from the exact reference latents.
        got_image = nk.synthesis_triton(model, ys, height, width)
        torch.testing.assert_close(got_image, image, rtol=SYNTH_RTOL, atol=SYNTH_ATOL)

        got = nk.decode_triton(model, seed, height, width)
        assert got.device.type == DEVICE.type
        assert_pixels_close(got, to_uint8(image))
    # The weights make a non-trivial image: most pixels not clamped to 0 or 255.
    assert ((image > 0.02) & (image < 0.98)).float().mean() > 0.5


@pytest.mark.parametrize("coded, upsampling", [(2, "bilinear"), (3, "bilinear"), (2, "bicubic"), (3, "bicubic")])
def test_hybrid_coded_latents(coded: int, upsampling: str):
    """Transmitted latents (the coarsest scales, or all of them) replace the GPP there; the
    synthesis upsamples them with either kernel."""
    config = ModelConfig(**{**CONFIGS[4].to_dict(), "coded_scales": coded, "synth_upsampling": upsampling})
    for height, width in SIZES:
        model = random_model(config, seed=coded, height=height, width=width)
        _, ys, image = reference(model, 8, height, width)
        for got, want in zip(nk.latents_triton(model, 8, height, width), ys):
            torch.testing.assert_close(got, want, rtol=LATENT_RTOL, atol=LATENT_ATOL)
        assert_pixels_close(nk.decode_triton(model, 8, height, width), to_uint8(image))


def test_decoder_backend_matches_torch():
    """n2l.decoder.reconstruct(backend='triton') against backend='torch' (numpy arrays)."""
    model = random_model(CONFIGS[0], seed=3)
    want = reconstruct(model, 77, 19, 24, backend="torch")
    got = reconstruct(model, 77, 19, 24, backend="triton")
    assert got.shape == want.shape == (19, 24, CONFIGS[0].out_channels)
    assert_pixels_close(torch.from_numpy(got), torch.from_numpy(want))


@pytest.mark.parametrize("mode", ["pure", "hybrid"])
def test_decode_stream(mode: str):
    """n2l.decode of a real bitstream: Triton (bare weights, packed on the host, one upload)
    against the torch reference."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 21), torch.linspace(0, 1, 34), indexing="ij")
    image = (torch.stack([y, x, (x - y).abs()], dim=-1) * 255).round().to(torch.uint8).numpy()
    buf = n2l.encode(image, quality=3, mode=mode, iterations=20, verbose=False)
    want = n2l.decode(buf, device=DEVICE, backend="torch")
    got = n2l.decode(buf, device=DEVICE, backend="triton")
    assert got.shape == want.shape == image.shape
    assert_pixels_close(torch.from_numpy(got), torch.from_numpy(want))


def test_weight_cache_follows_updates():
    """Packed weights are cached per model but rebuilt after an in-place weight change."""
    model = random_model(CONFIGS[4], seed=5)
    first = nk.decode_triton(model, 1, 9, 9)
    with torch.no_grad():
        model.layer("synth.1").bias.add_(0.25)
    _, _, image = reference(model, 1, 9, 9)
    second = nk.decode_triton(model, 1, 9, 9)
    assert not torch.equal(first, second)
    assert_pixels_close(second, to_uint8(image))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_large(name):
    """Presets at 256x256 on a GPU; in the interpreter only one preset at a smaller size."""
    if INTERPRETED and name != "fast":
        pytest.skip("interpreter: one preset is enough (slow)")
    size = (256, 256) if not INTERPRETED else (96, 80)
    model = random_model(PRESETS[name], seed=11)
    _, ys, image = reference(model, 2024, *size)
    got_ys = nk.latents_triton(model, 2024, *size)
    errors = [(g - w).abs().max().item() for g, w in zip(got_ys, ys)]
    assert max(errors) < 1e-3, errors
    assert_pixels_close(nk.decode_triton(model, 2024, *size), to_uint8(image))


def test_compiles_for_sm90_offline():
    """The real GPU compile path (TTGIR, LLVM, PTX, ptxas) for a small config, without a GPU.

    The interpreter accepts code the compiler rejects (e.g. tl.dot with K < 16), so this runs
    n2l.kernels.offline in a fresh process without TRITON_INTERPRET. It also checks that every
    noise sample is one `mul.rn.f32` (not contracted into an FMA, not replicated across threads).
    """
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    script = """
import json
from n2l.model import ModelConfig
from n2l.kernels.offline import compile_kernels
cfg = ModelConfig(n_scales=2, latent_channels=2, gpp_hidden=6, gpp_kernel=3, gpp_kernel_min_scale=1,
                  synth_hidden=(8,), synth_residual=1, out_channels=3)
print(json.dumps([[k.name, k.registers, k.spill_bytes, k.ptx.count("mul.rn.f32")] for k in compile_kernels(cfg)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    kernels = {
        name: (regs, spills, muls) for name, regs, spills, muls in json.loads(proc.stdout.splitlines()[-1])
    }
    assert set(kernels) == {"noise", "gpp k=3 coarser=False", "gpp k=1 coarser=True", "synthesis"}
    # Noise kernel: BLOCK=1024 over 4 warps = 8 samples per thread, times 2 channels.
    assert kernels["noise"][2] == 16
    # GPP: one pixel per thread (8x32 tile, 8 warps), 2 channels, 9 or 1 taps.
    assert kernels["gpp k=3 coarser=False"][2] == 18
    assert kernels["gpp k=1 coarser=True"][2] == 2
    assert all(spills == 0 for _, spills, _ in kernels.values()), kernels
