"""Probes on frozen features: the linear probe of the official protocol (LayerNorm + Linear, AdamW,
warm-up then cosine), weighted k-NN (DINO's protocol) and the few-shot subset they can train on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lejepa_scale.training.schedule import warmup_cosine


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

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, warmup, total))
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


def few_shot(features: torch.Tensor, labels: torch.Tensor, shots: int, seed: int = 0):
    """`shots` images per class, drawn with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    keep = [
        idx[torch.randperm(len(idx), generator=gen)[:shots]]
        for c in labels.unique()
        for idx in [torch.nonzero(labels == c).flatten()]
    ]
    keep = torch.cat(keep).sort().values
    return features[keep], labels[keep]


@torch.no_grad()
def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> ProbeResult:
    """Weighted k-NN on cosine similarity: each of the k nearest training features votes for its
    class with weight exp(similarity / temperature) (DINO's protocol)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train_x))
    top1 = top5 = 0
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start : start + chunk].float(), dim=1)
        sims, idx = (query @ train_n.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        ranked = votes.topk(min(5, num_classes), dim=1).indices
        truth = test_y[start : start + chunk].unsqueeze(1)
        top1 += int((ranked[:, :1] == truth).sum())
        top5 += int((ranked == truth).any(1).sum())
    return ProbeResult(top1=top1 / len(test_x), top5=top5 / len(test_x))
