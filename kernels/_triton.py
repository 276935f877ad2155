"""Triton kernels of the n2l decoder (imported lazily by `n2l.kernels`; needs triton).

Two fused stages, following docs/FORMAT.md exactly:

* `_gpp_kernel`, one launch per scale (coarse to fine, since scale s needs y_{s+1}): per tile of
  positions it regenerates the Philox noise, upsamples the coarser latent, runs GPP layer 0
  (k x k, taps recomputed at clamped positions), ReLU, GPP layer 1, softplus and the
  reparameterization, and writes y_s into one flat latent buffer (planar [C, h_s, w_s] per scale).
* `_synth_kernel`, one launch: per tile of output pixels (plus a halo of `synth_residual`
  pixels) it upsamples every scale, runs the 1x1 synthesis chain in registers, then the 3x3
  residual layers (neighbours fetched in registers with `tl.gather`, halo recomputed, nothing
  written to global memory) and stores uint8 pixels [H, W, C_out].

Layouts: features are [channels, pixels] register tensors, channels padded to powers of two
(tl.arange needs them). Channels-first matters on the GPU: Triton's default layout spreads
threads along the last dim, so each thread owns whole pixel columns; per-pixel vectors
([None, :] slices: noise, taps, bilinear samples) are then computed once per pixel. With
[pixels, channels] the Philox code was replicated across the threads sharing a row (7 MB PTX). Contractions whose reduction dim is a feature map use `tl.dot` in
exact fp32 (`input_precision="ieee"`; TF32 would cost ~1e-3 relative error and flip pixels),
and NVIDIA's tl.dot needs K >= 16, so those widths are padded to at least 16 (zeros, masked
out by zero weights). Input layers instead accumulate rank-1 updates per input channel, which
needs no padding of the (often tiny) input channel counts.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from n2l.model import ModelConfig, N2LModel, Weights
from n2l.noise import NOISE_CENTER, NOISE_SCALE, scale_shape

_NOISE_CENTER = tl.constexpr(NOISE_CENTER)
_NOISE_SCALE = tl.constexpr(NOISE_SCALE)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _noise(seed, x, y, c, scale, EXACT_MUL: tl.constexpr):
    """Noise samples for uint32 counter tensors (x, y, channel, scale); bit-exact to n2l.noise.
    `seed` is the 32-bit seed as a signed int32 (see `_seed_arg`)."""
    w0, w1, w2, w3 = tl.philox(seed.to(tl.uint32), x, y, c, scale)
    total = (w0 >> 16) + (w0 & 0xFFFF) + (w1 >> 16) + (w1 & 0xFFFF)
    total += (w2 >> 16) + (w2 & 0xFFFF) + (w3 >> 16) + (w3 & 0xFFFF)  # <= 8 * 65535, no overflow
    m = (total.to(tl.int32) - _NOISE_CENTER).to(tl.float32)  # exact: |m| < 2**24
    if EXACT_MUL:
        # One correctly rounded multiply. `.rn` forbids ptxas/LLVM from contracting it into an
        # FMA with whatever consumes z, which would change the bits.
        z = tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;",
            "=r,r,r",
            [m, tl.full(m.shape, _NOISE_SCALE, tl.float32)],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:  # interpreter: numpy float32 multiply, already exact
        z = m * _NOISE_SCALE
    return z


@triton.jit
def _axis_taps(i, n_in, INV_FACTOR: tl.constexpr):
    """Bilinear taps along one axis (docs/FORMAT.md): i0, i1 and the weight a of i1."""
    # (i + 0.5) / f - 0.5 is exact in float32 for power-of-two f, as in the reference.
    t = tl.maximum((i.to(tl.float32) + 0.5) * INV_FACTOR - 0.5, 0.0)
    i0 = tl.minimum(t.to(tl.int32), n_in - 1)  # t >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, t - i0.to(tl.float32)


@triton.jit
def _bilinear(ptr, iy0, iy1, ay, ix0, ix1, ax, row):
    """One channel of a planar map at the given taps: first along y, then along x."""
    v00 = tl.load(ptr + iy0 * row + ix0)
    v01 = tl.load(ptr + iy0 * row + ix1)
    v10 = tl.load(ptr + iy1 * row + ix0)
    v11 = tl.load(ptr + iy1 * row + ix1)
    c0 = v00 * (1.0 - ay) + v10 * ay
    c1 = v01 * (1.0 - ay) + v11 * ay
    return c0 * (1.0 - ax) + c1 * ax


@triton.jit
def _cubic_taps(i, INV_FACTOR: tl.constexpr):
    """Bicubic taps along one axis (docs/FORMAT.md): the first of 4 consecutive (unclamped)
    indices and the 4 cubic convolution weights (a = -0.75) of the fraction t."""
    src = (i.to(tl.float32) + 0.5) * INV_FACTOR - 0.5  # exact for power-of-two factors
    lo = tl.floor(src)
    t = src - lo
    a: tl.constexpr = -0.75
    u = t + 1.0
    v = 1.0 - t
    w = 2.0 - t
    w0 = ((a * u - 5.0 * a) * u + 8.0 * a) * u - 4.0 * a
    w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    w2 = ((a + 2.0) * v - (a + 3.0)) * v * v + 1.0
    w3 = ((a * w - 5.0 * a) * w + 8.0 * a) * w - 4.0 * a
    return lo.to(tl.int32) - 1, w0, w1, w2, w3


@triton.jit
def _bicubic(ptr, iy, ay0, ay1, ay2, ay3, ix, ax0, ax1, ax2, ax3, h, w):
    """One channel of a planar [h, w] map at the given bicubic taps (edges repeated)."""
    out = tl.zeros(ay0.shape, tl.float32)
    for ky in tl.static_range(4):
        wy = ay0 if ky == 0 else (ay1 if ky == 1 else (ay2 if ky == 2 else ay3))
        row = tl.minimum(tl.maximum(iy + ky, 0), h - 1) * w
        acc = tl.zeros(ay0.shape, tl.float32)
        for kx in tl.static_range(4):
            wx = ax0 if kx == 0 else (ax1 if kx == 1 else (ax2 if kx == 2 else ax3))
            acc += wx * tl.load(ptr + row + tl.minimum(tl.maximum(ix + kx, 0), w - 1))
        out += wy * acc
    return out


@triton.jit
def _dense(x, w_ptr, b_ptr, KIN: tl.constexpr, KOUT: tl.constexpr):
    """W [KOUT, KIN] @ x [KIN, P] + b, exact fp32 (KIN >= 16 on NVIDIA)."""
    rows = tl.arange(0, KOUT)
    cols = tl.arange(0, KIN)
    w = tl.load(w_ptr + rows[:, None] * KIN + cols[None, :])
    return tl.dot(w, x, input_precision="ieee") + tl.load(b_ptr + rows)[:, None]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# Integer arguments are not specialized (on == 1 or % 16): specializing gave the same machine
# code (PTX compared offline) but one compile per image size and scale.
@triton.jit(do_not_specialize=["seed", "scale", "h", "w"])
def _noise_kernel(out_ptr, seed, scale, h, w, C: tl.constexpr, BLOCK: tl.constexpr, EXACT_MUL: tl.constexpr):
    """Noise of one scale, planar [C, h, w]; grid (cdiv(h * w, BLOCK),)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < h * w
    offs = tl.minimum(offs, h * w - 1)
    xu = (offs % w).to(tl.uint32)
    yu = (offs // w).to(tl.uint32)
    su = (tl.zeros([BLOCK], tl.int32) + scale).to(tl.uint32)
    for c in tl.static_range(C):
        z = _noise(seed, xu, yu, tl.full([BLOCK], c, tl.uint32), su, EXACT_MUL)
        tl.store(out_ptr + c * h * w + offs, z, mask=valid)


@triton.jit(do_not_specialize=["seed", "scale", "out_off", "hs", "ws", "in_off", "h1", "w1"])
def _gpp_kernel(
    lat_ptr,  # flat latent buffer: y_s written at out_off, y_{s+1} read at in_off
    w0_ptr,  # [K*K, CIN, GP]  layer 0, per tap and input channel a row over hidden units
    b0_ptr,  # [GP]
    w1_ptr,  # [2, CP, GP]     layer 1: mu rows, then sigma rows
    b1_ptr,  # [2, CP]
    seed,
    scale,
    out_off,
    hs,
    ws,
    in_off,
    h1,
    w1,
    C: tl.constexpr,
    CP: tl.constexpr,
    GP: tl.constexpr,
    K: tl.constexpr,
    COARSER: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    EXACT_MUL: tl.constexpr,
):
    """GPP + reparameterization of one scale for a BH x BW tile of positions."""
    P: tl.constexpr = BH * BW
    CIN: tl.constexpr = 2 * C if COARSER else C
    offs = tl.arange(0, P)
    py = tl.program_id(1) * BH + offs // BW
    px = tl.program_id(0) * BW + offs % BW
    valid = (py < hs) & (px < ws)
    # Lanes past the edge compute a clamped duplicate (their store is masked), so every load
    # below stays in bounds without masks.
    py = tl.minimum(py, hs - 1)
    px = tl.minimum(px, ws - 1)
    gcols = tl.arange(0, GP)
    ccols = tl.arange(0, CP)
    su = (tl.zeros([P], tl.int32) + scale).to(tl.uint32)

    acc = tl.zeros([GP, P], tl.float32) + tl.load(b0_ptr + gcols)[:, None]
    z2 = tl.zeros([CP, P], tl.float32)  # z and u at the centre tap, for the reparameterization
    u2 = tl.zeros([CP, P], tl.float32)
    for tap in tl.static_range(K * K):
        # Edge replication: each tap reads the inputs at the clamped position, recomputed
        # (noise is a pure function of the position, the coarser latent is in memory).
        qy = tl.minimum(tl.maximum(py + (tap // K - K // 2), 0), hs - 1)
        qx = tl.minimum(tl.maximum(px + (tap % K - K // 2), 0), ws - 1)
        xu = qx.to(tl.uint32)
        yu = qy.to(tl.uint32)
        if COARSER:
            iy0, iy1, ay = _axis_taps(qy, h1, 0.5)
            ix0, ix1, ax = _axis_taps(qx, w1, 0.5)
        for c in tl.static_range(C):
            z = _noise(seed, xu, yu, tl.full([P], c, tl.uint32), su, EXACT_MUL)
            acc += tl.load(w0_ptr + (tap * CIN + c) * GP + gcols)[:, None] * z[None, :]
            if tap == (K * K) // 2:
                z2 = tl.where(ccols[:, None] == c, z[None, :], z2)
            if COARSER:
                u = _bilinear(lat_ptr + in_off + c * h1 * w1, iy0, iy1, ay, ix0, ix1, ax, w1)
                acc += tl.load(w0_ptr + (tap * CIN + C + c) * GP + gcols)[:, None] * u[None, :]
                if tap == (K * K) // 2:
                    u2 = tl.where(ccols[:, None] == c, u[None, :], u2)

    hid = tl.maximum(acc, 0.0)
    mu = _dense(hid, w1_ptr, b1_ptr, GP, CP)
    ps = _dense(hid, w1_ptr + GP * CP, b1_ptr + CP, GP, CP)
    # softplus without overflow: log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    sigma = tl.maximum(ps, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(ps)))
    y = (u2 + mu) + sigma * z2
    mask = (ccols[:, None] < C) & valid[None, :]
    tl.store(lat_ptr + out_off + ccols[:, None] * (hs * ws) + (py * ws + px)[None, :], y, mask=mask)


@triton.jit(do_not_specialize=["H", "W"])
def _synth_kernel(
    lat_ptr,  # flat latent buffer, scales 0..M-1 in order, planar [C, h_s, w_s] each
    wf_ptr,  # [M*C, WIDTHS[0]]  first 1x1 layer, one row per input channel
    bf_ptr,  # [WIDTHS[0]]
    wd_ptr,  # dense 1x1 layers i >= 1: [WIDTHS[i], WIDTHS[i-1]] each, concatenated
    bd_ptr,  # their biases, concatenated
    wr_ptr,  # [R, 9, OP, OP]  residual 3x3 layers as [layer, tap, out, in]
    br_ptr,  # [R, OP]
    out_ptr,  # uint8 [H, W, CO], or float32 [CO, H, W] when OUT_FLOAT
    H,
    W,
    M: tl.constexpr,
    C: tl.constexpr,
    WIDTHS: tl.constexpr,  # padded output widths of the 1x1 layers; the last is OP >= CO
    CO: tl.constexpr,
    R: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    OUT_FLOAT: tl.constexpr,
    BICUBIC: tl.constexpr,
):
    """Upsampling + whole synthesis for a (TH - 2R) x (TW - 2R) tile of output pixels."""
    P: tl.constexpr = TH * TW
    D1: tl.constexpr = WIDTHS[0]
    OP: tl.constexpr = WIDTHS[len(WIDTHS) - 1]
    offs = tl.arange(0, P)
    ty = offs // TW
    tx = offs % TW
    oy = tl.program_id(1) * (TH - 2 * R) - R  # image coordinates of tile element 0 (halo included)
    ox = tl.program_id(0) * (TW - 2 * R) - R
    gy = oy + ty
    gx = ox + tx
    # Halo elements outside the image take the clamped position: with replicate padding every
    # layer's value there equals the value at the edge, so the 3x3 layers see the right inputs.
    cy = tl.minimum(tl.maximum(gy, 0), H - 1)
    cx = tl.minimum(tl.maximum(gx, 0), W - 1)

    # Layer synth.0 as rank-1 updates, one per upsampled latent channel (no padding of M*C).
    cols = tl.arange(0, D1)
    acc = tl.zeros([D1, P], tl.float32) + tl.load(bf_ptr + cols)[:, None]
    base = 0
    for s in tl.static_range(M):
        hs = (H + ((1 << s) - 1)) >> s
        ws = (W + ((1 << s) - 1)) >> s
        if s == 0:
            for c in tl.static_range(C):
                v = tl.load(lat_ptr + c * hs * ws + cy * ws + cx)
                acc += tl.load(wf_ptr + c * D1 + cols)[:, None] * v[None, :]
        elif BICUBIC:
            iy, ay0, ay1, ay2, ay3 = _cubic_taps(cy, 1.0 / (1 << s))
            ix, ax0, ax1, ax2, ax3 = _cubic_taps(cx, 1.0 / (1 << s))
            for c in tl.static_range(C):
                v = _bicubic(lat_ptr + base + c * hs * ws, iy, ay0, ay1, ay2, ay3, ix, ax0, ax1, ax2, ax3, hs, ws)
                acc += tl.load(wf_ptr + (s * C + c) * D1 + cols)[:, None] * v[None, :]
        else:
            iy0, iy1, ay = _axis_taps(cy, hs, 1.0 / (1 << s))
            ix0, ix1, ax = _axis_taps(cx, ws, 1.0 / (1 << s))
            for c in tl.static_range(C):
                v = _bilinear(lat_ptr + base + c * hs * ws, iy0, iy1, ay, ix0, ix1, ax, ws)
                acc += tl.load(wf_ptr + (s * C + c) * D1 + cols)[:, None] * v[None, :]
        base += C * hs * ws

    x = acc
    w_off = 0
    b_off = 0
    for i in tl.static_range(len(WIDTHS) - 1):
        x = _dense(tl.maximum(x, 0.0), wd_ptr + w_off, bd_ptr + b_off, WIDTHS[i], WIDTHS[i + 1])
        w_off += WIDTHS[i] * WIDTHS[i + 1]
        b_off += WIDTHS[i + 1]

    ocols = tl.arange(0, OP)
    for r in tl.static_range(R):
        res = x + tl.load(br_ptr + r * OP + ocols)[:, None]
        for tap in tl.static_range(9):
            # Tile index of the clamped neighbour. Only halo elements at the tile border have
            # neighbours outside the tile; their (wrong) values never reach the interior.
            ny = tl.minimum(tl.maximum(cy + (tap // 3 - 1), 0), H - 1) - oy
            nx = tl.minimum(tl.maximum(cx + (tap % 3 - 1), 0), W - 1) - ox
            nb = tl.minimum(tl.maximum(ny, 0), TH - 1) * TW + tl.minimum(tl.maximum(nx, 0), TW - 1)
            xg = tl.gather(x, tl.broadcast_to(nb[None, :], (OP, P)), axis=1)
            wt = tl.load(wr_ptr + ((r * 9 + tap) * OP + ocols[:, None]) * OP + ocols[None, :])
            res += tl.sum(wt[:, :, None] * xg[None, :, :], axis=1)
        x = res

    inside = (ty >= R) & (ty < TH - R) & (tx >= R) & (tx < TW - R) & (gy < H) & (gx < W)
    mask = (ocols[:, None] < CO) & inside[None, :]
    if OUT_FLOAT:
        tl.store(out_ptr + ocols[:, None] * (H * W) + (cy * W + cx)[None, :], x, mask=mask)
    else:
        v = tl.minimum(tl.maximum(x, 0.0), 1.0) * 255.0
        # Round half to even without libdevice (not in the interpreter): v - floor(v) is exact.
        fl = v.to(tl.int32)  # v >= 0: truncation is floor
        frac = v - fl.to(tl.float32)
        up = (frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))
        q = (fl + up.to(tl.int32)).to(tl.uint8)
        tl.store(out_ptr + (cy * W + cx)[None, :] * CO + ocols[:, None], q, mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_width(n: int) -> int:
    """Padded width of a feature map that is the K of a tl.dot (>= 16 on NVIDIA)."""
    return max(16, _pow2(n))


@dataclass(frozen=True)
class Tiles:
    """Launch geometry; defaults differ between GPU and interpreter (fewer, larger programs)."""

    gpp_bh: int
    gpp_bw: int
    gpp_warps: int
    synth_th: int
    synth_tw: int
    synth_warps: int
    noise_block: int = 1024

    @staticmethod
    def default(synth_residual: int) -> Tiles:
        if interpreted():
            side = 32 if synth_residual <= 6 else 64
            return Tiles(32, 64, 4, side, side, 4)
        # GPU: one pixel per thread. ptxas (sm_90, via kernels/offline.py) needs ~130 registers
        # per pixel for the GPP kernel and 100-255 for the synthesis; two pixels per thread hit
        # the 255 limit and spill. 16x16 synthesis tiles waste (2R/16) of the work on halos.
        if synth_residual <= 2:
            return Tiles(8, 32, 8, 16, 16, 8)
        side = _pow2(4 * synth_residual + 1)
        return Tiles(8, 32, 8, side, side, 8)


@dataclass
class _Packed:
    """Weights of one network, padded and transposed for the kernels, on the decode device."""

    device: torch.device
    gpp: dict  # generated scale -> (w0, b0, w1, b1, K)
    coded: dict  # coded scale -> its latent, flat
    wf: torch.Tensor
    bf: torch.Tensor
    wd: torch.Tensor
    bd: torch.Tensor
    wr: torch.Tensor
    br: torch.Tensor
    widths: tuple[int, ...]
    cp: int
    gp: int
    op: int


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _upload(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Arrays -> views of one device buffer, in one host-to-device copy. Each part starts on a
    64-byte boundary: Triton specializes kernels on 16-byte pointer alignment, so unaligned views
    would compile (and run) other variants."""
    sizes = [-(-a.size // 16) * 16 for a in parts]
    flat = np.zeros(sum(sizes), dtype=np.float32)
    for a, view in zip(parts, np.split(flat, np.cumsum(sizes)[:-1])):
        view[: a.size] = a.ravel()
    views = torch.from_numpy(flat).to(device).split(sizes)
    return [view[: a.size].view(a.shape) for a, view in zip(parts, views)]


def _pack(weights: Weights, device: torch.device) -> _Packed:
    """Pad and transpose in numpy on the host (dozens of tiny ops: a microsecond each there, a
    kernel launch each on a GPU), then upload everything at once."""
    cfg = weights.config
    c, m = cfg.latent_channels, cfg.n_scales
    cp, gp, op = _pow2(c), _dot_width(cfg.gpp_hidden), _pow2(cfg.out_channels)
    cpu = weights.cpu()
    layers = {name: (w.numpy(), b.numpy()) for name, (w, b) in cpu.layers.items()}

    parts: list[np.ndarray] = []  # uploaded together; the fields below index into it

    def part(a: np.ndarray) -> int:
        parts.append(a)
        return len(parts) - 1

    gpp = {}
    for s in cfg.generated_scales:
        w, b = layers[f"gpp.{s}.0"]  # [G, CIN, k, k]
        g, cin, k, _ = w.shape
        w0 = _pad(w.transpose(2, 3, 1, 0).reshape(k * k, cin, g), (k * k, cin, gp))
        w, b1 = layers[f"gpp.{s}.1"]  # [2C, G, 1, 1]
        w = w[:, :, 0, 0]
        w1 = np.stack([_pad(w[:c], (cp, gp)), _pad(w[c:], (cp, gp))])
        b1 = np.stack([_pad(b1[:c], (cp,)), _pad(b1[c:], (cp,))])
        gpp[s] = (part(w0), part(_pad(b, (gp,))), part(w1), part(b1), k)
    coded = {s: part(cpu.coded_latent(s).numpy().ravel()) for s in range(m) if cfg.is_coded(s)}

    n_synth = len(cfg.synth_hidden) + 1
    widths = tuple(_dot_width(h) for h in cfg.synth_hidden) + (op,)
    w, b = layers["synth.0"]
    wf = part(_pad(w[:, :, 0, 0].T, (m * c, widths[0])))
    bf = part(_pad(b, (widths[0],)))
    wd, bd = [], []
    for i in range(1, n_synth):
        w, b = layers[f"synth.{i}"]
        wd.append(_pad(w[:, :, 0, 0], (widths[i], widths[i - 1])).ravel())
        bd.append(_pad(b, (widths[i],)))
    wr, br = [], []
    for r in range(cfg.synth_residual):
        w, b = layers[f"synth_res.{r}"]  # [out, in, 3, 3] -> [tap, out, in]
        wr.append(_pad(w.transpose(2, 3, 0, 1).reshape(9, w.shape[0], w.shape[1]), (9, op, op)))
        br.append(_pad(b, (op,)))
    unused = np.zeros(1, np.float32)  # a valid pointer for the arguments of absent layers
    wd, bd, wr, br = (part(np.concatenate(x) if x else unused) for x in (wd, bd, wr, br))
    up = _upload(parts, device)
    return _Packed(
        device=device,
        gpp={s: (up[w0], up[b0], up[w1], up[b1], k) for s, (w0, b0, w1, b1, k) in gpp.items()},
        coded={s: up[i] for s, i in coded.items()},
        wf=up[wf], bf=up[bf], wd=up[wd], bd=up[bd], wr=up[wr], br=up[br],
        widths=widths, cp=cp, gp=gp, op=op,
    )  # fmt: skip


_PACK_CACHE: weakref.WeakKeyDictionary[N2LModel, tuple] = weakref.WeakKeyDictionary()


def _packed(net: N2LModel | Weights, device: torch.device | str | None) -> _Packed:
    """Packed weights on `device` (default: where the tensors are). A model's are cached and
    rebuilt when a parameter is replaced or modified in place."""
    if device is None:
        device = net.tensors()[0].device if isinstance(net, Weights) else next(net.parameters()).device
    device = torch.device(device)
    if device.type != "cuda" and not interpreted():
        raise RuntimeError("the Triton decoder runs on a CUDA device (or with TRITON_INTERPRET=1)")
    if isinstance(net, Weights):
        return _pack(net, device)
    try:
        key = (device, *((p.data_ptr(), p._version) for p in net.parameters()))
    except RuntimeError:  # inference-mode tensors have no version counter: don't cache
        return _pack(net.weights(), device)
    hit = _PACK_CACHE.get(net)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = _pack(net.weights(), device)
    _PACK_CACHE[net] = (key, packed)
    return packed


def _on(device: torch.device):
    """Launch on the model's GPU (Triton launches on the current device), not cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def scale_offsets(config, height: int, width: int) -> list[int]:
    """Start of each scale in the flat latent buffer, plus its total size at the end."""
    offsets = [0]
    for s in range(config.n_scales):
        hs, ws = scale_shape(height, width, s)
        offsets.append(offsets[-1] + config.latent_channels * hs * ws)
    return offsets


def _seed_arg(seed: int) -> int:
    """The 32-bit seed as a signed int32, so every seed launches the same compiled kernel (Triton
    types a Python int >= 2**31 as int64); `_noise` reinterprets it as uint32."""
    seed &= 0xFFFFFFFF
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def noise_triton(seed: int, scale: int, channels: int, height: int, width: int, device) -> torch.Tensor:
    """Noise of one whole scale, [channels, height, width] float32 (the `_noise` device code)."""
    out = torch.empty((channels, height, width), dtype=torch.float32, device=device)
    block = 1024
    _noise_kernel[(triton.cdiv(height * width, block),)](
        out, _seed_arg(seed), scale, height, width, C=channels, BLOCK=block, EXACT_MUL=not interpreted()
    )
    return out


def _latent_buffer(packed: _Packed, cfg: ModelConfig, seed: int, height: int, width: int, tiles: Tiles) -> torch.Tensor:
    offsets = scale_offsets(cfg, height, width)
    # The kernels index with int32 (cheaper than int64 on the GPU).
    if max(offsets[-1], height * width * cfg.out_channels) >= 2**31:
        raise ValueError(
            f"{width}x{height} with {cfg.latent_channels} latent channels is too large for int32 indexing"
        )
    lat = torch.empty(offsets[-1], dtype=torch.float32, device=packed.device)
    for s in reversed(range(cfg.n_scales)):
        if cfg.is_coded(s):  # hybrid mode: the latent was transmitted
            lat[offsets[s] : offsets[s + 1]] = packed.coded[s]
            continue
        hs, ws = scale_shape(height, width, s)
        coarser = s < cfg.n_scales - 1
        h1, w1 = scale_shape(height, width, s + 1) if coarser else (1, 1)
        w0, b0, wt1, b1, k = packed.gpp[s]
        grid = (triton.cdiv(ws, tiles.gpp_bw), triton.cdiv(hs, tiles.gpp_bh))
        _gpp_kernel[grid](
            lat, w0, b0, wt1, b1, _seed_arg(seed), s, offsets[s], hs, ws,
            offsets[s + 1] if coarser else 0, h1, w1,
            C=cfg.latent_channels, CP=packed.cp, GP=packed.gp, K=k, COARSER=coarser,
            BH=tiles.gpp_bh, BW=tiles.gpp_bw, EXACT_MUL=not interpreted(), num_warps=tiles.gpp_warps,
        )  # fmt: skip
    return lat


def latents_triton(
    net: N2LModel | Weights, seed: int, height: int, width: int, tiles: Tiles | None = None, device=None
) -> list[torch.Tensor]:
    """The latents y_s, finest first, each [1, C, h_s, w_s] (like N2LModel.latents)."""
    cfg = net.config
    tiles = tiles or Tiles.default(cfg.synth_residual)
    packed = _packed(net, device)
    with torch.no_grad(), _on(packed.device):
        lat = _latent_buffer(packed, cfg, seed, height, width, tiles)
    offsets = scale_offsets(cfg, height, width)
    return [
        lat[offsets[s] : offsets[s + 1]].view(1, cfg.latent_channels, *scale_shape(height, width, s))
        for s in range(cfg.n_scales)
    ]


def _synthesize(
    packed: _Packed, cfg: ModelConfig, lat: torch.Tensor, height: int, width: int, tiles: Tiles, out_float: bool
) -> torch.Tensor:
    r = cfg.synth_residual
    if tiles.synth_th <= 2 * r or tiles.synth_tw <= 2 * r:
        raise ValueError(
            f"synthesis tile {tiles.synth_th}x{tiles.synth_tw} too small for {r} residual layers"
        )
    co = cfg.out_channels
    if out_float:
        out = torch.empty((co, height, width), dtype=torch.float32, device=lat.device)
    else:
        out = torch.empty((height, width, co), dtype=torch.uint8, device=lat.device)
    grid = (triton.cdiv(width, tiles.synth_tw - 2 * r), triton.cdiv(height, tiles.synth_th - 2 * r))
    _synth_kernel[grid](
        lat, packed.wf, packed.bf, packed.wd, packed.bd, packed.wr, packed.br, out, height, width,
        M=cfg.n_scales, C=cfg.latent_channels, WIDTHS=packed.widths, CO=co, R=r,
        TH=tiles.synth_th, TW=tiles.synth_tw, OUT_FLOAT=out_float, BICUBIC=cfg.synth_upsampling == "bicubic",
        num_warps=tiles.synth_warps,
    )  # fmt: skip
    return out


def synthesis_triton(
    net: N2LModel | Weights, ys: list[torch.Tensor], height: int, width: int, tiles: Tiles | None = None
) -> torch.Tensor:
    """Synthesis of given latents (finest first, [1, C, h_s, w_s]) -> float32 [1, C_out, H, W], unclamped."""
    tiles = tiles or Tiles.default(net.config.synth_residual)
    packed = _packed(net, ys[0].device)
    with torch.no_grad(), _on(packed.device):
        lat = torch.cat([y.detach().float().reshape(-1) for y in ys])
        return _synthesize(packed, net.config, lat, height, width, tiles, out_float=True)[None]


def decode_triton(
    net: N2LModel | Weights, seed: int, height: int, width: int, tiles: Tiles | None = None, device=None
) -> torch.Tensor:
    """Decode to uint8 [H, W, C_out] on `device` (default: the weights' device): GPP launches +
    one synthesis launch."""
    tiles = tiles or Tiles.default(net.config.synth_residual)
    packed = _packed(net, device)
    with torch.no_grad(), _on(packed.device):
        lat = _latent_buffer(packed, net.config, seed, height, width, tiles)
        return _synthesize(packed, net.config, lat, height, width, tiles, out_float=False)
