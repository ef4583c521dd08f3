"""One optimisation step: forward every crop size, the LeJEPA loss, backward, gradient norm (and
clipping), AdamW; what the accelerators execute, kept apart from the loop that feeds and logs it.

Gradient accumulation is exact: SIGReg and the projector's BatchNorm are nonlinear in statistics
of the whole batch, so K micro-batches cannot each take their own loss. Instead the backbone's
features of every micro-batch come first, without autograd (a forward pass each); the projector
and the loss then run once on all of them, with autograd from the features on, which gives the
loss of the whole batch and its gradient with respect to every feature; last, each micro-batch's
backbone runs again (the same random state, so drop path draws the same masks) and back-propagates
its features' gradient. The gradients equal those of one step on the whole batch, at the cost of
one more forward pass of the backbone (about a third of a plain step's compute).

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
    views: list[torch.Tensor] | list[list[torch.Tensor]],
    step: int,
    autocast: torch.autocast,
    *,
    clip_grad: float = 0.0,
    before_update=None,
    after_update=None,
    target: WeightAverage | None = None,
) -> StepResult:
    """Forward every crop size, the LeJEPA loss (SIGReg over the global batch), backward, AdamW.
    `views` is the step's crops [global, local], or the list of its micro-batches' crops (exact
    gradient accumulation, see the module docstring). The gradient norm is global (one all-reduce),
    so a NaN/Inf anywhere makes it non-finite on every rank and every rank skips the update.
    `clip_grad` > 0 clips to that norm. `before_update` runs right before parameters change (the
    checkpointer waits there for its background copy), `after_update` right after (float8
    all-gathers precompute their weights' scales there). With an SWA `target`, the centres come
    from it, and it averages the updated weights."""
    micro_batches = views if isinstance(views[0], list) else [views]
    optimizer.zero_grad(set_to_none=True)
    if len(micro_batches) == 1:
        (global_views, *local_views) = micro_batches[0]
        with autocast:
            out = model(global_views, local_views[0] if local_views else None)
        centres = target.centres(global_views, autocast) if target is not None else None
        parts = loss_fn(out.z_global, out.z_local, step, centres=centres)
        parts.total.backward()
    else:
        out, parts = accumulate(model, loss_fn, micro_batches, step, autocast, target)
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


def accumulate(
    model: LeJEPAModel,
    loss_fn: LeJEPALoss,
    micro_batches: list[list[torch.Tensor]],
    step: int,
    autocast: torch.autocast,
    target: WeightAverage | None,
) -> tuple[ModelOutput, LossParts]:
    """The gradients of one step on the concatenated micro-batches (see the module docstring)."""
    device = micro_batches[0][0].device
    states, features = [], []
    with torch.no_grad():
        for global_views, *local_views in micro_batches:
            states.append(random_state(device))
            with autocast:
                features.append(
                    model(global_views, local_views[0] if local_views else None, encode_only=True)
                )
    whole = tuple(
        None if parts[0] is None else torch.cat(parts, 1).detach().requires_grad_()  # along the batch
        for parts in zip(*features, strict=True)
    )
    centres = None
    if target is not None:
        centres = torch.cat([target.centres(views[0], autocast) for views in micro_batches])
    with autocast:
        out = model(features=whole)
    parts = loss_fn(out.z_global, out.z_local, step, centres=centres)
    parts.total.backward()
    sizes = [f[0].shape[1] for f in features]
    grads = [None if f is None else f.grad.split(sizes, 1) for f in whole]
    for k, (global_views, *local_views) in enumerate(micro_batches):
        set_random_state(device, states[k])
        with autocast:
            again = model(global_views, local_views[0] if local_views else None, encode_only=True)
        pairs = [(f, g[k]) for f, g in zip(again, grads, strict=True) if f is not None]
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    return out, parts


def random_state(device: torch.device) -> tuple:
    """The torch streams a forward pass draws from (drop path), to draw the same again."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_random_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def grad_norm(model: torch.nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) gradient, the same on every rank; with `clip` > 0 the
    gradient is scaled down to that norm (torchtitan's clip_grad_norm_, DTensor-aware)."""
    if clip > 0:
        from torchtitan.distributed.utils import clip_grad_norm_  # 0.5 s to import: only when clipping

        return clip_grad_norm_(list(model.parameters()), clip)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class TrainingStep:
    """The step proper, as the loop calls it once per step: the micro-batches to the device, the
    batched photometric augmentation (each view's parameters were drawn by its data source),
    `train_step`, the counters of skipped updates (in all, and in a row) and the online probe.
    Returns device tensors only: nothing here waits for the device."""

    def __init__(
        self,
        *,
        model: LeJEPAModel,
        loss_fn: LeJEPALoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        photometric: Photometric,
        autocast: torch.autocast,
        device: torch.device,
        n_global: int,
        clip_grad: float = 0.0,
        probe: OnlineProbe | None = None,
        target: WeightAverage | None = None,
        before_update: Callable[[], None] | None = None,
        after_update: Callable[[], None] | None = None,
        data_counters: Callable[[], dict[str, float]] = dict,
    ):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.photometric, self.autocast, self.device = photometric, autocast, device
        self.n_global, self.clip_grad, self.probe, self.target = n_global, clip_grad, probe, target
        self.before_update, self.after_update, self.data_counters = before_update, after_update, data_counters
        self.skipped = self.streak = torch.zeros((), device=device)  # skipped updates: in all, in a row

    def __call__(
        self, batches: list[ViewBatch], step: int
    ) -> tuple[StepResult, dict[str, torch.Tensor | int]]:
        """One step on its micro-batches (one without gradient accumulation)."""

        def on_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        micro_batches = [
            [
                self.photometric.apply(on_device(v), on_device(p))
                for v, p in zip(b.views, b.photometric, strict=True)
            ]
            for b in batches
        ]
        result = train_step(
            self.model, self.loss_fn, self.optimizer, self.scheduler, micro_batches, step, self.autocast,
            clip_grad=self.clip_grad, before_update=self.before_update, after_update=self.after_update,
            target=self.target,
        )  # fmt: skip
        self.skipped, self.streak = self.skipped + result.skipped, (self.streak + 1) * result.skipped
        counters = {
            "skipped_nonfinite": self.skipped,
            "nonfinite_streak": self.streak,
            **self.data_counters(),
        }
        if self.probe is not None and batches[0].labels is not None:
            labels = torch.cat([batch.labels for batch in batches]).to(self.device, non_blocking=True)
            features = result.output.features_global.flatten(0, 1)  # view-major, like the labels repeated
            counters["probe_loss"], counters["probe_acc"] = self.probe.step(
                features, labels.repeat(self.n_global)
            )
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
