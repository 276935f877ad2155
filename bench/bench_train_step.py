"""Encoder training step time, with and without n2l.memory.retain_freed_memory, side by side.

    python bench/bench_train_step.py                        # kodim23 crop, qualities 0 3 6
    python bench/bench_train_step.py --qualities 3 --steps 300 --rounds 3

Each round times `--steps` steps of a hybrid-mode trainer outside, then inside, the context
(after 20 warm-up steps each); rounds alternate so that drifts of a shared machine's speed
hit both. Prints ms per step (median over rounds) and the ratio inside / outside.
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
    args = parser.parse_args()
    target = to_tensor(kodak_crop(args.image, args.crop))
    print(f"{args.image} {args.crop}x{args.crop}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("quality | default malloc ms/step | retained ms/step | ratio")
    for q in args.qualities:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for retained in (False, True):
                trainer = _Trainer(HYBRID_CONFIGS[q], 0, target, QUALITY_LAMBDAS[q], TrainingConfig())
                if retained:
                    with retain_freed_memory():
                        times[True].append(ms_per_step(trainer, args.steps))
                else:
                    times[False].append(ms_per_step(trainer, args.steps))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{q} | {off:.2f} | {on:.2f} | {on / off:.2f}")


if __name__ == "__main__":
    main()
