"""Ablation of the latent refinement (RDOQ) stage on the bitstreams of an `n2l eval` run.

    python bench/ablate_refinement.py bench/results/eval_kodak_crops8_hybrid_v3

Each kept n2l stream (OUTDIR/bitstreams/<image>_q<quality>.n2l, encoded without the stage) is
decoded, refined at its quality's lambda exactly as the encoder's last stage does, and coded
again: the same trained network with and without the stage. Prints both streams per image and
the BD-rate of the refined curve against the original (mean PSNR per quality).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

import n2l
from n2l import encoder
from n2l.decoder import load_model
from n2l.evaluate.bdrate import bd_psnr, bd_rate
from n2l.evaluate.runner import center_crop
from n2l.images import to_tensor

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="eval output folder with kept bitstreams")
    parser.add_argument("--kodak-dir", type=Path, default=REPO.parent / "shared" / "data" / "kodak")
    args = parser.parse_args()
    rows = []  # (quality, bytes before, PSNR before, bytes after, PSNR after)
    for path in sorted((args.run / "bitstreams").glob("*.n2l")):
        image, quality = re.fullmatch(r"(.+)_q(\d+)", path.stem).groups()
        buf = path.read_bytes()
        header, model = load_model(buf)
        img = center_crop(n2l.load_image(args.kodak_dir / f"{image}.png"), header.width)
        lmbda = encoder.quality_lambda(int(quality), "hybrid" if header.config.coded_scales else "pure", img)
        trainer = encoder._Trainer(header.config, header.seed, to_tensor(img), lmbda, encoder.TrainingConfig())
        with torch.no_grad():
            for mine, decoded in zip(trainer.model.parameters(), model.parameters()):
                mine.copy_(decoded)
        exponents = [code.exponent for code in header.codes]
        started = time.perf_counter()
        refined = encoder._refine(encoder._Quantizer(trainer), exponents)
        seconds = time.perf_counter() - started
        new = encoder._bitstream(refined, exponents, header.width, header.height, header.config)
        before, after = (n2l.psnr(n2l.decode(b, device="cpu", backend="torch"), img) for b in (buf, new))
        rows.append((int(quality), len(buf), before, len(new), after))
        print(f"{image} q{quality}: {len(buf)} B {before:.2f} dB -> {len(new)} B {after:.2f} dB ({seconds:.1f} s)",
              flush=True)
    pixels = header.width * header.height
    qualities = sorted({r[0] for r in rows})
    curves = [([np.mean([8 * r[i] / pixels for r in rows if r[0] == q]) for q in qualities],
               [np.mean([r[i + 1] for r in rows if r[0] == q]) for q in qualities]) for i in (1, 3)]
    for name, (bpp, psnr) in zip(("without", "with"), curves):
        print(f"{name} refinement: " + ", ".join(f"q{q} {b:.4f} bpp {p:.2f} dB" for q, b, p in zip(qualities, bpp, psnr)))
    print(f"BD-rate {bd_rate(*curves[0], *curves[1]):+.2f}%, BD-PSNR {bd_psnr(*curves[0], *curves[1]):+.3f} dB "
          f"(mean PSNR, {len(rows)} streams)")


if __name__ == "__main__":
    main()
