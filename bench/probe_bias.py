"""What rate control's probes read against the plain stream they predict, per quality level.

    python bench/probe_bias.py --levels 0 2 4 6 8 --images kodim01 kodim04 ...
    python bench/probe_bias.py --probe 2 --levels 0 8      # the second probe instead

For each centre crop and level, trains the level's plain schedule (hybrid mode) up to the chosen
probe (`_LambdaControl.PROBE_AT` of the main phase), runs rate control's own probe (the
quantization-aware phase on a copy) and compares the stream it measures with the plain stream
of the same crop and level in an eval's results (same lambda, fully trained). Lambda is held at
the level's (the probes move nothing), so the second probe reads the plain schedule too. Prints
each reading and, per level, the median size ratio and PSNR difference: for the first probe, the
source of `n2l.encoder.FIRST_PROBE_OVERSIZE` and `FIRST_PROBE_PSNR_OFFSET`; the second probe
reads the stream after `n2l.encoder._finish` (bench/RESULTS.md 8e). About 0.2 (first probe) or
0.7 (second) of an encode each.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from common import REPO, kodak_crop

import n2l
from n2l import encoder


class _Read(Exception):
    """Raised by the patched measurement to stop the encode at the chosen probe's reading."""


def probe_reading(image: str, level: int, plain_bytes: int, probe: int = 1) -> tuple[int, float]:
    """(bytes, PSNR) of the stream that probe number `probe` (1 or 2) of a plain level-`level`
    schedule measures, lambda held at the level's."""
    control = encoder._LambdaControl
    original = control._reading, control._scale_lambda, control.RESTART_FACTOR, encoder._quality_for_target
    readings = []

    def reading(self: encoder._LambdaControl, quantizer: encoder._Quantizer, exponents: list[int]) -> float:
        log_size = original[0](self, quantizer, exponents)
        readings.append(log_size)
        if len(readings) == probe:  # an encode's first readings are its probes'
            raise _Read(round(math.exp(log_size)), quantizer.psnr(exponents))
        return log_size

    control._reading, control._scale_lambda, control.RESTART_FACTOR = reading, lambda self, factor: None, math.inf
    encoder._quality_for_target = lambda *args: level
    try:
        n2l.encode(kodak_crop(image, 256), target_bytes=plain_bytes, verbose=False)
    except _Read as read:
        return read.args
    finally:
        control._reading, control._scale_lambda, control.RESTART_FACTOR, encoder._quality_for_target = original
    raise RuntimeError("the encode ended without the probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path,
                        default=REPO / "bench/results/eval_kodak_crops8_hybrid_calib/results.tsv")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    parser.add_argument("--images", nargs="*", help="default: every crop of the eval")
    parser.add_argument("--probe", type=int, choices=(1, 2), default=1, help="which probe to read")
    args = parser.parse_args()
    with open(args.eval) as f:
        plain = {(r["image"], int(r["quality"])): (int(r["bytes"]), float(r["psnr"]))
                 for r in csv.DictReader(f, delimiter="\t") if r["codec"] == "n2l" and int(r["width"]) == 256}
    images = args.images or sorted({image for image, _ in plain})
    for level in args.levels:
        ratios, offsets = [], []
        for image in images:
            size, psnr = plain[image, level]
            read_size, read_psnr = probe_reading(image, level, size, args.probe)
            ratios.append(read_size / size)
            offsets.append(read_psnr - psnr)
            print(f"level {level} {image}: plain {size} B {psnr:.2f} dB, probe {read_size} B {read_psnr:.2f} dB",
                  flush=True)
        print(f"level {level}: size ratio median {statistics.median(ratios):.3f} (range {min(ratios):.2f}-"
              f"{max(ratios):.2f}, sd of log {statistics.pstdev(map(math.log, ratios)):.2f}); PSNR difference "
              f"median {statistics.median(offsets):+.2f} dB", flush=True)


if __name__ == "__main__":
    main()
