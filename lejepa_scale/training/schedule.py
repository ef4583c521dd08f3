"""The one learning-rate shape the project uses: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The factor of the peak learning rate at `step`: (step + 1) / warmup during the `warmup`
    steps, then a cosine from 1 down to `floor` at `total` steps (held there after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
