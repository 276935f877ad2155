"""The compiled C++ CPU core (``n2l._core``, built from csrc/ by ``pip install``): the decoder,
and the encoder's training kernels (`conv3x3`, `upsample`, `pointwise`, forward and backward).

The decoder runs the same network as the torch reference (n2l/model.py), row-streamed and
multithreaded, with run-time dispatch to AVX-512, AVX2 or baseline SSE2 code. The noise is bit-identical to
n2l.noise; pixels agree with the reference to within one level on rare pixels (float sums are
reordered and softplus/exp use polynomial approximations).

If the extension is missing (the build was skipped or failed) the package still works:
`unavailable_reason()` says why, and the decoder and the encoder's training fall back to torch.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .model import N2LModel, Weights

try:
    from . import _core
except ImportError as e:  # the pure-Python install, or a failed build
    _core = None
    _IMPORT_ERROR: str | None = f"n2l._core cannot be imported ({e}); reinstall with a C++17 compiler and CMake"
else:
    _IMPORT_ERROR = None

_warned = False


def unavailable_reason() -> str | None:
    """None if the compiled core can be used, else a short reason (warned about once)."""
    global _warned
    if _IMPORT_ERROR is not None and not _warned:
        _warned = True
        warnings.warn(f"n2l C++ CPU core unavailable: {_IMPORT_ERROR}", RuntimeWarning, stacklevel=2)
    return _IMPORT_ERROR


def _require_core():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _core


def default_threads() -> int:
    """All cores this process may run on (respects CPU affinity, e.g. taskset or containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def isa() -> str:
    """Instruction-set variant in use: 'avx512', 'avx2' or 'base'."""
    return _require_core().isa()


def supported_isas() -> list[str]:
    """Variants this CPU can run, best first."""
    return list(_require_core().supported_isas())


def set_isa(name: str) -> None:
    """Force an instruction-set variant (for tests and benchmarks); the best one is the default."""
    _require_core().set_isa(name)


def noise_block(seed: int, scale: int, channels: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Noise of one scale on a window, [channels, height, width] float32; same bits as n2l.noise.noise_block."""
    core = _require_core()
    out = np.empty((channels, height, width), dtype=np.float32)
    core.noise_into(seed & 0xFFFFFFFF, scale, y0, x0, out)
    return out


def decode_cpu(
    net: N2LModel | Weights, seed: int, height: int, width: int, threads: int | None = None
) -> np.ndarray:
    """Decode with the C++ core: uint8 [height, width, out_channels]. threads=None uses all cores.

    Equal (within one level on rare pixels) to ``to_uint8(model(model.noise(seed, H, W)))``
    and identical for every thread count.
    """
    core = _require_core()
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    weights = (net.weights() if isinstance(net, N2LModel) else net).cpu()  # one copy from a GPU
    cfg = weights.config
    layers = weights.layers.values()  # bitstream order
    coded = [np.ascontiguousarray(y[0].numpy()) for y in weights.coded]
    out = np.empty((height, width, cfg.out_channels), dtype=np.uint8)
    core.decode(
        seed & 0xFFFFFFFF,
        height,
        width,
        cfg.n_scales,
        cfg.latent_channels,
        cfg.gpp_hidden,
        cfg.gpp_kernel,
        cfg.gpp_kernel_min_scale,
        list(cfg.synth_hidden),
        cfg.synth_residual,
        cfg.out_channels,
        cfg.synth_upsampling == "bicubic",
        [np.ascontiguousarray(w.numpy()) for w, _ in layers],
        [np.ascontiguousarray(b.numpy()) for _, b in layers],
        coded,
        out,
        default_threads() if threads is None else max(1, int(threads)),
    )
    return out


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threads: int) -> torch.Tensor:
        x, weight, bias = (t.detach().contiguous() for t in (x, weight, bias))
        y = x.new_empty(1, weight.shape[0], *x.shape[-2:])
        _core.conv3x3_forward(x[0].numpy(), weight.numpy(), bias.numpy(), y[0].numpy(), threads)
        ctx.save_for_backward(x, weight)
        ctx.threads = threads
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, weight = ctx.saved_tensors
        gx, gw, gb = torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])
        _core.conv3x3_backward(x[0].numpy(), weight.numpy(), gy.detach().contiguous()[0].numpy(), gx[0].numpy(),
                               gw.numpy(), gb.numpy(), ctx.threads)
        return gx, gw, gb, None


class _Upsample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: int, height: int, width: int, bicubic: bool) -> torch.Tensor:
        x = x.detach().contiguous()
        y = x.new_empty(1, x.shape[1], height, width)
        _core.upsample_forward(x[0].numpy(), factor, y[0].numpy(), bicubic)
        ctx.factor, ctx.shape, ctx.bicubic = factor, x.shape, bicubic
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gx = gy.new_empty(ctx.shape)
        _core.upsample_backward(gy.detach().contiguous()[0].numpy(), ctx.factor, gx[0].numpy(), ctx.bicubic)
        return gx, None, None, None, None


class _Pointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threads: int, *params: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()
        n = len(params) // 2
        weights = [w.detach().reshape(w.shape[0], -1).contiguous() for w in params[:n]]
        biases = [b.detach().contiguous() for b in params[n:]]
        y = x.new_empty(1, weights[-1].shape[0], *x.shape[-2:])
        _core.pointwise_forward(x.view(x.shape[1], -1).numpy(), [w.numpy() for w in weights],
                                [b.numpy() for b in biases], y.view(y.shape[1], -1).numpy(), threads)
        ctx.save_for_backward(x, *weights, *biases)
        ctx.threads, ctx.shapes = threads, [p.shape for p in params]
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, *params = ctx.saved_tensors
        n = len(params) // 2
        gx = torch.empty_like(x)
        sizes = [w.numel() + b.numel() for w, b in zip(params[:n], params[n:])]
        grads = x.new_empty(sum(sizes))
        _core.pointwise_backward(x.view(x.shape[1], -1).numpy(), [w.numpy() for w in params[:n]],
                                 [b.numpy() for b in params[n:]], gy.detach().contiguous().view(gy.shape[1], -1).numpy(),
                                 gx.view(x.shape[1], -1).numpy(), grads.numpy(), ctx.threads)
        per_layer = [g.split([w.numel(), b.numel()]) for g, w, b in zip(grads.split(sizes), params[:n], params[n:])]
        gw = [g.view(shape) for (g, _), shape in zip(per_layer, ctx.shapes[:n])]
        return gx, None, *gw, *(gb for _, gb in per_layer)


# The encoder's training kernels on the C++ core, for one float32 CPU image [1, C, H, W]: the
# same functions as the reference's (n2l.model) up to float rounding, forward and backward,
# several times faster than torch's for these few channels. Their results do not depend on
# `threads` (work is split into fixed bands, summed in order).

def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """3x3 convolution with edge replication (the reference's `F.conv2d(F.pad(x, replicate))`)."""
    _require_core()
    return _Conv3x3.apply(x, weight, bias, threads)


def upsample(x: torch.Tensor, factor: int, height: int, width: int, kernel: str = "bilinear") -> torch.Tensor:
    """Bilinear or bicubic upsampling by `factor`, cropped to height x width (n2l.model.upsample)."""
    _require_core()
    return _Upsample.apply(x, factor, height, width, kernel == "bicubic")


POINTWISE_MAX_WIDTH = 64  # kMaxWidth in csrc/core.h
POINTWISE_MAX_LAYERS = 10  # kMaxSynth + 1 in csrc/module.cpp


def pointwise(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], threads: int = 1) -> torch.Tensor:
    """1x1 layers (weight [out, in, 1, 1], bias [out]) with ReLU between them, fused per pixel
    (N2LModel.pointwise); at most POINTWISE_MAX_LAYERS layers of widths <= POINTWISE_MAX_WIDTH."""
    _require_core()
    return _Pointwise.apply(x, threads, *(w for w, _ in layers), *(b for _, b in layers))


class _LaplaceBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: np.ndarray, weights: np.ndarray, threads: int) -> torch.Tensor:
        x = x.detach().contiguous()
        grad = torch.empty_like(x)
        bits = _core.laplace_bits(x.numpy(), offsets, weights, grad.numpy(), threads)
        ctx.save_for_backward(grad)
        return x.new_tensor(bits)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None


def laplace_bits(parts: list[torch.Tensor], weights: list[float], threads: int = 1) -> torch.Tensor:
    """sum_k weights[k] * n2l.encoder.laplace_bits(parts[k]) in one pass over float32 CPU
    tensors: each part under the zero-mean Laplace of scale its mean |value| (at least 1e-3),
    differentiable through the values and the scales."""
    _require_core()
    offsets = np.cumsum([0, *(p.numel() for p in parts)], dtype=np.int64)
    if offsets[-1] >= 2**31:
        raise ValueError(f"laplace_bits: {offsets[-1]} values exceed the core's int32 indices")
    flat = torch.cat([p.reshape(-1) for p in parts])
    return _LaplaceBits.apply(flat, offsets.astype(np.int32), np.asarray(weights, np.float32), threads)


class _Checkerboard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shapes: np.ndarray) -> torch.Tensor:
        x = x.detach().contiguous()
        out, alpha = x.new_empty(x.numel()), x.new_empty(len(shapes))
        _core.checkerboard_forward(x.numpy(), shapes, out.numpy(), alpha.numpy())
        ctx.shapes, ctx.x_shape = shapes, x.shape
        ctx.save_for_backward(alpha)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (alpha,) = ctx.saved_tensors
        gx = g.new_empty(ctx.x_shape)
        _core.checkerboard_backward(g.contiguous().numpy(), ctx.shapes, alpha.numpy(), gx.numpy())
        return gx, None


def checkerboard_residuals(*latents: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """n2l.encoder.checkerboard_residuals of float32 CPU latents [C, h, w] in one pass, with the
    same values and gradients bit for bit (C = 1; up to float rounding for C > 1)."""
    _require_core()
    c = latents[0].shape[0]
    shapes = np.array([v.shape[-2:] for v in latents], np.int32)
    out = _Checkerboard.apply(torch.cat([v.reshape(c, -1) for v in latents], dim=1), shapes)
    parts, grids = [], shapes.tolist()
    for (h, w), block in zip(grids, out.split([c * h * w for h, w in grids])):
        anchors, others = block.split([c * (h * w - h * w // 2), c * (h * w // 2)])
        parts.append((anchors.view(c, -1), others.view(c, -1)) if others.numel() else (anchors.view(c, -1),))
    return parts
