"""One optimisation step: forward every crop size, the LeJEPA loss, backward, gradient norm (and
clipping), AdamW; what the accelerators execute, kept apart from the loop that feeds and logs it.

Nothing here reads a device value on the host: a non-finite gradient skips the update on the
device (fused AdamW's `found_inf`, as mixed-precision scaling uses it), so the CPU can queue the next
step while this one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torchtitan.distributed.utils import clip_grad_norm_

from data_pipeline.views import Photometric, ViewBatch
from lejepa_scale.method.model import LeJEPAModel, ModelOutput
from lejepa_scale.method.objective import LeJEPALoss, LossParts
from lejepa_scale.method.swa import WeightAverage
from lejepa_scale.training.online_probe import OnlineProbe


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


class TrainingStep:
    """The step proper, as the loop calls it once per step: the batch to the device, the batched
    photometric augmentation, `train_step`, the counters of skipped updates (in all, and in a row)
    and the online probe. Returns device tensors only: nothing here waits for the device."""

    def __init__(
        self,
        *,
        model: LeJEPAModel,
        loss_fn: LeJEPALoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        photometric: Photometric,
        augment: torch.Generator,
        autocast: torch.autocast,
        device: torch.device,
        n_global: int,
        clip_grad: float = 0.0,
        probe: OnlineProbe | None = None,
        target: WeightAverage | None = None,
        before_update: Callable[[], None] | None = None,
        after_update: Callable[[], None] | None = None,
        corrupt_total: Callable[[], int] = lambda: 0,
    ):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.photometric, self.augment, self.autocast, self.device = photometric, augment, autocast, device
        self.n_global, self.clip_grad, self.probe, self.target = n_global, clip_grad, probe, target
        self.before_update, self.after_update, self.corrupt_total = before_update, after_update, corrupt_total
        self.skipped = self.streak = torch.zeros((), device=device)  # skipped updates: in all, in a row

    def __call__(self, batch: ViewBatch, step: int) -> tuple[StepResult, dict[str, torch.Tensor | int]]:
        views = [self.photometric(v.to(self.device, non_blocking=True), self.augment) for v in batch.views]
        result = train_step(
            self.model, self.loss_fn, self.optimizer, self.scheduler, views, step, self.autocast,
            clip_grad=self.clip_grad, before_update=self.before_update, after_update=self.after_update,
            target=self.target,
        )  # fmt: skip
        self.skipped, self.streak = self.skipped + result.skipped, (self.streak + 1) * result.skipped
        counters = {"skipped_nonfinite": self.skipped, "nonfinite_streak": self.streak,
                    "corrupt_samples": self.corrupt_total()}  # fmt: skip
        if self.probe is not None and batch.labels is not None:
            labels = batch.labels.to(self.device, non_blocking=True).repeat(self.n_global)
            features = result.output.features_global.flatten(0, 1)
            counters["probe_loss"], counters["probe_acc"] = self.probe.step(features, labels)
        return result, counters


@contextmanager
def host_syncs_fail(enabled: bool, device: torch.device) -> Iterator[None]:
    """`train.sync_debug`: inside, any host sync on a CUDA device raises (torch's sync debug mode);
    outside (logging, control steps, saves, barriers: the loop's planned syncs) it is off. The
    mode is process-wide: the checkpointer's staging thread is waited for outside."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
