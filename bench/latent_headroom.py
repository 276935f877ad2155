"""How far the latent coder is from richer context models, on real streams.

    python bench/latent_headroom.py out/bitstreams/kodim01_q4.n2l ...

For every transmitted latent of each stream: the coder's bits, and the ideal code length
(discretized Laplace, parameters fitted to that latent itself, their signalling not counted:
an upper bound on what a model of the family can save) of the same integers under
- free scales: the coder's mean (one weight on the pass neighbours' mean) with a free scale
  per (pass, context level) instead of the coder's scale_code + slope x level;
- linear: each of the 4 pass neighbours, and the 4 already decoded ones twice as far in the
  same directions, weighted separately (least squares), plus a bias;
- cross-scale: linear, plus the coarser latent (bilinearly upsampled) at the same place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from n2l import bitstream
from n2l.weights import context_levels, decode_tensors, laplace_bin_bits, pass_geometry, tensor_bits

VARIANTS = ("free scales", "linear", "cross-scale")
SCALES = 2.0 ** np.arange(-6, 8, 0.125)  # the scale grid of the fits, in units of the step


def fitted_bits(x: np.ndarray, features: np.ndarray, level: np.ndarray) -> float:
    """Bits of x with a least-squares mean from `features` and the best scale per context level."""
    mean = features @ np.linalg.lstsq(features, x, rcond=None)[0] if features.size else np.zeros_like(x)
    distance = torch.from_numpy(np.abs(x - mean))
    return sum(min(float(laplace_bin_bits(distance[at], s).sum()) for s in SCALES)
               for at in (torch.from_numpy(level == v) for v in np.unique(level)))


def latent_bits(q: np.ndarray, n_passes: int, coarser: np.ndarray | None) -> np.ndarray:
    """Ideal bits of latent q [h, w] under each of VARIANTS."""
    h, w = q.shape
    up = np.zeros((h, w)) if coarser is None else F.interpolate(
        torch.from_numpy(coarser.astype(np.float64))[None, None], size=(h, w), mode="bilinear",
        align_corners=False)[0, 0].numpy()
    decoded = np.zeros((h, w), bool)
    out = np.zeros(len(VARIANTS))
    for mask, offsets in pass_geometry(n_passes, h, w):
        ys, xs = np.nonzero(mask)
        x = q[ys, xs].astype(np.float64)
        r = 2 * h + 2 * w  # padding wide enough for any offset
        known = np.pad(np.where(decoded, q, 0).astype(np.float64), r)  # the values decoded before this pass
        at = lambda offs: np.stack([known[ys + r + a, xs + r + b] for a, b in offs], 1)  # noqa: E731
        if offsets:
            near = at(offsets)
            far = at([(2 * a, 2 * b) for a, b in offsets])
            level = context_levels(np.abs(near).sum(1).astype(np.int64))
            linear = np.concatenate([near, far, np.ones((ys.size, 1))], 1)
            out += [fitted_bits(x, near.mean(1, keepdims=True), level), fitted_bits(x, linear, level),
                    fitted_bits(x, np.concatenate([linear, up[ys, xs, None]], 1), level)]
        else:
            level = np.zeros(ys.size, np.int64)
            out += [fitted_bits(x, np.empty((ys.size, 0)), level)] * 2 + [
                fitted_bits(x, np.stack([up[ys, xs], np.ones(ys.size)], 1), level)]
        decoded |= mask
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("streams", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.streams:
        buf = path.read_bytes()
        header, payload = bitstream.read(buf)
        shapes = bitstream.tensor_shapes(header.config, header.height, header.width)
        qs = decode_tensors(payload, list(header.codes), shapes)
        n = 2 * len(header.config.layer_shapes())
        weights = sum(tensor_bits(q, c) for q, c in zip(qs[:n], header.codes[:n])) / 8
        coder, ideal, coarser = 0.0, np.zeros(len(VARIANTS)), None
        for q, code in zip(qs[n:], header.codes[n:]):
            if code.max_abs:  # latents are [C, h, w]; the coder's fit is per latent, these per channel
                coder += tensor_bits(q, code)
                ideal += sum(latent_bits(channel, len(code.passes), None if coarser is None else coarser[c])
                             for c, channel in enumerate(q))
            coarser = q
        if not coder:
            print(f"{path.name}: no transmitted latents")
            continue
        ratios = ", ".join(f"{v} {b / coder:.3f}x" for v, b in zip(VARIANTS, ideal))
        print(f"{path.name}: {len(buf)} B (weights {weights:.0f} B, latents {coder / 8:.0f} B); latents: {ratios}")


if __name__ == "__main__":
    main()
