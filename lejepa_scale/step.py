"""One optimisation step: forward every crop size, the LeJEPA loss, backward, gradient norm (and
clipping), AdamW; what the accelerators execute, kept apart from the loop that feeds and logs it.

Nothing here reads a device value on the host: a non-finite gradient skips the update on the
device (fused AdamW's `found_inf`, as mixed-precision scaling uses it), so the CPU can queue the next
step while this one runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.distributed.utils import clip_grad_norm_

from lejepa_scale.model import LeJEPAModel, ModelOutput
from lejepa_scale.objective import LeJEPALoss, LossParts
from lejepa_scale.swa import WeightAverage


@dataclass
class StepResult:
    """Device tensors, read only when they are logged."""

    loss: LossParts
    output: ModelOutput
    lr: float  # the learning rate this step used
    grad_norm: torch.Tensor  # of the whole gradient, before clipping; the same on every rank
    skipped: torch.Tensor  # 1.0 when the gradient was NaN/Inf somewhere: every rank skipped the update


def train_step(
    model: LeJEPAModel,
    loss_fn: LeJEPALoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    views: list[torch.Tensor],
    step: int,
    autocast: torch.autocast,
    *,
    clip_grad: float = 0.0,
    before_update=None,
    after_update=None,
    target: WeightAverage | None = None,
) -> StepResult:
    """Forward every crop size, the LeJEPA loss (SIGReg over the global batch), backward, AdamW.
    The gradient norm is global (one all-reduce), so a NaN/Inf anywhere makes it non-finite on every
    rank and every rank skips the update. `clip_grad` > 0 clips to that norm. `before_update` runs
    right before parameters change (the checkpointer waits there for its background copy),
    `after_update` right after (float8 all-gathers precompute their weights' scales there). With an
    SWA `target`, the centres come from it, and it averages the updated weights."""
    with autocast:
        out = model(views[0], views[1] if len(views) > 1 else None)
    centres = target.centres(views[0], autocast) if target is not None else None
    parts = loss_fn(out.z_global, out.z_local, step, centres=centres)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    norm = grad_norm(model, clip_grad)
    skipped = (~torch.isfinite(norm)).float()
    lr = optimizer.param_groups[0]["lr"]
    if before_update is not None:
        before_update()
    optimizer.found_inf = skipped  # read by fused AdamW on the device: no update, no step count
    optimizer.step()
    if after_update is not None:
        after_update()
    scheduler.step()
    if target is not None:
        target.update(step)
    return StepResult(parts, out, lr, norm, skipped)


def grad_norm(model: torch.nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) gradient, the same on every rank; with `clip` > 0 the
    gradient is scaled down to that norm (torchtitan's clip_grad_norm_, DTensor-aware)."""
    if clip > 0:
        return clip_grad_norm_(list(model.parameters()), clip)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
