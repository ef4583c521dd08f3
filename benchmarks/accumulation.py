"""What exact gradient accumulation costs: the same 32 samples per step as one batch, as 2 micro-
batches of 16 and as 4 of 8 (the step runs every micro-batch's backbone twice: once without
autograd for the features, once to back-propagate them), on the CPU demo's ViT.

    python benchmarks/accumulation.py [--steps 30] [--threads 2]

Runs the three in turn, step by step (so the machine's drift falls on each alike), and prints the
median step time of each (steps after the first two) and its ratio to one batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lejepa_scale.config import load_config  # noqa: E402
from lejepa_scale.distributed.process_groups import init_distributed  # noqa: E402
from lejepa_scale.training.build import build_run  # noqa: E402


def build(micro: int, accumulation: int):
    overrides = [
        "run.dir=/tmp/unused",
        "data.source=digits",
        "checkpoint.enabled=false",
        "log.wandb=disabled",
        "train.online_probe=false",
        f"train.batch_size={micro}",
        f"train.grad_accum_steps={accumulation}",
    ]
    cfg = load_config(ROOT / "configs/demo_cpu_vit.yaml", overrides)
    run = build_run(cfg, init_distributed("cpu"))
    run.model.train()
    return run, iter(run.loader), accumulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"1 x 32": (32, 1), "2 x 16": (16, 2), "4 x 8": (8, 4)}
    runs = {name: build(*shape) for name, shape in shapes.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):  # round robin: the machine's drift falls on every shape alike
        for name, (run, batches, accumulation) in runs.items():
            batch = [next(batches) for _ in range(accumulation)]
            start = time.perf_counter()
            run.step(batch, step)
            times[name].append(time.perf_counter() - start)
    one = statistics.median(times["1 x 32"][2:])
    for name, seconds in times.items():
        median = statistics.median(seconds[2:])
        print(f"| {name} | {median * 1e3:.0f} ms | {median / one:.2f} |")


if __name__ == "__main__":
    main()
