"""Coder-only ablation: the streams of an `n2l eval` run, their latents coded again with the
current latent coder.

    python bench/recode_latents.py bench/results/eval_kodak_crops8_hybrid_8k

Every kept stream (OUTDIR/bitstreams/<image>_q<quality>.n2l) is decoded to its integers, its
latents' codes are fitted again and the stream is written in the current format. The integers,
hence the pixels, are the same (checked by decoding the new stream); only the latents' entropy
model and header fields change. Prints the mean size per quality before and after.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from n2l import bitstream
from n2l.weights import decode_tensors, encode_tensors, fit_code


def recode(buf: bytes) -> bytes:
    """The same integers, latents coded with the current coder, written in the current format."""
    header, payload = bitstream.read(buf)
    shapes = bitstream.tensor_shapes(header.config, header.height, header.width)
    qs = decode_tensors(payload, list(header.codes), shapes)
    n = 2 * len(header.config.layer_shapes())
    codes = [*header.codes[:n], *(fit_code(q, c.exponent, latent=True) for q, c in zip(qs[n:], header.codes[n:]))]
    out = bitstream.write(bitstream.Header(header.width, header.height, header.config, header.seed, tuple(codes)),
                          encode_tensors(qs, codes))
    again = decode_tensors(bitstream.read(out)[1], codes, shapes)
    assert all((a == b).all() for a, b in zip(again, qs)), "re-coded stream decodes to other integers"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an n2l eval output folder with bitstreams/")
    args = parser.parse_args()
    sizes: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for path in sorted((args.run / "bitstreams").glob("*.n2l")):
        quality = int(re.search(r"_q(\d+)\.n2l$", path.name).group(1))
        buf = path.read_bytes()
        sizes[quality].append((len(buf), len(recode(buf))))
    for quality, pairs in sorted(sizes.items()):
        before, after = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        print(f"quality {quality}: {len(pairs)} streams, {before:.1f} -> {after:.1f} bytes ({after / before - 1:+.1%})")


if __name__ == "__main__":
    main()
