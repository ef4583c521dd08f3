"""Training stall per checkpoint, async vs sync, and resume time, for a ViT-B/16 LeJEPA state.

python benchmarks/checkpoint_stall.py [--repeats 3] [--dir /tmp/lejepa_ckpt_bench]

The stall is the time the training loop is blocked by a save: sync, the whole write; async, the
`save` call plus the wait for the background copy of the state right before the next optimizer
step, after one forward + backward (batch 4, 2x224 + 6x96 views) has run meanwhile. Model +
AdamW state of ViT-B/16 with the default projector (about 1 GiB on disk). One process on CPU;
medians of `--repeats` saves.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from lejepa_scale.checkpointing.checkpoint import Checkpointer
from lejepa_scale.checkpointing.states import ModelState, OptimizerState
from lejepa_scale.config import load_config
from lejepa_scale.training.build import build_loss, build_model, build_optimizer, build_scheduler
from lejepa_scale.training.rng import RandomState


class _Position:
    def state_dict(self):
        return {"epoch": 0, "batch": 0}

    def load_state_dict(self, state):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lejepa_ckpt_bench"))
    args = parser.parse_args()
    cfg = load_config(None, ["run.dir=unused", "model.name=vit_base_patch16_224", "views.global_size=224"])
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    out = model(torch.randn(2, 2, 3, 224, 224), torch.randn(2, 2, 3, 96, 96))
    build_loss(cfg)(out.z_global, out.z_local, 0).total.backward()
    optimizer.step()  # AdamW moments exist
    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "schedule": scheduler}
    per_rank = {"loader": _Position(), "rng": RandomState({"augment": torch.Generator()})}
    params = sum(p.numel() for p in model.parameters())
    print(f"ViT-B/16 + projector: {params / 1e6:.1f} M parameters, torch {torch.__version__}")

    views = [torch.randn(2, 4, 3, 224, 224), torch.randn(6, 4, 3, 96, 96)]
    loss_fn = build_loss(cfg)

    def forward_backward() -> float:
        """What the loop does between a save and the next optimizer step (not counted as stall)."""
        start = time.perf_counter()
        out = model(*views)
        loss_fn(out.z_global, out.z_local, 0).total.backward()
        return time.perf_counter() - start

    compute = forward_backward()
    stalls = {}
    for mode in ("sync", "async"):
        shutil.rmtree(args.dir, ignore_errors=True)
        ckpt = Checkpointer(args.dir, state, per_rank, {}, every_steps=0, every_minutes=0,
                            async_save=mode == "async")  # fmt: skip
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            ckpt.save(i + 1)
            blocked = time.perf_counter() - start
            forward_backward()
            start = time.perf_counter()
            ckpt.wait_for_staging()  # the loop's wait right before optimizer.step
            times.append(blocked + time.perf_counter() - start)
            ckpt.finish()  # the write completes before the next measurement
        stalls[mode] = statistics.median(times)
    size = sum(f.stat().st_size for f in ckpt.latest().rglob("*") if f.is_file()) / 2**30
    start = time.perf_counter()
    ckpt.load(ckpt.latest())
    resume = time.perf_counter() - start
    shutil.rmtree(args.dir, ignore_errors=True)
    ratio = 100 * stalls["async"] / stalls["sync"]
    print(f"forward + backward between save and optimizer step: {compute:.2f} s")
    print(
        f"| checkpoint of {size:.2f} GiB | sync save stall {stalls['sync']:.2f} s | async stall "
        f"{stalls['async']:.2f} s | **{ratio:.0f}%** of sync | resume {resume:.2f} s |"
    )


if __name__ == "__main__":
    main()
