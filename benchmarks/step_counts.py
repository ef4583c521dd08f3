"""Collectives and host reads per training step that does not log, counted from outside the step on
2 gloo ranks (tests/counting.py: the profiler's c10d ops; Tensor.item/tolist/bool/int/float calls
from the project's code), for a 4-block ViT and for ViT-g/14's 48 blocks (tiny widths: the counts
depend on the structure only).

PYTHONPATH=. python benchmarks/step_counts.py

The demo recipe, `train.log_every=1000 log.health_every=1000 checkpoint.every_steps=0`, 12 steps;
averages over steps 1-10 (steps 0 and 11 log). Run from an older checkout (with tests/counting.py
and this file copied in) to compare code versions.
"""

from __future__ import annotations

import tempfile

from lejepa_scale.config import load_config
from tests.counting import StepCounts
from tests.distributed import run_ranks
from tests.helpers import DEMO

MODELS = {
    "4-block ViT (demo)": ["model.backbone_kwargs={patch_size: 4, embed_dim: 64, depth: 4, num_heads: 2}"],
    "ViT-g/14 structure (48 blocks)": [
        "model.name=vit_gigantic_patch14_224",
        "model.backbone_kwargs={patch_size: 4, embed_dim: 32, depth: 48, num_heads: 2}",
    ],
}
COMMON = ["train.batch_size=16", "loss.num_slices=64", "train.steps=12", "train.log_every=1000",
          "log.health_every=1000", "checkpoint.every_steps=0", "log.wandb=disabled"]  # fmt: skip


def worker(rank: int, world_size: int, run_dir: str, overrides: list[str]) -> dict[str, float]:
    from lejepa_scale import train as trainer

    cfg = load_config(DEMO, [f"run.dir={run_dir}", *COMMON, *overrides])
    counts = StepCounts()
    train_step = trainer.train_step

    def marked(*args, **kwargs):
        counts.mark()
        return train_step(*args, **kwargs)

    trainer.train_step = marked
    with counts:
        trainer.train(cfg)
    return counts.per_step(1, 11)


def main() -> None:
    kinds = ("all_gather", "reduce_scatter", "all_reduce", "host_reads", "scalar_writes", "host_tensors",
             "blocking_copies")  # fmt: skip
    print("| model | " + " | ".join(kind.replace("_", " ") for kind in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, overrides in MODELS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            per_step = run_ranks(worker, 2, run_dir, overrides)[0]
        cells = [per_step.get(k, 0.0) for k in kinds]
        print(f"| {name} | " + " | ".join(f"{v:g}" for v in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
