"""Encoder training step time of two variants side by side.

    python bench/bench_train_step.py                        # kodim23 crop, qualities 0 3 6
    python bench/bench_train_step.py --qualities 3 --steps 300 --rounds 3
    python bench/bench_train_step.py --compare memory

`--compare conv3x3` (default): the 3x3 convolutions in torch (the reference network) against
the C++ core's training kernels (what the encoder uses), both with freed memory retained.
`--compare memory`: outside against inside n2l.memory.retain_freed_memory, both on the core.
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
    parser.add_argument("--compare", choices=["conv3x3", "memory"], default="conv3x3")
    args = parser.parse_args()
    target = to_tensor(kodak_crop(args.image, args.crop))
    names = ("torch conv3x3", "C++ conv3x3") if args.compare == "conv3x3" else ("default malloc", "retained")
    print(f"{args.image} {args.crop}x{args.crop}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"quality | {names[0]} ms/step | {names[1]} ms/step | ratio")
    for q in args.qualities:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for second in (False, True):
                trainer = _Trainer(HYBRID_CONFIGS[q], 0, target, QUALITY_LAMBDAS[q], TrainingConfig())
                if args.compare == "conv3x3" and not second:
                    trainer.model.__class__ = N2LModel  # the reference's torch convolutions
                if args.compare == "conv3x3" or second:
                    with retain_freed_memory():
                        times[second].append(ms_per_step(trainer, args.steps))
                else:
                    times[second].append(ms_per_step(trainer, args.steps))
        first, other = statistics.median(times[False]), statistics.median(times[True])
        print(f"{q} | {first:.2f} | {other:.2f} | {other / first:.2f}")


if __name__ == "__main__":
    main()
