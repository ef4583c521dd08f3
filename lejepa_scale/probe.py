"""Linear probes: the online one trained beside pretraining, and the frozen-feature one for evaluation.

Both read backbone features, never the projector output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lejepa_scale.collectives import default_group


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


@torch.no_grad()
def extract_features(
    encode, images: torch.Tensor, *, batch_size: int, device: torch.device, prepare=None
) -> torch.Tensor:
    """Run `encode` over `images` in batches (after `prepare`, e.g. resize + normalise) on `device`."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        out.append(encode(prepare(x) if prepare else x).float().cpu())
    return torch.cat(out)


@dataclass
class ProbeResult:
    top1: float
    top5: float


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 1e-6,
    warmup_epochs: int = 0,
    seed: int = 0,
) -> ProbeResult:
    """LayerNorm + Linear on frozen features, AdamW (weight decay 1e-6), linear warm-up over
    `warmup_epochs` then cosine decay (the official evaluation protocol); returns test top-1/top-5."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    head = nn.Sequential(nn.LayerNorm(train_x.shape[1]), nn.Linear(train_x.shape[1], num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(train_x) / batch_size)
    total, warmup = epochs * per_epoch, warmup_epochs * per_epoch

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(i - warmup, total - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = head(test_x)
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        return ProbeResult(
            top1=(top5[:, 0] == test_y).float().mean().item(),
            top5=(top5 == test_y.unsqueeze(1)).any(1).float().mean().item(),
        )
