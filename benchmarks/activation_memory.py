"""Activation memory of a LeJEPA step per activation-checkpointing mode, measured on CPU (torch's
MemTracker: peak bytes it files as activations over a training step, i.e. the tensors forward saves
for backward), next to the planner's prediction of the saved bytes.

PYTHONPATH=. python benchmarks/activation_memory.py

Model: a 3-block ViT (width 96, MLP 384, 3 heads, patch 4), 2 x 32 px + 4 x 16 px views, batch 16,
fp32 (tests/test_plan.py's tiny recipe). The planner predicts GPUs, where torchtitan's op-level
SAC also keeps the attention output; on CPU attention is recomputed (D fewer elements per token
and block), which the last column subtracts.
"""

from __future__ import annotations

from torch.distributed._tools.mem_tracker import _MemRefType

from lejepa_scale.plan import make_plan, model_shape
from lejepa_scale.training.flops import view_tokens
from tests.test_plan import measure, tiny

MiB = 2**20


def main() -> None:
    cfg = tiny()
    shape = model_shape(cfg)
    tokens = sum(v * t for v, t in view_tokens(shape, cfg)) * cfg.train.batch_size
    print("| mode | measured (CPU) | planner | planner, CPU attention |")
    print("|---|---|---|---|")
    for ac in ("none", "op", "selective", "full"):
        measured = measure(cfg, ac)[_MemRefType.ACT]
        plan = make_plan(shape, cfg, shard=1, batch=cfg.train.batch_size, ac=ac, reserve_gib=0)
        predicted = plan.activations
        cpu = predicted - (tokens * shape.depth * shape.width * 4 if ac == "op" else 0)
        print(f"| {ac} | {measured / MiB:.1f} MiB | {predicted / MiB:.1f} MiB | {cpu / MiB:.1f} MiB |")


if __name__ == "__main__":
    main()
