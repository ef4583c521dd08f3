"""CPU time of one LeJEPA training step, photometric stage included: ViT-S/16, 2 x 224 + 6 x 96 views,
batch 16, fp32, one process.

python benchmarks/cpu_step.py [--steps 5] [--threads 2]

Prints the median step time and its photometric share. Run it from two checkouts (e.g. a
`git worktree` of an older commit) in one session, alternating, to compare code versions on the
same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lejepa_scale.build import build_loss, build_model, build_optimizer, build_photometric, build_scheduler
from lejepa_scale.config import load_config
from lejepa_scale.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        None,
        ["run.dir=unused", "model.name=vit_small_patch16_224", "views.global_size=224", "views.local_size=96",
         "views.n_local=6", "train.batch_size=16", "train.precision=fp32"],
    )  # fmt: skip
    model = build_model(cfg).train()
    loss_fn, optimizer = build_loss(cfg), build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    photometric = build_photometric(cfg)
    autocast = torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    batch = [
        torch.randint(0, 256, (2, 16, 3, 224, 224), dtype=torch.uint8, generator=gen),
        torch.randint(0, 256, (6, 16, 3, 96, 96), dtype=torch.uint8, generator=gen),
    ]
    steps, photo = [], []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        views = [photometric(v, gen) for v in batch]
        augmented = time.perf_counter()
        train_step(model, loss_fn, optimizer, scheduler, views, step, autocast)
        if step:  # the first step warms up allocators and caches
            steps.append(time.perf_counter() - start)
            photo.append(augmented - start)
    step_s, photo_s = statistics.median(steps), statistics.median(photo)
    name = "ViT-S/16 CPU step (batch 16, 2x224 + 6x96)"
    print(f"| {name} | {step_s:.2f} s | photometric {photo_s * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
