"""The encoder's RD polish (`n2l.encoder._polish`) applied to the kept streams of an `n2l eval`
run of 256x256 Kodak crops made by commit 4457c07, whose encoder ended with 8 rounds of latent
refinement (`_refine`) instead.

    python bench/refine_streams.py bench/results/RUN bench/results/RUN_polished

The encode's state there is the stream's own: its dequantized integers, its seed's noise and
the crop. So the network is rebuilt from each stream (and written again first, which must give
the same bytes) and polished at the quality's lambda, continuing the latent refinement where
that encoder stopped it: the result is the stream the current encoder writes (a test of this
script's equivalence ran in bench/RESULTS.md 7s). It goes to OUT/bitstreams/ with its cache row
(bytes, bpp, PSNR, MSE, MS-SSIM; the polish's time added to the encode time). Every other row
of RUN's cache (the classical codecs) is copied, so that `python bench/eval_kodak.py --out OUT
...` with RUN's arguments rebuilds the summary and BD-rates without encoding again. Prints each
stream's change of RD cost J.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from common import KODAK

from n2l import bitstream
from n2l.encoder import TrainingConfig, _bitstream, _polish, _Quantizer, _Trainer, quality_lambda
from n2l.evaluate.codecs import N2LCodec
from n2l.evaluate.runner import load_images, measure
from n2l.images import to_tensor
from n2l.weights import decode_tensors, dequantize

ROUNDS_DONE = 8  # of latent refinement (`_refine`) in the encoder before the RD polish (commit 4457c07)


def refine(buf: bytes, crop, lmbda: float, threads: int) -> bytes:
    """The stream after the RD polish at `lmbda`, the C++ core on `threads` threads."""
    header, payload = bitstream.read(buf)
    cfg, exponents = header.config, [code.exponent for code in header.codes]
    ints = decode_tensors(payload, list(header.codes), bitstream.tensor_shapes(cfg, header.height, header.width))
    trainer = _Trainer(cfg, header.seed, to_tensor(crop), lmbda, TrainingConfig(), threads)
    with torch.no_grad():
        for p, q, e in zip(trainer.params.values(), ints, exponents):
            p.copy_(torch.from_numpy(dequantize(q, e)).view(p.shape))
    quantizer = _Quantizer(trainer)
    if _bitstream(quantizer, exponents, header.width, header.height, cfg) != buf:
        raise SystemExit("the rebuilt network does not write the same stream")
    polished = _polish(quantizer, exponents, rounds_done=ROUNDS_DONE)
    return _bitstream(polished, exponents, header.width, header.height, cfg)


class _Stored(N2LCodec):
    """n2l's eval codec, its `encode` returning a given stream (measured as `n2l eval` does)."""

    def __init__(self, buf: bytes):
        super().__init__([0])
        self.buf = buf

    def encode(self, img, quality: float) -> bytes:
        return self.buf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an n2l eval output folder (cache.jsonl, bitstreams/)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the encoder: torch on one thread, the core's kernels on the cores
    (args.out / "bitstreams").mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (args.run / "cache.jsonl").read_text().splitlines():
        row = json.loads(line)
        path = args.run / "bitstreams" / f"{row['image']}_q{row['quality']}.n2l"
        if row["codec"] != "n2l":
            rows.append(row)
            if (args.run / "bitstreams").is_dir():
                for kept in (args.run / "bitstreams").glob(f"{row['image']}_q*.{row['codec']}"):
                    shutil.copy(kept, args.out / "bitstreams" / kept.name)
            continue
        (image,) = load_images([KODAK / f"{row['image']}.png"], crop=256)
        if image.sha256 != row["image_sha256"]:
            raise SystemExit(f"{row['image']}: not the crop the run measured")
        lam = quality_lambda(row["quality"], "hybrid", image.pixels)
        start = time.perf_counter()
        buf = refine(path.read_bytes(), image.pixels, lam, threads)
        spent = time.perf_counter() - start
        new = measure(image, _Stored(buf), row["quality"], args.out / "bitstreams")
        before, after = (r["mse"] / 255**2 + lam * r["bpp"] for r in (row, new))
        print(f"{row['image']} q{row['quality']}: {row['bytes']} B {row['psnr']:.3f} dB -> {new['bytes']} B "
              f"{new['psnr']:.3f} dB, J {after / before - 1:+.2%}, {spent:.1f} s", flush=True)
        rows.append({**row, **{k: new[k] for k in ("bytes", "bpp", "psnr", "mse", "ms_ssim")},
                     "enc_time_s": row["enc_time_s"] + spent})
    (args.out / "cache.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
