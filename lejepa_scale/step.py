"""One optimisation step: forward every crop size, the LeJEPA loss, backward, AdamW; what the
accelerators execute, kept apart from the loop that feeds and logs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lejepa_scale.model import LeJEPAModel, ModelOutput
from lejepa_scale.objective import LeJEPALoss, LossParts


@dataclass
class StepResult:
    loss: LossParts
    output: ModelOutput
    lr: float  # the learning rate this step used
    grad_norm: torch.Tensor  # of the whole gradient, before the update; read only when logged
    applied: bool  # False when the loss was not finite on some rank: every rank skipped the update


def train_step(
    model: LeJEPAModel,
    loss_fn: LeJEPALoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    views: list[torch.Tensor],
    step: int,
    autocast: torch.autocast,
    before_update=None,
) -> StepResult:
    """Forward every crop size, the LeJEPA loss (SIGReg over the global batch), backward, AdamW.
    A non-finite loss on any rank skips the update on every rank. `before_update` runs right before
    parameters change (the checkpointer waits there for its background copy)."""
    with autocast:
        out = model(views[0], views[1] if len(views) > 1 else None)
    parts = loss_fn(out.z_global, out.z_local, step)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    norm = grad_norm(model)
    lr = optimizer.param_groups[0]["lr"]
    finite = torch.isfinite(parts.total.detach()).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if before_update is not None:
        before_update()
    if applied:
        optimizer.step()
    scheduler.step()
    return StepResult(parts, out, lr, norm, applied)


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) gradient; the same value on every rank."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
