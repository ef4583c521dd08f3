"""What a model and its optimizer look like to the checkpointer: DCP's state-dict API, sharded
under FSDP2, keys free of wrapper prefixes, any world size on load."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from lejepa_scale.distributed.float8 import plain_tensor
from lejepa_scale.distributed.parallel import local_shard


class ModelState(Stateful):
    """A model through DCP's state-dict API: sharded under FSDP2, keys free of wrapper prefixes, any
    world size on load, plain tensors (a float8 weight subclass is stored as the weight inside it).
    Buffers (BatchNorm statistics) are copied when the state is taken: the next forward changes
    them, before a background save would have copied them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        buffers = {b.data_ptr() for b in self.model.buffers()}
        state = {k: plain_tensor(v) for k, v in get_model_state_dict(self.model).items()}
        return {
            k: v.clone() if not isinstance(v, DTensor) and v.data_ptr() in buffers else v
            for k, v in state.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)

    def finite(self) -> bool:
        """Whether this rank's shards of the parameters are all finite (one host read)."""
        return bool(
            torch.stack([torch.isfinite(local_shard(p)).all() for p in self.model.parameters()]).all()
        )


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter names (so it reshards with the model)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)
