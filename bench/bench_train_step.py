"""Encoder training step time of two variants side by side.

    python bench/bench_train_step.py                        # kodim23 crop, qualities 0 3 6
    python bench/bench_train_step.py --qualities 3 --steps 300 --rounds 3
    python bench/bench_train_step.py --compare memory

`--compare kernels` (default): the reference network, all in torch on torch's threads, against
the encoder's: its 3x3 convolutions, upsampling, 1x1 stacks and rate proxy on the C++ core's
training kernels with those threads, torch on one; both with freed memory retained.
`--compare memory`: outside against inside n2l.memory.retain_freed_memory, both as the encoder.
Each round times `--steps` steps of a hybrid-mode trainer per variant (after 20 warm-up steps
each); rounds alternate so that drifts of a shared machine's speed hit both. Prints ms per
step (median over rounds) and the ratio of the second variant to the first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import kodak_crop

from n2l.encoder import HYBRID_CONFIGS, QUALITY_LAMBDAS, TrainingConfig, _Trainer
from n2l.images import to_tensor
from n2l.memory import retain_freed_memory
from n2l.model import N2LModel


def ms_per_step(trainer: _Trainer, steps: int) -> float:
    for _ in range(20):
        trainer.step(1e-3)
    float(trainer.loss)  # reading the loss waits for a GPU's queued steps
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(1e-3)
    float(trainer.loss)
    return (time.perf_counter() - start) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="kodim23")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--qualities", type=int, nargs="+", default=[0, 3, 6])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", choices=["kernels", "memory"], default="kernels")
    args = parser.parse_args()
    target = to_tensor(kodak_crop(args.image, args.crop))
    threads = torch.get_num_threads()
    names = ("torch", "C++ kernels") if args.compare == "kernels" else ("default malloc", "retained")
    print(f"{args.image} {args.crop}x{args.crop}, torch {torch.__version__}, {threads} threads")
    print(f"quality | {names[0]} ms/step | {names[1]} ms/step | ratio")
    for q in args.qualities:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for second in (False, True):
                reference = args.compare == "kernels" and not second
                torch.set_num_threads(threads if reference else 1)
                trainer = _Trainer(HYBRID_CONFIGS[q], 0, target, QUALITY_LAMBDAS[q], TrainingConfig(), threads)
                if reference:
                    trainer.model.__class__ = N2LModel  # the reference's torch layers and rate proxy
                    trainer.rate.threads = None
                if args.compare == "kernels" or second:
                    with retain_freed_memory():
                        times[second].append(ms_per_step(trainer, args.steps))
                else:
                    times[second].append(ms_per_step(trainer, args.steps))
        torch.set_num_threads(threads)
        first, other = statistics.median(times[False]), statistics.median(times[True])
        print(f"{q} | {first:.2f} | {other:.2f} | {other / first:.2f}")


if __name__ == "__main__":
    main()
