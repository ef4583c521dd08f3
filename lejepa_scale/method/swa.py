"""The optional SWA target (the paper's Table 4): the centres μ of the prediction term come from a
stochastic weight average of the model instead of the model itself.

The paper: "optionally applying SWA with ViTs" improves them (ViT-S/8 on IN-100: 81.07 -> 84.12;
ViT-T 71.79 -> 75.86); SWA is applied to the encoder that produces μ, the mean embedding of the
global views; the headline method has no teacher, so it is off by default. Here the average is a
second copy of the model, built and sharded like it (FSDP2: its parameters are DTensors with the
same placements, so averaging is local to each rank), updated after every optimizer step as an
equal-weight running mean from `model.swa_start` on (before that it follows the model). Its
forward runs on the global views only, without gradients: one all-gather per block, no backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from lejepa_scale.checkpointing.states import ModelState
from lejepa_scale.distributed.parallel import local_shard
from lejepa_scale.method.model import LeJEPAModel


def _local(tensors) -> list[torch.Tensor]:
    return [local_shard(t) for t in tensors]


class WeightAverage:
    """The averaged model that gives the centres; checkpointed with its count (Stateful)."""

    def __init__(self, average: LeJEPAModel, model: LeJEPAModel, start: int):
        self.average, self.model, self.start = average, model, start
        self.count = 0  # updates averaged since `start`
        with torch.no_grad():  # buffers too: the copy is allocated, not initialised
            torch._foreach_copy_(_local(self.average.parameters()), _local(self.model.parameters()))
            torch._foreach_copy_(list(self.average.buffers()), list(self.model.buffers()))
        self.average.train()  # the projector's BatchNorm uses batch statistics, as the model's does

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the model's weights after `step`'s update into the average."""
        average, current = _local(self.average.parameters()), _local(self.model.parameters())
        if step < self.start:
            torch._foreach_copy_(average, current)
            return
        self.count += 1
        torch._foreach_lerp_(average, current, 1.0 / self.count)

    @torch.no_grad()
    def centres(self, global_views: torch.Tensor, autocast: torch.autocast) -> torch.Tensor:
        """μ for each image: the mean over its global views of the averaged model's embeddings."""
        with autocast:
            centres = self.average(global_views).z_global.float().mean(0)
        if isinstance(self.average, FSDPModule):  # no backward follows: free the root's gathered weights
            self.average.reshard()
        return centres

    def state_dict(self) -> dict[str, Any]:
        return {"model": ModelState(self.average).state_dict(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ModelState(self.average).load_state_dict(state["model"])
        self.count = int(state["count"])
