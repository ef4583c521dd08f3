"""The online linear probe: trained beside pretraining on detached backbone features (never the
projector output), a free signal of representation quality when the data has labels."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lejepa_scale.distributed.collectives import default_group


class OnlineProbe:
    """A linear classifier on detached backbone features with its own AdamW; a free training-time
    signal of representation quality when labels exist. Identical on every rank (its gradients are
    averaged), and checkpointed through `state_dict` / `load_state_dict`."""

    def __init__(self, feature_dim: int, num_classes: int, device: torch.device, lr: float = 1e-3):
        self.head = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, num_classes)).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-6)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on (N, D) features; returns this batch's loss and accuracy before the update, as
        tensors (read them only when they are logged)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self.head(features.detach().float())
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        group = default_group()
        if group is not None:  # keep the probe identical on every rank: average its gradients
            grads = [p.grad for p in self.head.parameters()]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=group)
            flat /= dist.get_world_size(group)
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))
        self.optimizer.step()
        return loss.detach(), (logits.argmax(1) == labels).float().mean()

    def state_dict(self) -> dict:
        model, optim = get_state_dict(self.head, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(
            self.head, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
