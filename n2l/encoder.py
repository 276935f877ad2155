"""Per-image encoder: overfit an n2l network with a rate-distortion loss, quantize, entropy-code.

Training (loss = MSE + lambda * bits / pixels), for each noise seed (with `seeds` > 1, the
candidates run side by side on threads and the stream of lowest RD cost is kept; at a level
with HYBRID_ALTERNATIVES, each structure first trains through 12% of the main phase and the one
whose quantized network costs least goes on, `_trial`):
1. main phase: Adam with linear warm-up and cosine decay; weights (and, in hybrid mode, the
   transmitted latents, which are parameters too) see additive uniform noise of one
   quantization step (a differentiable proxy of rounding); each tensor's rate is its
   information content under a Laplace fitted to it (for latents, under a checkerboard model
   simpler than the coder's, which trains better: bench/RESULTS.md 7j, weighted per latent by
   the coder's bits over its own, refitted every 1000 steps: 8b), with a learned step per tensor;
2. a search of per-tensor power-of-two steps minimizing MSE + lambda * R with the real coded
   size (constriction), starting from the learned steps;
3. quantization-aware phase: hard rounding with straight-through gradients at those steps
   (the rate proxy evaluated at those steps too) and a last local search;
4. rate-distortion optimized rounding (`_polish`): of every weight, one at a time with exact
   measurements, and in hybrid mode of the transmitted latents, by estimate (`_Refinement`)
   and for the coarsest ones exactly, alternated; then the bitstream is written.

Rate control (a size or PSNR target) sets lambda during the main phase from probes of the
stream the quantization-aware phase would end with (starting over with the networks of the
level nearest the new lambda if the first probe moves it far; `_LambdaControl`) and holds it
through that phase; the stream is finished as a plain one and latent values are refined one at
a time into the band (`_trim`). Failing that, the lambda of the step search is bisected to land
in the band, and the final polish is held there (`_polish_in_band`).
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from . import bitstream, cpu
from .images import ImageLike, load_image, to_tensor
from .memory import retain_freed_memory
from .model import PRESETS, ModelConfig, N2LModel, preset
from .weights import (
    MAX_EXPONENT,
    TensorCode,
    dequantize,
    encode_tensors,
    fit_code,
    laplace_bin_bits,
    move_bits,
    pass_geometry,
    quantize,
    tensor_bits,
)

# quality 0..8 -> lambda (MSE on [0, 1] + lambda * bits per pixel) and architecture. With no
# latents every bit is a parameter, so the network must grow with the quality.
QUALITY_LAMBDAS = tuple(2e-2 * (1e-4 / 2e-2) ** (q / 8) for q in range(9))
QUALITY_CONFIGS = (
    PRESETS["fast"],
    PRESETS["fast"],
    ModelConfig(latent_channels=3, gpp_hidden=10, synth_hidden=(12,)),
    PRESETS["default"],
    PRESETS["default"],
    ModelConfig(latent_channels=5, gpp_hidden=14, gpp_kernel_min_scale=1, synth_hidden=(20,)),
    PRESETS["best"],
    ModelConfig(latent_channels=8, gpp_hidden=20, gpp_kernel_min_scale=1, synth_hidden=(32, 16), synth_residual=2),
    ModelConfig(latent_channels=8, gpp_hidden=28, gpp_kernel_min_scale=1, synth_hidden=(40, 24), synth_residual=2),
)
# Hybrid mode (METHOD.md section 6): the coarse latent scales are transmitted, one channel
# each like Cool-chic's latent grids. At low rates the full-resolution latent is generated from
# seeded noise by a small 1x1 GPP (lower RD cost than coding it, bench/RESULTS.md 7a); at high
# rates it is transmitted too (on a kodim01 crop at quality 6, 33.9 dB at 2.38 bpp against
# 28.9 dB at 1.45 bpp: J 1.26e-3 against 1.81e-3). The synthesis upsamples the latents
# bicubically: BD-rate -1.4% against bilinear on eight crops (bench/RESULTS.md 7t). At levels 3-4
# the GPP's first layer is 3x3 at the generated scale too (RD cost -2.4% on seven crops at
# level 3, 7u; it lost 7.1% at level 0 and was even at level 1). Level 5 trains level 6's network
# (synthesis 24 wide, two residual layers): RD cost -2.9% and -2.4% on two crops against a
# synthesis 16 wide with one (bench/RESULTS.md 8a).
_HYBRID = ModelConfig(latent_channels=1, coded_scales=6, gpp_hidden=4, synth_upsampling="bicubic")
HYBRID_CONFIGS = (
    *(replace(_HYBRID, synth_hidden=(12,)) for _ in range(3)),
    *(replace(_HYBRID, synth_hidden=(16,), gpp_kernel_min_scale=0) for _ in range(2)),
    *(replace(_HYBRID, synth_hidden=(24,), synth_residual=2, coded_scales=7) for _ in range(4)),
)
# Levels where neither structure suits every image: against level 4's generated full-resolution
# latent, a coded one costs 3-11% more RD cost on smooth crops and 1-16% less on textured ones
# (bench/RESULTS.md 7w). The encoder trains each listed level's network briefly, at this level's
# lambda and learning rate, and goes on with the better one (`_trial`) for that network's own
# level's iterations; the header says which network it is. Level 6's network (synthesis 24 wide,
# two residual layers) gains more on textured crops than one 16 wide with one (7x, 7y).
HYBRID_ALTERNATIVES = {4: (6,)}
MODES = ("pure", "hybrid")
# Hybrid is the default: about a third of the pure mode's bits at equal PSNR (BD-rate -68%,
# bench/RESULTS.md 7b); pure, the paper's latent-free design, stays one argument away.
DEFAULT_MODE = "hybrid"
# Training iterations per mode and quality. Hybrid mode gained with iterations up to these
# (bench/RESULTS.md 5, 7f, 7k, 7r): 24000 for levels 0-2, 20000 for 3-4 (their 3x3 GPP layer makes
# a step 10% slower; 20000 instead of 24000 gave up 0.4% of RD cost, 7v) and 18000 for 5-8
# (slower steps), inside 5 minutes per 256x256 crop on 2 CPU cores. 22000 at levels 5-8 did not pay (7s).
DEFAULT_ITERATIONS = {"pure": (2000,) * 9, "hybrid": (24000,) * 3 + (20000,) * 2 + (18000,) * 4}
# Peak learning rate per mode and quality: hybrid levels 0-4 gain from a higher one at 16000
# iterations (one crop each, RD cost against 1e-2: quality 3 -2.8% at 2e-2, -3.9% at 3e-2,
# -3.0% at 4e-2; quality 0 -3.2% at 2e-2, -7.9% at 3e-2; bench/RESULTS.md 7m). Levels 5-8 at
# their 18000 iterations gain a little from 2e-2 over 1e-2: RD cost -0.3% at quality 6 and -1.9%
# at quality 8 on eight crops, BD-rate -0.5% (8g).
DEFAULT_LR = {"pure": (1e-2,) * 9, "hybrid": (3e-2,) * 5 + (2e-2,) * 4}
# Weight of the coarse coded latents (all but the finest) in the training rate proxy, on top of
# each latent's calibration to the coder (`_RateProxy.calibrate`). Before that calibration
# existed, a lighter charge paid at quality 0: RD cost -4.4% to -11.7% on 4 crops at 0.4, while
# at quality 3 it cost 2-4% (bench/RESULTS.md 7n); quality 0 keeps 0.4 with it (not re-tuned, 8b).
DEFAULT_COARSE_LATENT_RATE = {"pure": (1.0,) * 9, "hybrid": (0.4,) + (1.0,) * 8}
LATENT_FACTOR_MIN = 0.25  # the least weight `_RateProxy.calibrate` gives a latent's proxy bits
RATE_CONTROL_RETRIES = 2  # short fine-tunes when the step search misses the target band
SIZE_BAND = 0.97  # a size target lands in [SIZE_BAND, 1] x target_bytes ...
PSNR_BAND_DB = 0.1  # ... a PSNR target in [target_psnr, target_psnr + PSNR_BAND_DB]


@dataclass(frozen=True)
class TrainingConfig:
    """Optimization schedule of the encoder."""

    iterations: int = 2000
    lr: float = 1e-2
    warmup_fraction: float = 0.05  # linear learning-rate warm-up
    qat_fraction: float = 0.1  # final hard-rounding phase
    qat_lr: float = 1e-3
    grad_clip: float = 1.0  # global norm; hybrid mode's norms stay far below it (bench/RESULTS.md 8l)
    init_log2_step: float = -8.0
    coarse_latent_rate: float = 1.0  # weight of the coarse coded latents' proxy bits
    calibrate_every: int = 1000  # steps between fits of the latents' proxy bits to the coder's (0: never)


def laplace_bits(*tensors: torch.Tensor) -> torch.Tensor:
    """Bits to code values (in units of their step) under a zero-mean Laplace with unit bins,
    each tensor with its own scale; all tensors in one vectorized pass.

    Each value costs -log2 P([|v| - 1/2, |v| + 1/2]) under the Laplace whose scale is the
    tensor's mean |v| (the gradient flows through it too), so the estimate follows the real
    distribution rather than the entropy of an ideal Laplace source. On sparse tensors it
    charges the rare nonzero values more than the coder (which fits the scale for the fewest
    bits) does; that bias pushes latents toward sparsity, and removing it lost RD
    (bench/RESULTS.md 7d).
    """
    magnitudes = torch.cat([t.flatten() for t in tensors]).abs()
    sizes = torch.tensor([t.numel() for t in tensors], device=magnitudes.device)
    segment = torch.repeat_interleave(sizes)  # which tensor each value belongs to
    sums = magnitudes.new_zeros(len(tensors)).index_add(0, segment, magnitudes)
    scales = (sums / sizes).clamp_min(1e-3)
    return laplace_bin_bits(magnitudes, scales[segment]).sum()


@functools.cache
def _checkerboard_geometry(shapes: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
    """Indices into the concatenated flat h x w grids of `shapes` (plus a zero slot at the end,
    index sum(h * w)): all anchors ((i + j) even) and all other values, grid by grid; the [4,
    others] indices of each other value's 4 neighbours (the zero slot where out of bounds),
    their in-bounds count, and each other value's grid. CPU; reused every step (indices avoid
    a mask's nonzero)."""
    total = sum(h * w for h, w in shapes)
    anchors, others, grid, neighbours = [], [], [], [[], [], [], []]
    offset = 0
    for g, (h, w) in enumerate(shapes):
        (anchor_mask, _), (other_mask, offsets) = pass_geometry(2, h, w)
        i, j = np.nonzero(other_mask)
        for d, (di, dj) in enumerate(offsets):
            y, x = i + di, j + dj
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            neighbours[d].append(np.where(inside, offset + y * w + x, total))
        anchors.append(offset + np.flatnonzero(anchor_mask))
        others.append(offset + np.flatnonzero(other_mask))
        grid.append(np.full(len(i), g))
        offset += h * w
    neighbours = np.stack([np.concatenate(n) for n in neighbours])
    count = (neighbours < total).sum(0)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in
                 (np.concatenate(anchors), np.concatenate(others), neighbours, count.astype(np.float32),
                  np.concatenate(grid)))


def checkerboard_residuals(*latents: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The training proxy's model of latents v [C, h, w] (in units of their steps): per latent,
    its anchors and its other values minus their prediction from their anchor neighbours (the
    prediction weight fitted per latent by least squares, as the coder fits it), each part under
    its own zero-mean Laplace. A 1 x 1 latent is one part. All latents in one pass of batched ops.

    The coder (n2l.weights.LatentCode) also predicts most anchors, in passes over ever finer
    subgrids, and lets every scale follow the neighbours' magnitude. Charging those in
    training too cost RD at low rate (bench/RESULTS.md 7j): its cheaper nonzero values next to
    nonzero neighbours weaken the push toward sparse latents. So training keeps this model."""
    shapes = tuple(tuple(v.shape[-2:]) for v in latents)
    anchors, others, neighbours, count, grid = (t.to(latents[0].device) for t in _checkerboard_geometry(shapes))
    c = latents[0].shape[0]
    flat = torch.cat([v.reshape(c, -1) for v in latents] + [latents[0].new_zeros(c, 1)], dim=1)
    # index_select: its backward is an index_add, several times faster than advanced indexing's
    pred = flat.index_select(1, neighbours.flatten()).view(c, 4, -1).sum(1) / count
    values = flat.index_select(1, others)
    fit = torch.stack([values * pred, pred * pred]).sum(1).detach()  # [2, others]
    sums = fit.new_zeros(2, len(latents)).index_add_(1, grid, fit)
    alpha = (sums[0] / sums[1].clamp_min(1e-9)).clamp(0, 1)
    residuals = values - alpha[grid] * pred
    n_anchors = [(h * w + 1) // 2 for h, w in shapes]
    n_others = [h * w // 2 for h, w in shapes]
    return [(a, r) if r.shape[-1] else (a,) for a, r in
            zip(flat.index_select(1, anchors).split(n_anchors, 1), residuals.split(n_others, 1))]


def checkerboard_bits(v: torch.Tensor) -> torch.Tensor:
    """Bits of a latent v [C, h, w] (in units of its step) under the checkerboard model."""
    return laplace_bits(*checkerboard_residuals(v)[0])


class _RateProxy:
    """Differentiable rate of every coded tensor in units of its learned log2 step: Laplace bits
    for the weights, checkerboard bits for the transmitted latents. With `threads`, the C++ core
    (CPU, float32) forms the checkerboard residuals (bit for bit the reference's) and sums the
    bits on that many threads: the same function, in two calls instead of some forty torch
    operations (bench/RESULTS.md 7s, 7z)."""

    def __init__(self, model: N2LModel, init_log2_step: float, coarse_latent_rate: float = 1.0,
                 threads: int | None = None):
        # Weights start at a fine step; transmitted latents (hybrid mode) at step 1, like Cool-chic's.
        self.n_layer_tensors = 2 * len(model.config.layer_shapes())
        init = [init_log2_step] * self.n_layer_tensors + [0.0] * len(model.coded)
        self.log2_steps = torch.tensor(init, device=next(model.parameters()).device, requires_grad=True)
        self.sizes = [p.numel() for p in model.parameters()]
        # which tensor each value belongs to (index_select is repeat_interleave's own implementation)
        self.owner = torch.repeat_interleave(torch.tensor(self.sizes, device=self.log2_steps.device))
        self.layer_sizes = self.sizes[: self.n_layer_tensors]
        self.coarse_latent_rate = coarse_latent_rate
        self.latent_factors = [1.0] * len(model.coded)  # see `calibrate`
        self.threads = threads if _on_core(self.log2_steps[None]) else None

    def bits(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        steps = torch.exp2(self.log2_steps)
        tensors = list(params.values())
        n = self.n_layer_tensors
        # All layer tensors in one division (a few ops per step instead of a few per tensor).
        layers = torch.cat([p.flatten() for p in tensors[:n]])
        layers = layers / steps.index_select(0, self.owner[: layers.numel()])
        residuals = checkerboard_residuals if self.threads is None else cpu.checkerboard_residuals
        coded = residuals(*(p[0] / steps[n + i] for i, p in enumerate(tensors[n:]))) if tensors[n:] else []
        weights = [(self.coarse_latent_rate if i < len(coded) - 1 else 1.0) * f for i, f in enumerate(self.latent_factors)]
        if self.threads is not None:
            parts = [*layers.split(self.layer_sizes), *(part for parts in coded for part in parts)]
            return cpu.laplace_bits(parts, [1.0] * n + [w for w, parts in zip(weights, coded) for _ in parts], self.threads)
        return laplace_bits(*layers.split(self.layer_sizes)) + sum(
            w * laplace_bits(*parts) for w, parts in zip(weights, coded))

    @torch.no_grad()
    def calibrate(self, params: dict[str, torch.Tensor]) -> None:
        """Set each coded latent's proxy weight to the coder's bits over the proxy's, both for
        its values rounded at the current steps (in [LATENT_FACTOR_MIN, 1]). The checkerboard
        charges smooth latents up to 2.6x the coder's bits, so training priced their bits too
        high (bench/RESULTS.md 8b)."""
        n = self.n_layer_tensors
        for i, p in enumerate(list(params.values())[n:]):
            q = torch.round(p[0] / float(torch.exp2(self.log2_steps[n + i]))).cpu()
            proxy = float(laplace_bits(*checkerboard_residuals(q)[0]))
            ints = q.numpy().astype(np.int32)
            coded = tensor_bits(ints, fit_code(ints, 0, latent=True))
            self.latent_factors[i] = min(max(coded / proxy, LATENT_FACTOR_MIN), 1.0) if proxy > 0 else 1.0

    def fix(self, exponents: list[int]) -> None:
        """Freeze the steps at 2^-exponents (quantization-aware phase: rate at the real steps)."""
        self.log2_steps.requires_grad_(False).copy_(-torch.tensor(exponents, dtype=torch.float32))

    def noisy(self, params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The tensors plus uniform noise of one step's width (all tensors in a few ops)."""
        flat = torch.cat([p.flatten() for p in params.values()])
        width = torch.exp2(self.log2_steps).index_select(0, self.owner)
        flat = flat + (torch.rand(flat.shape, generator=generator, device=flat.device) - 0.5) * width
        return {n: t.view(p.shape) for (n, p), t in zip(params.items(), flat.split(self.sizes))}


def _psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1 / max(mse, 1e-12))


def _lr_factor(it: int, total: int, warmup: int) -> float:
    if it < warmup:
        return (it + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, total - warmup)))


def _on_core(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1


class _TrainingModel(N2LModel):
    """The reference network, its 3x3 convolutions, upsampling and 1x1 stacks on the C++ core's
    training kernels for one float32 image on the CPU: torch's are several times slower for so
    few channels (bench/RESULTS.md 7r). Same function up to float rounding (tests/test_cpu_core.py);
    the kernels run on `threads` threads, which changes no result."""

    def __init__(self, config: ModelConfig, height: int, width: int, threads: int = 1):
        super().__init__(config, height, width)
        self.threads = threads

    def conv(self, x: torch.Tensor, name: str) -> torch.Tensor:
        layer = self.layer(name)
        if layer.kernel_size[0] == 3 and _on_core(x):
            return cpu.conv3x3(x, layer.weight, layer.bias, self.threads)
        return super().conv(x, name)

    def pointwise(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        layers = [self.layer(name) for name in names]
        if (_on_core(x) and len(layers) <= cpu.POINTWISE_MAX_LAYERS
                and max(max(c.in_channels, c.out_channels) for c in layers) <= cpu.POINTWISE_MAX_WIDTH):
            return cpu.pointwise(x, [(c.weight, c.bias) for c in layers], self.threads)
        return super().pointwise(x, names)

    def upsample(self, x: torch.Tensor, factor: int, height: int, width: int, kernel: str = "bilinear") -> torch.Tensor:
        if factor > 1 and _on_core(x):
            return cpu.upsample(x, factor, height, width, kernel)
        return super().upsample(x, factor, height, width, kernel)


_SEEDING = threading.Lock()  # candidates on threads seed their initialization in turn


class _Trainer:
    """One candidate: a network, its fixed noise, its rate proxy, optimizer and random stream."""

    def __init__(self, config: ModelConfig, seed: int, target: torch.Tensor, lmbda: float, tc: TrainingConfig,
                 threads: int = 1):
        self.seed, self.target, self.lmbda, self.tc = seed, target, lmbda, tc
        # The initialization draws from torch's seeded global generator (restored afterwards);
        # the training noise from the trainer's own generator, which continues that stream.
        with _SEEDING, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if cpu.unavailable_reason() is None:
                self.model = _TrainingModel(config, *target.shape[-2:], threads).to(target.device)
            else:
                self.model = N2LModel(config, *target.shape[-2:]).to(target.device)
            self.generator = torch.Generator(target.device)
            if target.device.type == "cpu":
                self.generator.set_state(torch.get_rng_state())
            else:  # the initialization drew on the CPU: the device's stream starts at the seed
                self.generator.manual_seed(seed)
        self.noise = self.model.noise(seed, target.shape[-2], target.shape[-1])
        self.rate = _RateProxy(self.model, tc.init_log2_step, tc.coarse_latent_rate,
                               threads if isinstance(self.model, _TrainingModel) else None)
        self.params = dict(self.model.named_parameters())
        # fused: one kernel for all tensors (CPU and CUDA), several times faster than the loop over them
        self.opt = torch.optim.Adam([*self.params.values(), self.rate.log2_steps], lr=tc.lr, fused=True)
        self.pixels = target.shape[-2] * target.shape[-1]
        self.loss = math.inf
        self.steps = 0

    def use_threads(self, threads: int) -> None:
        """Run the C++ core's kernels on this many threads from now on (no result changes)."""
        if isinstance(self.model, _TrainingModel):
            self.model.threads = threads
        if self.rate.threads is not None:
            self.rate.threads = threads

    def copy(self) -> _Trainer:
        """An independent copy (network, rate proxy, optimizer state) sharing the target and noise."""
        shared = {id(self.target): self.target, **{id(z): z for z in self.noise if z is not None}}
        return copy.deepcopy(self, memo=shared)

    def step(self, lr: float, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """One Adam step; `params` overrides the (noisy) weights. Returns (loss, mse, bpp) as
        0-dim tensors: reading them waits for a GPU, so the caller reads only what it shows."""
        every = self.tc.calibrate_every
        if every and self.steps % every == every // 2:
            self.rate.calibrate(self.params)
        self.steps += 1
        for group in self.opt.param_groups:
            group["lr"] = lr
        used = params if params is not None else self.rate.noisy(self.params, self.generator)
        out = functional_call(self.model, used, (self.noise,))
        mse = F.mse_loss(out, self.target)
        bpp = self.rate.bits(self.params) / self.pixels
        loss = mse + self.lmbda * bpp
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), self.tc.grad_clip)
        self.opt.step()
        self.loss = loss.detach()
        return self.loss, mse.detach(), bpp.detach()


TRIAL_AT = (0.08, 0.1, 0.12)  # fractions of the main phase at which `_trial` measures each structure


def _trial(trainers: list[_Trainer], n_main: int, lr_at: Callable[[int], float],
           report=None) -> tuple[_Trainer, int]:
    """Train candidate structures side by side, each on its share of the threads, through the
    first 12% of a main phase of `n_main` steps at the learning rate `lr_at(step)` (the first
    candidate's schedule for all: their costs compare at equal rates), and keep the one whose
    quantized network costs the least MSE + lambda * bpp, summed over TRIAL_AT (one measurement
    is noisy at the high learning rate). Returns it and the steps it has had; it goes on with
    its own schedule.

    The structures' costs drift apart as training goes on (a coded full-resolution latent's
    falls behind until the learning rate decays), so an early measurement favours the
    generated latent; coding it pays mostly on strongly textured images, which it picks out
    (bench/RESULTS.md 7x)."""
    checkpoints = sorted({max(1, round(f * n_main)) for f in TRIAL_AT})

    def run(k: int) -> float:
        trainer, cost = trainers[k], 0.0
        for it in range(checkpoints[-1]):
            out = trainer.step(lr_at(it))
            if report and k == 0:
                report(*out, it)
            if it + 1 in checkpoints:
                quantizer = _Quantizer(trainer)
                cost += quantizer.cost(quantizer.search(_learned_exponents(trainer), passes=1, reach=2))
        return cost

    with ThreadPoolExecutor(len(trainers)) as pool:
        costs = list(pool.map(run, range(len(trainers))))
    return trainers[costs.index(min(costs))], checkpoints[-1]


def _straight_through(params: dict[str, torch.Tensor], exponents: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for (name, p), e in zip(params.items(), exponents):
        scale = 2.0**e
        out[name] = p + (torch.round(p * scale) / scale - p).detach()
    return out


def _dequantize_like(q: np.ndarray, exponent: int, like: torch.Tensor) -> torch.Tensor:
    """Dequantized integers with the shape and device of the float tensor they quantize."""
    return torch.from_numpy(dequantize(q, exponent)).view(like.shape).to(like.device)


@torch.no_grad()
def _output_mse(trainer: _Trainer, params: dict[str, torch.Tensor]) -> float:
    """MSE (on [0, 1]) of the 8-bit image the decoder outputs for the network with `params`."""
    out = functional_call(trainer.model, params, (trainer.noise,))
    return float(F.mse_loss(torch.round(out.clamp(0, 1) * 255) / 255, trainer.target))


class _Quantizer:
    """Evaluates MSE + lambda * bpp of the network quantized with given per-tensor exponents."""

    def __init__(self, trainer: _Trainer, float_params: dict[str, torch.Tensor] | None = None):
        self.t = trainer
        self.lmbda = trainer.lmbda
        self.float_params = float_params or {n: p.detach().clone() for n, p in trainer.params.items()}
        self.cache: dict[tuple[str, int], tuple] = {}
        self.measured: dict[tuple[int, ...], tuple[float, float]] = {}  # exponents -> (mse, bpp)

    def tensor(self, name: str, exponent: int) -> tuple:
        """(integers, code, bits) of one tensor at one exponent, cached."""
        key = (name, exponent)
        if key not in self.cache:
            q = quantize(self.float_params[name], exponent)
            latent = name.startswith("coded.")
            q = q[0] if latent else q  # a latent is coded as [C, h, w]
            code = fit_code(q, exponent, latent=latent)
            self.cache[key] = (q, code, tensor_bits(q, code))
        return self.cache[key]

    @torch.no_grad()
    def measure(self, exponents: list[int]) -> tuple[float, float]:
        """(mse of the 8-bit output, bpp) of a full assignment, with the real coded bits; memoized."""
        key = tuple(exponents)
        if key not in self.measured:
            params, bits = {}, 0.0
            for (name, p), e in zip(self.float_params.items(), exponents):
                q, _, b = self.tensor(name, e)
                params[name] = _dequantize_like(q, e, p)
                bits += b
            self.measured[key] = _output_mse(self.t, params), bits / self.t.pixels
        return self.measured[key]

    def psnr(self, exponents: list[int]) -> float:
        """PSNR in dB of the 8-bit output of a full assignment (memoized through `measure`)."""
        return _psnr_from_mse(self.measure(exponents)[0])

    def cost(self, exponents: list[int]) -> float:
        mse, bpp = self.measure(exponents)
        return mse + self.lmbda * bpp

    def search(self, exponents: list[int], passes: int, reach: int) -> list[int]:
        """Greedy per-tensor coordinate descent over exponents (step 2^-e), real rate.

        Each tensor's exponent moves up to `reach` steps either way per pass."""
        best = list(exponents)
        best_cost = self.cost(best)
        for _ in range(passes):
            improved = False
            for i in range(len(best)):
                for direction in (-1, 1):
                    for _ in range(reach):
                        if not 0 <= best[i] + direction <= MAX_EXPONENT:
                            break
                        trial = best.copy()
                        trial[i] += direction
                        c = self.cost(trial)
                        if c >= best_cost:
                            break
                        best, best_cost, improved = trial, c, True
            if not improved:
                break
        return best

    def codes(self, exponents: list[int]) -> tuple[list, list[TensorCode]]:
        entries = [self.tensor(name, e) for name, e in zip(self.float_params, exponents)]
        return [q for q, _, _ in entries], [code for _, code, _ in entries]


class _Refinement:
    """Per-value rate-distortion refinement of the transmitted latents' integers (RDOQ).

    Every latent integer may move one step up or down. A move's bit change comes from the
    coder's model (the value's own Laplace and those of the neighbours it predicts), its MSE
    change from a second-order estimate: the gradient and a Hutchinson estimate of the squared
    Jacobian column norms.
    `ranked` orders one move per value for a purpose (saving bits, spending them, or the RD
    cost at a lambda) and `apply` gives a quantizer whose latents carry a prefix of that order.
    The moves interact, so callers measure what they apply (sizes and MSEs are real).
    """

    def __init__(self, quantizer: _Quantizer, exponents: list[int], probes: int = 16):
        self.quantizer = quantizer
        t = quantizer.t
        params = {}
        for (name, p), e in zip(quantizer.float_params.items(), exponents):
            q = quantizer.tensor(name, e)[0]
            params[name] = _dequantize_like(q, e, p).requires_grad_(name.startswith("coded."))
        self.names = [n for n in params if n.startswith("coded.")]
        self.exponent = dict(zip(params, exponents))
        leaves = [params[n] for n in self.names]
        out = functional_call(t.model, params, (t.noise,)).clamp(0, 1)
        grads = torch.autograd.grad(((out - t.target) ** 2).sum(), leaves, retain_graph=True)
        curvature = [torch.zeros_like(leaf) for leaf in leaves]
        generator = torch.Generator(device=out.device).manual_seed(0)
        for _ in range(probes):
            v = torch.randint(0, 2, out.shape, generator=generator, device=out.device).float() * 2 - 1
            for c, g in zip(curvature, torch.autograd.grad(out, leaves, v, retain_graph=True)):
                c += g * g / probes
        # Per value: which tensor, where, and for the moves down (-1) and up (+1) dMSE and dbits.
        where, d_mse, d_bits, boxes = [], [], [], []
        for k, (name, g, c) in enumerate(zip(self.names, grads, curvature)):
            e = self.exponent[name]
            q, code, _ = quantizer.tensor(name, e)
            # Bicubic's outer taps (at most 0.11 of a value's weight) are left out of its footprint:
            # more moves per round paid more than exact independence (J -0.17% on 4 streams,
            # bench/RESULTS.md 7u), and each round's real cost is measured anyway.
            boxes.append(self._footprints(t.model.config, name, q.shape, t.target.shape[-2:]))
            g = g.detach().cpu().double().numpy().ravel()
            c = c.detach().cpu().double().numpy().ravel()
            step = 2.0**-e
            d_mse.append(np.stack([(g * d * step + c * step**2) / out.numel() for d in (-1, 1)]))
            d_bits.append(move_bits(q, code))
            where.append(np.stack([np.full(q.size, k), np.arange(q.size)]))
        self.boxes = np.concatenate(boxes, axis=1) if boxes else np.zeros((4, 0), np.int64)
        self.where = np.concatenate(where, axis=1) if where else np.zeros((2, 0), np.int64)
        self.d_mse = np.concatenate(d_mse, axis=1) if d_mse else np.zeros((2, 0))
        self.d_bits = np.concatenate(d_bits, axis=1) if d_bits else np.zeros((2, 0))

    @staticmethod
    def _footprints(config: ModelConfig, name: str, shape: tuple[int, ...], size, reach: int = 1) -> np.ndarray:
        """[4, values]: the output rows and columns [r0, r1) x [c0, c1) within `reach` coarse
        pixels of each value, widened by one pixel per 3x3 layer. Reach 1 is all that bilinear
        upsampling can change, 2 all that bicubic can."""
        scale = config.n_scales - 1 - int(name.split(".")[1])
        f, margin = 1 << scale, config.synth_residual
        _, i, j = np.unravel_index(np.arange(math.prod(shape)), shape)
        rows = np.clip([f * (i - reach) - margin, f * (i + 1 + reach) + margin], 0, size[0])
        cols = np.clip([f * (j - reach) - margin, f * (j + 1 + reach) + margin], 0, size[1])
        return np.concatenate([rows, cols])

    def ranked(self, purpose: str, lmbda: float = 0.0, per_scale: bool = True,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, directions) of useful moves with disjoint footprints, best first.

        Moves whose output footprints do not overlap add up (their estimates are independent;
        nearly so with bicubic upsampling, whose outer taps the footprints leave out);
        those that overlap a better one wait for the next round. With `per_scale`, only moves
        of the same scale must be disjoint: more moves per round, but their sum is less exact.
        Values in `exclude` do not move.
        "save": moves that save bits, by MSE added per bit saved; "spend": moves that spend
        bits and lower the MSE, by MSE removed per bit spent; "rd": moves that lower MSE +
        lambda * bits (lambda per bit: the encode's lambda / pixels), by that change.
        """
        d_mse, d_bits = self.d_mse, self.d_bits
        with np.errstate(divide="ignore", invalid="ignore"):
            if purpose == "save":
                key = np.where(d_bits < 0, d_mse / -d_bits, np.inf)
            elif purpose == "spend":
                key = np.where((d_mse < 0) & (d_bits > 0), d_mse / d_bits, np.inf)
            else:
                key = d_mse + lmbda * d_bits
                key = np.where(key < 0, key, np.inf)
        choice = np.argmin(key, axis=0)
        best = key[choice, np.arange(key.shape[1])]
        values = np.flatnonzero(best < np.inf)
        if exclude is not None:
            values = values[~np.isin(values, exclude)]
        values = values[np.argsort(best[values], kind="stable")]
        claimed = np.zeros((len(self.names) if per_scale else 1, *self.quantizer.t.target.shape[-2:]), bool)
        keep = []
        for v in values:
            k, (r0, r1, c0, c1) = self.where[0, v] if per_scale else 0, self.boxes[:, v]
            if not claimed[k, r0:r1, c0:c1].any():
                claimed[k, r0:r1, c0:c1] = True
                keep.append(v)
        values = np.array(keep, np.int64)
        return values, 2 * choice[values] - 1

    def apply(self, values: np.ndarray, directions: np.ndarray) -> _Quantizer:
        """A quantizer of the same network whose latents carry these moves."""
        quantizer = self.quantizer
        float_params = dict(quantizer.float_params)
        changed = set()
        for k in np.unique(self.where[0, values]):
            name = self.names[k]
            changed.add(name)
            e = self.exponent[name]
            picked = self.where[0, values] == k
            q = quantizer.tensor(name, e)[0].copy()
            q.ravel()[self.where[1, values[picked]]] += directions[picked]
            float_params[name] = _dequantize_like(q, e, float_params[name])
        refined = _Quantizer(quantizer.t, float_params)
        refined.lmbda = quantizer.lmbda
        refined.cache = {key: entry for key, entry in quantizer.cache.items() if key[0] not in changed}
        return refined


# Rate control starts from the largest quality level whose network fits the target at about
# 4 bits per parameter (coded weights cost 5-5.5 bits per parameter at every level on 256x256
# Kodak crops, fewer on small images and short encodes). PSNR targets start from the first
# level whose typical PSNR on those crops reaches the target: a lower level's network may
# saturate below it (a hybrid network that generates its full-resolution latent does).
BITS_PER_PARAMETER = 4.0
TYPICAL_PSNR = (22.0, 22.5, 23.0, 24.0, 25.5, 27.0, 29.0, 30.5, 32.0)
# Hybrid mode: the bpp and PSNR of a plain encode at quality q follow the image's texture t (see
# `texture`): log bpp and PSNR ~ c0 + c1 q + c2 q^2 + c3 log t + c4 q log t, least squares over
# 40 encodes of 8 centre 256x256 Kodak crops (8b's eval, `bench/fit_typical_rd.py`, bench/RESULTS.md 8c).
# With each image left out of the fit, it predicts that image's log bpp within 0.23 (sd; one
# level moves it by about 0.4) and PSNR within 1.0 dB; without the texture, 0.64 and 2.3 dB.
HYBRID_LOG_BPP_FIT = (-4.583, 0.4351, -0.00518, 0.577, -0.01168)
HYBRID_PSNR_FIT = (39.25, -0.3142, 0.0742, -2.887, 0.3387)
HYBRID_FIT_TEXTURE = (17.0, 319.0)  # the fitted crops' range of t: beyond it, its ends (no extrapolation)
# A hybrid quality level trains every image at about the same price of a decibel, not of a unit
# of MSE: d(PSNR) is proportional to dMSE / MSE, so lambda (on the MSE) is scaled by the MSE the
# image typically reaches at that level (`quality_lambda`). Bits go where a decibel is cheap:
# smooth images get more, textured ones fewer. On eight crops the mean PSNR at a given mean rate
# rose (BD-rate -4.8%) and the PSNR of the mean MSE fell (+2.3%), with the same per-image curves
# (bench/RESULTS.md 8h). At this texture (about the geometric mean of the fitted crops', 99.6)
# the scale is 1.
HYBRID_REFERENCE_TEXTURE = 100.0
TEXTURE_PIXELS = 2048 * 2048  # larger images are measured on a centre crop of this size
# Rate control's first probe (`_LambdaControl.probe`, at 10% of the main phase) reads a young
# network, whose latents are denser and whose PSNR is lower than the plain stream's at the same
# lambda will be. Per level of the hybrid ladder: the median, over eight crops, of the probe's
# size over the plain stream's, and of its PSNR minus the plain stream's (bench/RESULTS.md 8c;
# measured at levels 0, 2, 4, 6 and 8, levels 6 and 8 again with their learning rate of 8g; odd
# levels between their neighbours).
FIRST_PROBE_OVERSIZE = (1.62, 1.38, 1.18, 1.12, 1.07, 1.15, 1.24, 1.22, 1.2)
FIRST_PROBE_PSNR_OFFSET = (0.27, -0.29, -0.84, -0.88, -0.91, -0.73, -0.55, -0.51, -0.47)


def texture(array: np.ndarray) -> float:
    """Mean squared difference (8-bit levels, at least 1) between an image [H, W, C] (uint8) and
    its 2x box-downsampled, bilinearly re-upsampled copy: how much detail sits at the finest scale."""
    h, w = array.shape[:2]
    side = math.isqrt(TEXTURE_PIXELS)
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    crop = array[top: top + min(h, side), left: left + min(w, side)]
    crop = crop[: crop.shape[0] // 2 * 2, : crop.shape[1] // 2 * 2]
    if not crop.size:
        return 1.0
    x = torch.from_numpy(np.array(crop, np.float32)).permute(2, 0, 1)[None]
    smooth = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return max(1.0, float(((smooth - x) ** 2).mean()))


def _hybrid_fit(c: tuple[float, ...], q: int, log_texture: float) -> float:
    return c[0] + c[1] * q + c[2] * q * q + (c[3] + c[4] * q) * log_texture


def typical_hybrid_rd(array: np.ndarray) -> list[tuple[float, float]]:
    """(bpp, PSNR) a hybrid encode of this image typically reaches at each level's own lambda
    (QUALITY_LAMBDAS, as rate control starts from)."""
    t = math.log(min(max(texture(array), HYBRID_FIT_TEXTURE[0]), HYBRID_FIT_TEXTURE[1]))
    return [(math.exp(_hybrid_fit(HYBRID_LOG_BPP_FIT, q, t)), _hybrid_fit(HYBRID_PSNR_FIT, q, t))
            for q in range(len(QUALITY_LAMBDAS))]


def quality_lambda(quality: int, mode: str, array: np.ndarray) -> float:
    """The lambda quality level `quality` trains this image at. In hybrid mode a level prices a
    decibel rather than a unit of MSE: its lambda is scaled by the MSE this image typically
    reaches there over that of an image of HYBRID_REFERENCE_TEXTURE."""
    if mode != "hybrid":
        return QUALITY_LAMBDAS[quality]
    reference = _hybrid_fit(HYBRID_PSNR_FIT, quality, math.log(HYBRID_REFERENCE_TEXTURE))
    return QUALITY_LAMBDAS[quality] * 10 ** ((reference - typical_hybrid_rd(array)[quality][1]) / 10)


def _nearest_level(lmbda: float) -> int:
    """The quality level whose lambda is nearest `lmbda` (in log)."""
    return min(range(len(QUALITY_LAMBDAS)), key=lambda q: abs(math.log(QUALITY_LAMBDAS[q] / lmbda)))


def _quality_for_target(mode: str, array: np.ndarray, target_bytes: int | None, target_psnr: float | None) -> int:
    """The quality level rate control starts at, from a size or a PSNR target: in hybrid mode the
    level whose typical size for this image is nearest, or the first whose typical PSNR reaches
    the target (below it a generated full-resolution latent may saturate)."""
    pixels = array.shape[0] * array.shape[1]
    if mode == "hybrid":
        typical = typical_hybrid_rd(array)
        if target_psnr is not None:
            return next((q for q, (_, psnr) in enumerate(typical) if psnr >= target_psnr), 8)
        bpp = 8 * target_bytes / pixels
        return min(range(9), key=lambda q: abs(math.log(typical[q][0] / bpp)))
    if target_psnr is not None:
        return next((q for q, psnr in enumerate(TYPICAL_PSNR) if psnr >= target_psnr), 8)
    fits = [q for q, c in enumerate(QUALITY_CONFIGS) if c.n_params() * BITS_PER_PARAMETER <= 8 * target_bytes]
    return max(fits, default=0)


class _LambdaControl:
    """Sets the training lambda for a size or PSNR target (rate control by training).

    Main phase: the size and PSNR of its network say little about the final stream, because
    the quantization-aware phase changes them a lot, by an amount that depends on the image
    and on lambda (on a textured crop: x1.37 at lambda 5e-3, x0.51 at 5e-2; bench/RESULTS.md
    7p). So at PROBE_AT of the main phase `probe` runs the quantization-aware phase on a copy
    of the network, measures the stream it would end with (the first reading less its typical
    bias at the level: FIRST_PROBE_OVERSIZE, FIRST_PROBE_PSNR_OFFSET; the last one after most
    of `_finish`, as a plain encode ends), and sets lambda from it: by the typical slope of
    size (or PSNR) against lambda after one probe, by the secant through the two after the
    second. If the first probe moves lambda far, the main phase starts over at the new lambda,
    on a schedule shortened by the share of it already spent.
    Between probes lambda stays fixed.
    The quantization-aware phase then keeps lambda: steering it there with the coded stream
    every 25 steps wound it 1.2-3.3x the wrong way while the network answered slowly, and cost
    up to 0.29 dB on size targets and 7-15% of the bytes on PSNR targets (bench/RESULTS.md 8e).
    """

    PROBE_AT = (0.1, 0.4)  # fractions of the main phase
    RESTART_FACTOR = 1.5  # the first probe moved lambda more than this: train again from scratch
    SIZE_SLOPE = 0.6  # -d log(size) / d log(lambda) across the hybrid ladder (bpp 0.16-0.45 for 5.7x lambda)
    SLOPE_RANGE = (0.2, 2.0)  # what a secant may measure before it is taken for noise
    DB_PER_DOUBLING = 1.5  # PSNR change when lambda doubles, roughly, across the ladder
    SIZE_GOAL = 0.985  # of target_bytes: the middle of the accepted band [0.97, 1]
    PSNR_MARGIN = 0.05  # dB above target_psnr: the middle of the accepted band

    def __init__(self, trainer: _Trainer, header, target_bytes: int | None, target_psnr: float | None,
                 first_probe_bias: float = 0.0):
        self.t, self.header = trainer, header
        self.target_bytes, self.target_psnr = target_bytes, target_psnr
        self.first_probe_bias = first_probe_bias  # what the first probe over-reads, in log size or dB
        self.bounds = (trainer.lmbda * 1e-4, trainer.lmbda * 1e4)  # an unreachable target stops here
        self.probed: list[tuple[float, float]] = []  # (log lambda, log size or PSNR in dB) per probe
        self.secant_from = 0  # probes before this one measured another network

    def _reading(self, quantizer: _Quantizer, exponents: list[int]) -> float:
        """Log size in bytes or PSNR in dB (whichever the target is) of the stream at these steps."""
        if self.target_bytes is not None:
            return math.log(len(_bitstream(quantizer, exponents, *self.header)))
        return quantizer.psnr(exponents)

    @property
    def _goal(self) -> float:
        if self.target_bytes is not None:
            return math.log(self.SIZE_GOAL * self.target_bytes)
        return self.target_psnr + self.PSNR_MARGIN

    @property
    def _slope(self) -> float:
        """d (log size or PSNR) / d log lambda: typical, or the secant through the last two probes."""
        typical = -self.SIZE_SLOPE if self.target_bytes is not None else -self.DB_PER_DOUBLING / math.log(2)
        probed = self.probed[self.secant_from:]
        if len(probed) < 2 or probed[-1][0] == probed[-2][0]:
            return typical
        (x0, y0), (x1, y1) = probed[-2:]
        secant, lo, hi = (y1 - y0) / (x1 - x0), *self.SLOPE_RANGE
        return secant if lo * abs(typical) <= -secant <= hi * abs(typical) else typical

    def follow(self, trainer: _Trainer, header) -> None:
        """Steer `trainer` from now on (the main phase started over, maybe with another network)."""
        if trainer.model.config != self.t.model.config:
            self.secant_from = len(self.probed)
        self.t, self.header = trainer, header

    def needs_probe(self, it: int, n_main: int) -> bool:
        """Whether the main phase should probe now (once at each PROBE_AT)."""
        return len(self.probed) < len(self.PROBE_AT) and it >= self.PROBE_AT[len(self.probed)] * n_main

    def probe(self, n: int) -> bool:
        """Run the quantization-aware phase (step search, n hard-rounding steps) on a copy of the
        network, measure the stream it ends with, and move lambda to where that would meet the
        goal (at most 16x either way). Costs n training steps (the last probe, an RDOQ too).
        Returns whether the main phase should start over at the new lambda (the first probe
        moved it by over RESTART_FACTOR: early training at a lambda far off leaves a network
        that later training does not repair, bench/RESULTS.md 7p)."""
        twin = self.t.copy()
        quantizer = _Quantizer(twin)
        exponents = quantizer.search(_learned_exponents(twin), passes=2, reach=4)
        _fine_tune(twin, exponents, n)
        quantizer = _Quantizer(twin)
        if len(self.probed) == len(self.PROBE_AT) - 1:  # the last probe reads the finished stream
            measured = self._reading(*_finish(quantizer, exponents, full=False))
        else:
            measured = self._reading(quantizer, exponents) - (0.0 if self.probed else self.first_probe_bias)
        self.probed.append((math.log(self.t.lmbda), measured))
        step = max(-math.log(16), min(math.log(16), (self._goal - measured) / self._slope))
        self._scale_lambda(math.exp(step))
        return len(self.probed) == 1 and abs(step) > math.log(self.RESTART_FACTOR)

    def _scale_lambda(self, factor: float) -> None:
        self.t.lmbda = min(self.bounds[1], max(self.bounds[0], self.t.lmbda * factor))


def _fine_tune(trainer: _Trainer, exponents: list[int], n: int, report=None) -> None:
    """Quantization-aware phase: n steps with hard rounding (straight-through) at fixed steps,
    the learning rate on a cosine from qat_lr."""
    trainer.rate.fix(exponents)
    for it in range(n):
        lr = trainer.tc.qat_lr * _lr_factor(it, n, 1)
        out = trainer.step(lr, _straight_through(trainer.params, exponents))
        if report:
            report(*out, it)


def _finish(quantizer: _Quantizer, exponents: list[int], full: bool = True) -> tuple[_Quantizer, list[int]]:
    """A fine-tuned network's last steps to its stream: a short step search, then `_polish`,
    both at the quantizer's lambda. Returns the polished quantizer and its steps. Not `full`:
    only the polish's first part, the latents' RDOQ (`_refine`), which makes nearly all of its
    change of size in a third of its time (bench/RESULTS.md 8e)."""
    exponents = quantizer.search(exponents, passes=1, reach=1)
    if full:
        return _polish(quantizer, exponents), exponents
    return (_refine(quantizer, exponents) if quantizer.t.model.config.coded_scales else quantizer), exponents


def _learned_exponents(trainer: _Trainer) -> list[int]:
    return [min(MAX_EXPONENT, max(0, round(-float(s)))) for s in trainer.rate.log2_steps.detach()]


def _bitstream(quantizer: _Quantizer, exponents: list[int], width: int, height: int, config: ModelConfig) -> bytes:
    qs, codes = quantizer.codes(exponents)
    header = bitstream.Header(width, height, config, quantizer.t.seed, tuple(codes))
    return bitstream.write(header, encode_tensors(qs, codes))


def _rate_control(quantizer: _Quantizer, exponents: list[int], header: tuple, target_bytes: int | None,
                  target_psnr: float | None, tries: int = 16) -> tuple[list[int] | None, bool, list[int] | None]:
    """Bisect the lambda of the step search (trained weights fixed) to meet a target.

    Size: the largest stream not above target_bytes, stopping within 3% under it.
    PSNR: the smallest stream with PSNR >= target_psnr, stopping within 0.1 dB above it.
    Returns (exponents, landed in that band, beyond): exponents is None when no stream meets
    the target (for a PSNR: the highest PSNR seen instead, with landed False); `beyond` is the
    nearest assignment on the far side of the band (the smallest stream over a size target,
    or the found one when its PSNR is above the band), for `_trim`, or None.
    """
    lo, hi = math.log(quantizer.lmbda) - 4, math.log(quantizer.lmbda) + 4
    if target_bytes is not None:
        # Streams still over the target at the top of the range (the probes drove lambda far
        # down, e.g. on a tiny image where the network weighs most): move the range up.
        for _ in range(3):
            quantizer.lmbda = math.exp(hi)
            if len(_bitstream(quantizer, quantizer.search(exponents, passes=2, reach=4), *header)) <= target_bytes:
                break
            lo, hi = hi, hi + 8
    best: tuple[int, list[int]] | None = None  # (size, exponents)
    over: tuple[int, list[int]] | None = None  # the smallest stream over a size target
    closest = (-math.inf, exponents)  # highest PSNR seen, for an unreachable PSNR target
    for _ in range(tries):
        mid = (lo + hi) / 2
        quantizer.lmbda = math.exp(mid)
        exps = quantizer.search(exponents, passes=2, reach=4)
        size = len(_bitstream(quantizer, exps, *header))
        psnr = quantizer.psnr(exps)
        closest = max(closest, (psnr, exps), key=lambda c: c[0])
        if target_bytes is not None:
            ok = size <= target_bytes
            if ok and (best is None or size > best[0]):
                best = (size, exps)
            if not ok and (over is None or size < over[0]):
                over = (size, exps)
            if ok and size >= SIZE_BAND * target_bytes:
                return exps, True, None
            lo, hi = (lo, mid) if ok else (mid, hi)  # room left: lower lambda, more bits
        else:
            ok = psnr >= target_psnr
            if ok and (best is None or size < best[0]):
                best = (size, exps)
            if ok and psnr <= target_psnr + PSNR_BAND_DB:
                return exps, True, None
            lo, hi = (mid, hi) if ok else (lo, mid)  # quality to spare: higher lambda, fewer bits
    if target_bytes is not None:
        return (best[1] if best else None), False, (over[1] if over else None)
    return (best[1] if best else closest[1]), False, (best[1] if best else None)


def _restart(quantizer: _Quantizer, found: list[int], beyond: list[int] | None, header: tuple,
             target_bytes: int | None) -> list[int]:
    """The steps a fine-tuning after a missed band starts from: for a size target, whichever of the
    streams on either side of the band (`_rate_control`'s found and beyond) is nearer the goal.
    A step moves the size by up to ~40%, and the fine-tuning shrinks a stream a little over
    the target more readily than it grows one far under it (bench/RESULTS.md 7h)."""
    if target_bytes is None or beyond is None:
        return found
    goal = _LambdaControl.SIZE_GOAL * target_bytes
    return min((found, beyond), key=lambda e: abs(math.log(len(_bitstream(quantizer, e, *header)) / goal)))


def _in_band(quantizer: _Quantizer, exponents: list[int], header: tuple, target_bytes: int | None,
             target_psnr: float | None) -> bool:
    """Whether the stream lands in the target band (SIZE_BAND, PSNR_BAND_DB)."""
    if target_bytes is not None:
        return SIZE_BAND * target_bytes <= len(_bitstream(quantizer, exponents, *header)) <= target_bytes
    return target_psnr <= quantizer.psnr(exponents) <= target_psnr + PSNR_BAND_DB


def _polish_in_band(quantizer: _Quantizer, exponents: list[int], header: tuple, target_bytes: int | None,
                    target_psnr: float | None) -> _Quantizer:
    """`_polish` of a stream in the target band, ending in the band. The polish mostly saves
    bits, which a polish held inside the band cannot keep (on one crop it would have taken 12% off
    the size for +0.15 dB, bench/RESULTS.md 7z). So it may leave the band on the target's safe
    side (a smaller stream, or a higher PSNR); `_trim` then moves latent values back into the
    band, spending (or saving) bits where that pays most. If that fails, the polish held inside
    the band."""
    def safe(q: _Quantizer) -> bool:
        if target_bytes is not None:
            return len(_bitstream(q, exponents, *header)) <= target_bytes
        return q.psnr(exponents) >= target_psnr

    polished = _polish(quantizer, exponents, keep=safe)
    if _in_band(polished, exponents, header, target_bytes, target_psnr):
        return polished
    landed = _trim(polished, exponents, header, target_bytes, target_psnr)
    if landed is not None:
        return landed
    return _polish(quantizer, exponents, keep=functools.partial(_in_band, exponents=exponents, header=header,
                                                                 target_bytes=target_bytes, target_psnr=target_psnr))


def _apply_prefix(moves: _Refinement, values: np.ndarray, directions: np.ndarray, n: int) -> _Quantizer:
    return moves.apply(values[:n], directions[:n])


def _trim(quantizer: _Quantizer, exponents: list[int], header: tuple, target_bytes: int | None,
          target_psnr: float | None, rounds: int = 32) -> _Quantizer | None:
    """Land in the target band from an assignment outside it by moving latent values one at a
    time (the steps are too coarse a knob); None if it cannot.

    Below the band (a smaller stream, or a lower PSNR) the moves spend bits where they lower the
    MSE most; above it they save bits where that costs the least MSE. Each round re-estimates
    the moves and takes its independent ones (disjoint footprints), bisecting inside the round
    that crosses the band's edge.
    """
    def size(q: _Quantizer) -> int:
        return len(_bitstream(q, exponents, *header))

    def beyond(q: _Quantizer) -> bool:  # past the band's far edge in the direction of travel
        if target_bytes is not None:
            return size(q) > target_bytes if spend else size(q) <= target_bytes
        return q.psnr(exponents) >= target_psnr if spend else q.psnr(exponents) < target_psnr

    spend = size(quantizer) < target_bytes if target_bytes is not None else quantizer.psnr(exponents) < target_psnr
    keep_last = (target_bytes is not None) == spend  # whether the band is before the edge
    jumped = np.zeros(0, np.int64)

    def attempt(moves: _Refinement, per_scale: bool) -> tuple[_Quantizer | None, _Quantizer | None, int | None]:
        """One round of moves: (the assignment after it, the landing if it crossed into the
        band, the move that jumped over the band if it crossed without landing)."""
        values, directions = moves.ranked("spend" if spend else "save", per_scale=per_scale, exclude=jumped)
        if not len(values):
            return None, None, None
        applied = functools.lru_cache(maxsize=None)(functools.partial(_apply_prefix, moves, values, directions))
        if not beyond(applied(len(values))):
            return applied(len(values)), None, None
        lo, hi = 0, len(values)
        while lo < hi:  # the first n that is beyond
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if beyond(applied(mid)) else (mid + 1, hi)
        landed = applied(lo - 1 if keep_last else lo)
        if _in_band(landed, exponents, header, target_bytes, target_psnr):
            return None, landed, None
        # Typically one move jumped over the whole band (a coarse value moves the PSNR a lot):
        # go on from just before it, without it.
        return applied(lo - 1), None, values[lo - 1]

    current = quantizer
    for _ in range(rounds):
        moves = _Refinement(current, exponents)
        # Moves disjoint per scale: many per round, fast while far from the band. If such a
        # round crosses the band and misses it, it is redone with moves disjoint across scales,
        # whose sum the estimates predict better.
        for per_scale in (True, False):
            following, landed, jump = attempt(moves, per_scale)
            if landed is not None:
                return landed
            if jump is None:
                break
        if following is None:
            return None
        current = following
        if jump is not None:
            jumped = np.append(jumped, jump)
    return None


def _land(quantizer: _Quantizer, found: list[int] | None, beyond: list[int] | None, header: tuple,
          target_bytes: int | None, target_psnr: float | None) -> tuple[_Quantizer, list[int] | None]:
    """`_trim` from the nearest streams on both sides of the band (`_rate_control`'s found
    and beyond); the best landing (for a size, never below the PSNR of the stream under the
    band), else the inputs unchanged."""
    floor = -math.inf if found is None else quantizer.psnr(found)
    landings = []
    for start in dict.fromkeys(tuple(e) for e in (found, beyond) if e is not None):
        exponents = list(start)
        trimmed = _trim(quantizer, exponents, header, target_bytes, target_psnr)
        if trimmed is None:
            continue
        psnr = trimmed.psnr(exponents)
        if target_bytes is not None and psnr >= floor:
            landings.append((psnr, trimmed, exponents))
        elif target_bytes is None:
            landings.append((-len(_bitstream(trimmed, exponents, *header)), trimmed, exponents))
    if not landings:
        return quantizer, found
    _, trimmed, exponents = max(landings, key=lambda c: c[0])
    return trimmed, exponents


REFINE_ROUNDS = 16  # at most, of `_refine`; it stops at the first round that does not lower the cost


def _refine(quantizer: _Quantizer, exponents: list[int], keep=None, rounds: int = REFINE_ROUNDS) -> _Quantizer:
    """RDOQ at the quantizer's lambda: apply the independent latent moves whose estimated
    MSE + lambda * bpp change is negative (or the better half of them) while that lowers the
    measured cost (and `keep`, if given, accepts the result), re-estimating each round."""
    best = quantizer
    for _ in range(rounds):
        moves = _Refinement(best, exponents)
        values, directions = moves.ranked("rd", best.lmbda / best.t.pixels)
        candidates = (moves.apply(values[:n], directions[:n]) for n in (len(values), len(values) // 2) if n)
        better = next((c for c in candidates if c.cost(exponents) < best.cost(exponents) and (keep is None or keep(c))),
                      None)
        if better is None:
            break
        best = better
    return best


def _exact_moves(quantizer: _Quantizer, exponents: list[int], visits, keep=None) -> _Quantizer:
    """Greedy RDOQ with exact measurements: for each (tensor name, flat index) of `visits` in
    turn, the integer moves one step down or up if that lowers the measured MSE of the 8-bit
    output + lambda * the tensor's coded bits (its code held fixed); each try costs one forward
    pass. The result, its codes fitted again, is kept if its real cost is lower (and `keep`
    accepts it)."""
    t = quantizer.t
    step = dict(zip(quantizer.float_params, exponents))
    params = {name: _dequantize_like(quantizer.tensor(name, e)[0], e, p)
              for (name, p), e in zip(quantizer.float_params.items(), exponents)}
    per_bit = quantizer.lmbda / t.pixels
    mse = quantizer.measure(exponents)[0]
    ints, bits, changed = {}, {}, set()
    for name, i in visits:
        e, (q, code, b) = step[name], quantizer.tensor(name, step[name])
        q = ints.setdefault(name, q.copy())  # its integers as moved so far
        flat, v, best = q.reshape(-1), int(q.flat[i]), None
        for moved in (v - 1, v + 1):
            if abs(moved) > code.max_abs:
                continue
            flat[i] = moved
            trial = {**params, name: _dequantize_like(q, e, params[name])}
            trial_mse, trial_bits = _output_mse(t, trial), tensor_bits(q, code)
            gain = trial_mse - mse + per_bit * (trial_bits - bits.get(name, b))
            if gain < 0 and (best is None or gain < best[0]):
                best = (gain, moved, trial_mse, trial_bits, trial)
        flat[i] = v if best is None else best[1]
        if best is not None:
            _, _, mse, bits[name], params = best
            changed.add(name)
    if not changed:
        return quantizer
    refined = _Quantizer(t, {**quantizer.float_params, **{name: params[name] for name in changed}})
    refined.lmbda = quantizer.lmbda
    refined.cache = {key: entry for key, entry in quantizer.cache.items() if key[0] not in changed}
    better = refined.cost(exponents) < quantizer.cost(exponents) and (keep is None or keep(refined))
    return refined if better else quantizer


def _refine_weights(quantizer: _Quantizer, exponents: list[int], keep=None, passes: int = 2,
                    budget: int = 2000) -> _Quantizer:
    """Per-weight RDOQ (`_exact_moves` on the layer tensors): rounding to nearest is not what
    minimizes the output's error (AdaRound's observation). Each pass visits the weights in
    order of their gradient's size, at most `budget` visits in all."""
    t = quantizer.t
    names = list(quantizer.float_params)[: 2 * len(t.model.config.layer_shapes())]
    for _ in range(passes):
        if budget <= 0:
            break
        point = {name: _dequantize_like(quantizer.tensor(name, e)[0], e, p).requires_grad_(name in names)
                 for (name, p), e in zip(quantizer.float_params.items(), exponents)}
        out = functional_call(t.model, point, (t.noise,))
        grads = torch.autograd.grad(F.mse_loss(out.clamp(0, 1), t.target), [point[name] for name in names])
        where = [(name, i) for name, g in zip(names, grads) for i in range(g.numel())]
        order = np.argsort(-torch.cat([g.flatten() for g in grads]).abs().cpu().numpy(), kind="stable")[:budget]
        budget -= len(order)
        refined = _exact_moves(quantizer, exponents, [where[k] for k in order], keep)
        if refined is quantizer:
            break
        quantizer = refined
    return quantizer


def _refine_coarse_latents(quantizer: _Quantizer, exponents: list[int], keep=None, budget: int = 3000) -> _Quantizer:
    """RDOQ of the coarsest transmitted latents, value by value with exact measurements
    (`_exact_moves`), as many latents, coarsest first, as fit in `budget` values: each of their
    values reaches far in the image, where `_refine`'s second-order estimate is poorest."""
    visits = []
    for name in [n for n in quantizer.float_params if n.startswith("coded.")]:
        size = quantizer.float_params[name].numel()
        if len(visits) + size > budget:
            break
        visits += [(name, i) for i in range(size)]
    return _exact_moves(quantizer, exponents, visits, keep) if visits else quantizer


POLISH_CYCLES = 2  # a second cycle still lowers J by 0.1-1.7% (bench/RESULTS.md 7s)


def _polish(quantizer: _Quantizer, exponents: list[int], keep=None, rounds_done: int = 0) -> _Quantizer:
    """RD refinement of the quantized network at its final steps, in POLISH_CYCLES cycles of:
    the latents by estimate (`_refine`), every weight, the coarse latents exactly, the latents
    and the weights again. Moves of one kind open moves of the others (bench/RESULTS.md 7s).
    `rounds_done`: rounds of the first `_refine` the network has had already
    (bench/refine_streams.py)."""
    for _ in range(POLISH_CYCLES):
        if quantizer.t.model.config.coded_scales:
            quantizer = _refine(quantizer, exponents, keep, REFINE_ROUNDS - rounds_done)
            quantizer = _refine_weights(quantizer, exponents, keep)
            quantizer = _refine_coarse_latents(quantizer, exponents, keep)
            quantizer = _refine(quantizer, exponents, keep)
        quantizer = _refine_weights(quantizer, exponents, keep)
        rounds_done = 0
    return quantizer


def network_structures(quality: int, mode: str = DEFAULT_MODE,
                       preset_name: str | None = None) -> tuple[tuple[ModelConfig, int], ...]:
    """The networks `encode` tries at a quality level, each with its default number of training
    iterations (several networks only at a hybrid level with HYBRID_ALTERNATIVES and no
    preset); it keeps one of them."""
    if not 0 <= quality <= 8:
        raise ValueError(f"quality must be in 0..8, got {quality}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    iterations = DEFAULT_ITERATIONS[mode]
    if preset_name:
        config = preset(preset_name)
        return ((replace(config, coded_scales=config.n_scales) if mode == "hybrid" else config, iterations[quality]),)
    if mode == "hybrid":
        return tuple((HYBRID_CONFIGS[q], iterations[q]) for q in (quality, *HYBRID_ALTERNATIVES.get(quality, ())))
    return ((QUALITY_CONFIGS[quality], iterations[quality]),)


def _resolve(quality: int, preset_name: str | None, lmbda: float | None, config: ModelConfig | None,
             mode: str, array: np.ndarray, rate_control: bool) -> tuple[float, tuple[tuple[ModelConfig, int], ...]]:
    """lambda (rate control's start: the level's own) and the networks to try with their
    iterations (`config` alone if given)."""
    structures = network_structures(quality, mode, preset_name)
    if lmbda is not None:
        lam = float(lmbda)
    else:
        lam = QUALITY_LAMBDAS[quality] if rate_control else quality_lambda(quality, mode, array)
    if lam <= 0 or not math.isfinite(lam):
        raise ValueError(f"lambda must be a positive number, got {lmbda}")
    return lam, structures if config is None else ((config, structures[0][1]),)


@retain_freed_memory()  # the training steps reuse their freed activations' pages
def encode(
    image: ImageLike,
    quality: int = 4,
    *,
    mode: str = DEFAULT_MODE,
    preset: str | None = None,
    lmbda: float | None = None,
    config: ModelConfig | None = None,
    iterations: int | None = None,
    seeds: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    training: TrainingConfig | None = None,
    target_bytes: int | None = None,
    target_psnr: float | None = None,
    verbose: bool = True,
) -> bytes:
    """Encode an image into an n2l bitstream.

    quality (0..8) picks lambda (in hybrid mode scaled to the image: `quality_lambda`) and,
    unless `preset` or `config` is given, the architecture; `lmbda` overrides the lambda. `mode`
    is "pure" (the paper's design: every latent is generated from seeded noise) or "hybrid"
    (the coarse latent scales are transmitted, see HYBRID_CONFIGS; with `preset`, all of them;
    18000-24000 iterations by default instead of 2000).
    `seeds` > 1 encodes that many candidates (noise seeds seed, seed+1, ...) side by side, each
    on its share of torch's threads (the cores), and keeps the stream of lowest MSE + lambda * bpp (under
    rate control: the best one that meets the target). `verbose` shows progress bars.

    Rate control: `target_bytes` gives the largest stream not above that size (aiming within
    3% under it), `target_psnr` the smallest stream reaching that PSNR (aiming within 0.1 dB);
    the quality level is chosen from the target and lambda is set from probes during the one
    training run.
    """
    array = load_image(image)
    height, width, channels = array.shape
    if target_bytes is not None and target_psnr is not None:
        raise ValueError("give at most one of target_bytes and target_psnr")
    if target_bytes is not None and target_bytes < 1:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    rate_control = target_bytes is not None or target_psnr is not None
    if rate_control:
        quality = _quality_for_target(mode, array, target_bytes, target_psnr)
    lam, structures = _resolve(quality, preset, lmbda, config, mode, array, rate_control)
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    def networks(level: int, structures: tuple[tuple[ModelConfig, int], ...]) -> tuple[tuple[ModelConfig, TrainingConfig], ...]:
        tc = training or TrainingConfig(lr=DEFAULT_LR[mode][level], coarse_latent_rate=DEFAULT_COARSE_LATENT_RATE[mode][level])
        return tuple((replace(c, out_channels=channels), replace(tc, iterations=iterations or (tc.iterations if training else n)))
                     for c, n in structures)

    # Under rate control with the hybrid ladder's own settings, the networks follow lambda to
    # another level when a probe moves it there (`_encode_seed`).
    relevel = None
    if (mode == "hybrid" and (target_bytes is not None or target_psnr is not None)
            and preset is None and config is None and training is None and lmbda is None):
        relevel = lambda level: networks(level, network_structures(level, mode))  # noqa: E731
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not 0 <= seed <= bitstream.MAX_SEED:  # a stream with another could not be read
        raise ValueError(f"seed must be in 0..{bitstream.MAX_SEED}, got {seed}")
    device = torch.device(device)
    target = to_tensor(array).to(device)

    # Candidates side by side on threads, each with an equal share of the cores. On the CPU the
    # C++ core runs the heavy layers on that share and torch its many small ops on one thread
    # (a second thread barely speeds them up, and its idle OpenMP workers spin against the
    # core's: bench/RESULTS.md 7r); the stream then depends on no thread count.
    threads = torch.get_num_threads()
    share = max(1, threads // seeds)
    on_core = device.type == "cpu" and cpu.unavailable_reason() is None
    candidate = functools.partial(_encode_seed, target=target, lam=lam, candidates=networks(quality, structures),
                                  relevel=relevel, target_bytes=target_bytes, target_psnr=target_psnr, verbose=verbose,
                                  several=seeds > 1, threads=share)
    torch.set_num_threads(1 if on_core else share)
    try:
        if seeds == 1:
            return candidate(seed)[0]
        with ThreadPoolExecutor(seeds) as pool:
            results = list(pool.map(candidate, [(seed + k) & bitstream.MAX_SEED for k in range(seeds)], range(seeds)))
    finally:
        torch.set_num_threads(threads)
    pixels = height * width
    if target_bytes is not None:  # every candidate fits: the best PSNR
        return min(results, key=lambda r: r[1])[0]
    if target_psnr is not None:  # the smallest that reaches the target, else the best PSNR
        goal = 10 ** (-target_psnr / 10)
        return min(results, key=lambda r: (r[1] > goal, len(r[0]) if r[1] <= goal else r[1]))[0]
    return min(results, key=lambda r: r[1] + lam * 8 * len(r[0]) / pixels)[0]


def _schedule(tc: TrainingConfig) -> tuple[int, int, Callable[[int], float]]:
    """Main-phase and fine-tuning steps of a schedule, and its main phase's learning rate per step."""
    n_qat = int(tc.iterations * tc.qat_fraction)
    n_main = tc.iterations - n_qat
    warmup = max(1, int(n_main * tc.warmup_fraction))
    return n_main, n_qat, lambda it: tc.lr * _lr_factor(it, n_main, warmup)


def _encode_seed(seed: int, position: int = 0, *, target: torch.Tensor, lam: float,
                 candidates: tuple[tuple[ModelConfig, TrainingConfig], ...],
                 relevel: Callable[[int], tuple[tuple[ModelConfig, TrainingConfig], ...]] | None,
                 target_bytes: int | None, target_psnr: float | None, verbose: bool, several: bool,
                 threads: int) -> tuple[bytes, float]:
    """One candidate of `encode` (noise seed `seed`, progress bar at `position`; the best of the
    networks and their schedules in `candidates` by `_trial`; under rate control, those of
    quality level `relevel(level)` if a probe moves lambda nearest that level's): its bitstream
    and the MSE (on [0, 1]) of its 8-bit decoded image."""
    height, width = target.shape[-2:]
    name = f"n2l seed {seed}" if several else "n2l"
    bar = tqdm(total=candidates[0][1].iterations, disable=not verbose, unit="it", desc=f"{name} encode",
               dynamic_ncols=True, position=position)
    started = time.perf_counter()

    def report(loss: torch.Tensor, mse: torch.Tensor, bpp: torch.Tensor, it: int) -> None:
        bar.update(1)
        if verbose and it % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.2e}", psnr=f"{_psnr_from_mse(float(mse)):.2f}", bpp=f"{float(bpp):.3f}")

    def start(candidates: tuple[tuple[ModelConfig, TrainingConfig], ...], lam: float) -> tuple[_Trainer, int]:
        """A trainer of the network of `candidates` (the best by `_trial` if several) at lambda
        `lam`, and the steps it has had; the progress bar's total set for its schedule."""
        if len(candidates) == 1:
            trainer, it = _Trainer(candidates[0][0], seed, target, lam, candidates[0][1], threads), 0
        else:
            bar.set_description(f"{name} structures")
            share = max(1, threads // len(candidates))
            n_main, _, lr_at = _schedule(candidates[0][1])
            trainer, it = _trial([_Trainer(c, seed, target, lam, t, share) for c, t in candidates], n_main, lr_at, report)
            trainer.use_threads(threads)
            bar.set_description(f"{name} encode")
        bar.total = bar.n + trainer.tc.iterations - it
        return trainer, it

    trainer, it = start(candidates, lam)
    n_main, n_qat, lr_at = _schedule(trainer.tc)
    # Rate control sets lambda from probes of the finished stream during the main phase and
    # holds it through the fine-tuning; the finished stream is then landed on the target.
    control = None
    if target_bytes is not None or target_psnr is not None:
        level = _nearest_level(lam)
        bias = 0.0  # measured on the hybrid ladder's own networks and schedules only
        if relevel:
            bias = math.log(FIRST_PROBE_OVERSIZE[level]) if target_bytes is not None else FIRST_PROBE_PSNR_OFFSET[level]
        control = _LambdaControl(trainer, (width, height, trainer.model.config), target_bytes, target_psnr,
                                 first_probe_bias=bias)
    while it < n_main:
        report(*trainer.step(lr_at(it)), it)
        it += 1
        if control and control.needs_probe(it, n_main):
            bar.set_description(f"{name} probe")
            if control.probe(n_qat):  # lambda was far off: its early training would cost RD
                # Train again from scratch, up the ladder with the networks of the level nearest
                # the new lambda: a network chosen for the first lambda can be far from the best at
                # the new one (bench/RESULTS.md 7z). Down the ladder with the same network: a first
                # probe can read twice the final stream's size (kodim20, 8c), and a smaller network
                # that the second probe then drives back to a lower lambda saturates (kodim20: 3.8 dB
                # lower at the same size, 8c), while a larger one at a higher lambda costs a few percent (7w).
                # The new run trains what is left of the main phase: its schedule is shortened by
                # the share already spent (kodim06 at 9977 B: 0.95x the time, 0.05 dB lower at the
                # same size; bench/RESULTS.md 8g).
                reached = _nearest_level(trainer.lmbda)
                up = relevel is not None and reached > level
                again = relevel(reached) if up else ((trainer.model.config, trainer.tc),)
                rest = 1 - it / n_main
                trainer, it = start(tuple((c, replace(t, iterations=max(1, round(rest * t.iterations))))
                                          for c, t in again), trainer.lmbda)
                n_main, n_qat, lr_at = _schedule(trainer.tc)
                control.follow(trainer, (width, height, trainer.model.config))
            bar.set_description(f"{name} encode")

    # Per-tensor steps: start from the learned ones, search with the real coded size, then
    # fine-tune at those steps with hard rounding (straight-through) and polish the search.
    cfg = trainer.model.config
    header = (width, height, cfg)
    bar.set_description(f"{name} quantize")
    quantizer = _Quantizer(trainer)
    # Under rate control too: the probes set lambda for the stream after fine-tuning, which
    # changes the size a lot, so steps searched to fit the target now would be too coarse.
    exponents = quantizer.search(_learned_exponents(trainer), passes=2, reach=4)

    bar.set_description(f"{name} fine-tune")
    _fine_tune(trainer, exponents, n_qat, report)
    quantizer = _Quantizer(trainer)
    bar.set_description(f"{name} refine")
    finished, finished_exponents = _finish(quantizer, exponents)
    if control is not None and not _in_band(finished, finished_exponents, header, target_bytes, target_psnr):
        # Rate control aimed lambda at the finished stream (`_LambdaControl.probe`): move latent
        # values into the band from there, else search the steps of the fine-tuned network.
        finished = (_trim(finished, finished_exponents, header, target_bytes, target_psnr)
                    if cfg.coded_scales else None)
    if finished is not None:
        quantizer, exponents = finished, finished_exponents
    else:
        # Missing the band means the last steps of training moved the size: fine-tune a little
        # longer (a warm start, not a new encode) and search again.
        for retry in range(RATE_CONTROL_RETRIES + 1):
            bar.set_description(f"{name} rate control")
            found, landed, beyond = _rate_control(quantizer, exponents, header, target_bytes, target_psnr)
            if landed or retry == RATE_CONTROL_RETRIES or n_qat < 2:
                break
            exponents = _restart(quantizer, found or exponents, beyond, header, target_bytes)
            bar.total += n_qat // 2
            _fine_tune(trainer, exponents, n_qat // 2, report)
            quantizer = _Quantizer(trainer)
        if not landed and cfg.coded_scales:  # the steps are too coarse a knob here
            quantizer, found = _land(quantizer, found, beyond, header, target_bytes, target_psnr)
        if found is None:
            raise ValueError(f"target size {target_bytes} bytes is below the smallest stream this network can code")
        if _in_band(quantizer, found, header, target_bytes, target_psnr):
            quantizer = _polish_in_band(quantizer, found, header, target_bytes, target_psnr)
        reached = quantizer.psnr(found)
        if target_psnr is not None and reached < target_psnr:
            warnings.warn(f"target PSNR {target_psnr} dB not reached (best {reached:.2f} dB): "
                          "use more iterations or a larger network", RuntimeWarning, stacklevel=2)
        exponents = found
    buf = _bitstream(quantizer, exponents, *header)
    mse, _ = quantizer.measure(exponents)
    bar.set_postfix(psnr=f"{_psnr_from_mse(mse):.2f}", bpp=f"{8 * len(buf) / (width * height):.3f}",
                    time=f"{time.perf_counter() - started:.1f}s")
    bar.close()
    return buf, mse
