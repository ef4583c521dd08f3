"""CPU time of one LeJEPA training step: ViT-S/16, 2 x 224 + 6 x 96 views, batch 16, fp32, one process.

python benchmarks/cpu_step.py [--steps 5] [--threads 2]

Alternates, in one process, the model's two forward paths: every block once on both crop sizes
(what timm ViTs take) and one backbone pass per crop size (what other backbones take), and times
the photometric stage on the same batch. Medians over `--steps` steps each, after one warm-up step;
in-process alternation because separate processes on a shared machine differ by up to 10%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lejepa_scale.config import load_config
from lejepa_scale.training.build import (
    build_loss,
    build_model,
    build_optimizer,
    build_photometric,
    build_scheduler,
)
from lejepa_scale.training.step import train_step


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
    times: dict[bool, list[float]] = {True: [], False: []}
    photo = []
    for step in range(2 * args.steps + 2):
        start = time.perf_counter()
        views = [photometric(v, gen) for v in batch]
        photo.append(time.perf_counter() - start)
        model.blocks_take_lists = one_call = step % 2 == 0
        start = time.perf_counter()
        train_step(model, loss_fn, optimizer, scheduler, views, step, autocast)
        if step >= 2:  # the first two steps warm up allocators and caches
            times[one_call].append(time.perf_counter() - start)
    one, per_size = statistics.median(times[True]), statistics.median(times[False])
    print("| forward | step (photometric excluded) | photometric stage |")
    print("|---|---|---|")
    print(f"| every block once on both crop sizes | {one:.2f} s | {statistics.median(photo) * 1e3:.0f} ms |")
    print(f"| one backbone pass per crop size | {per_size:.2f} s (ratio {one / per_size:.3f}) | |")


if __name__ == "__main__":
    main()
