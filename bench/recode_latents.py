"""Coder-only ablation: the streams of an `n2l eval` run, their latents coded again with the
current latent coder and written in the current format.

    python bench/recode_latents.py bench/results/eval_kodak_crops8_hybrid_8k [--depth 1]

Every kept stream (OUTDIR/bitstreams/<image>_q<quality>.n2l) is decoded to its integers, its
latents' codes are fitted again and the stream is written in the current format. The integers,
hence the pixels, are the same (checked by decoding the new stream); only the latents' entropy
model and header fields change. Prints the mean size per quality before and after, and the
dataset BD-rates against the run's other codecs with the old and the new sizes. `--depth`
codes every latent at that depth (1: as formats 4 and 5 did) instead of the cheapest one.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections import defaultdict
from pathlib import Path

from n2l import bitstream
from n2l.evaluate.report import REFERENCE, bd_tables, dataset_curve, read_tsv
from n2l.weights import MAX_DEPTH, decode_tensors, encode_tensors, fit_latent


def recode(buf: bytes, depth: int | None = None) -> bytes:
    """The same integers, latents coded with the current coder (at `depth`, or the cheapest),
    written in the current format."""
    header, payload = bitstream.read(buf)
    shapes = bitstream.tensor_shapes(header.config, header.height, header.width)
    qs = decode_tensors(payload, list(header.codes), shapes)
    n = 2 * len(header.config.layer_shapes())
    codes = [*header.codes[:n], *(fit_latent(q, c.exponent, depth) for q, c in zip(qs[n:], header.codes[n:]))]
    out = bitstream.write(bitstream.Header(header.width, header.height, header.config, header.seed, tuple(codes)),
                          encode_tensors(qs, codes))
    again = decode_tensors(bitstream.read(out)[1], codes, shapes)
    assert all((a == b).all() for a, b in zip(again, qs)), "re-coded stream decodes to other integers"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an n2l eval output folder with bitstreams/")
    parser.add_argument("--depth", type=int, choices=range(1, MAX_DEPTH + 1),
                        help="code every latent at this depth (default: the cheapest per latent)")
    args = parser.parse_args()
    sizes: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)  # quality -> image -> before, after
    for path in sorted((args.run / "bitstreams").glob("*.n2l")):
        image, quality = re.fullmatch(r"(.+)_q(\d+)\.n2l", path.name).groups()
        buf = path.read_bytes()
        sizes[int(quality)][image] = (len(buf), len(recode(buf, args.depth)))
    for quality, pairs in sorted(sizes.items()):
        before, after = (sum(p[i] for p in pairs.values()) / len(pairs) for i in (0, 1))
        print(f"quality {quality}: {len(pairs)} streams, {before:.1f} -> {after:.1f} bytes ({after / before - 1:+.1%})")
    print_bd_rates(args.run / "results.tsv", sizes)


def print_bd_rates(results: Path, sizes: dict[int, dict[str, tuple[int, int]]]) -> None:
    """Dataset BD-rates of n2l against every other codec of the run, before and after."""
    rows = read_tsv(results)
    images = sorted({r["image"] for r in rows if r["codec"] == REFERENCE})
    tables = []
    for after in (False, True):
        if after:
            for r in rows:
                if r["codec"] == REFERENCE:
                    new = sizes[int(r["quality"])][r["image"]][1]
                    r["bpp"] *= new / r["bytes"]
                    r["bytes"] = new
        codecs = {r["codec"] for r in rows}
        curves = {c: dataset_curve([r for r in rows if r["codec"] == c], images) for c in codecs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables.append({d["anchor"]: d for d in bd_tables(rows, curves, images)[1]})
    print("BD-rate of n2l (mean PSNR / PSNR of mean MSE), before -> after:")
    for anchor in sorted(tables[0]):
        b, a = tables[0][anchor], tables[1][anchor]
        print(f"  {anchor:10s} {b['bd_rate_pct_mean_psnr']:+6.1f}% / {b['bd_rate_pct_psnr_of_mean_mse']:+6.1f}%"
              f"  ->  {a['bd_rate_pct_mean_psnr']:+6.1f}% / {a['bd_rate_pct_psnr_of_mean_mse']:+6.1f}%")


if __name__ == "__main__":
    main()
