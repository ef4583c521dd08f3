"""Frozen backbone features of labelled images: which feature a backbone gives (the official
protocol's CLS tokens of the last two layers, the last CLS, or mean-pooled tokens), and their
extraction, shared across ranks under torchrun."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def feature_fn(backbone: torch.nn.Module, kind: str):
    """(encode, the feature it gives). cls2: the CLS tokens of the last two layers, concatenated
    (the official protocol, with the probe's LayerNorm); cls: the last layer's CLS; mean: the mean
    of the last layer's patch tokens. A backbone without a CLS token (a CNN) gives `mean` (of its
    last feature map) for every kind, and says so."""
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    has_cls = getattr(backbone, "cls_token", None) is not None

    def last_layer(x: torch.Tensor) -> torch.Tensor:
        tokens = backbone.forward_features(x)
        if kind == "mean" or not has_cls:
            return tokens[:, prefix:].mean(1) if tokens.dim() == 3 else tokens.mean((2, 3))
        return tokens[:, 0]

    def last_two(x: torch.Tensor) -> torch.Tensor:
        layers = backbone.forward_intermediates(
            x, indices=2, norm=True, return_prefix_tokens=True, intermediates_only=True, output_fmt="NLC"
        )
        return torch.cat([prefix_tokens[:, 0] for _, prefix_tokens in layers], dim=1)

    if not has_cls:
        return last_layer, "mean (no CLS token)" if kind != "mean" else "mean"
    if kind == "cls2":
        if not hasattr(backbone, "forward_intermediates"):
            name = type(backbone).__name__
            raise ValueError(f"--feature cls2 needs timm's forward_intermediates ({name} lacks it): use cls")
        return last_two, "cls2"
    return last_layer, kind


@torch.no_grad()
def extract(encode, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, prepare):
    """Features `encode(prepare(images))` and labels of this rank's (images, labels) batches,
    gathered on rank 0 (None elsewhere) as tensors on the device (what NCCL sends), padded to the
    largest share, then moved to the host on rank 0; in a single process, this process's."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(encode(prepare(images.to(device))).float())  # pageable: a plain copy
        labels.append(y.to(device))
    if not dist.is_initialized():
        return torch.cat(feats).cpu(), torch.cat(labels).cpu()
    shape = torch.tensor([sum(len(y) for y in labels), feats[0].shape[1] if feats else 0], device=device)
    shapes = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)  # each rank's image count and feature width
    counts = [int(n) for n, _ in shapes]
    width, most = max(int(d) for _, d in shapes), max(counts)
    local_x = torch.zeros(most, width, device=device)
    local_y = torch.full((most,), -1, dtype=torch.long, device=device)
    if feats:
        local_x[: counts[dist.get_rank()]] = torch.cat(feats)
        local_y[: counts[dist.get_rank()]] = torch.cat(labels)
    main = dist.get_rank() == 0
    all_x = [torch.empty_like(local_x) for _ in counts] if main else None
    all_y = [torch.empty_like(local_y) for _ in counts] if main else None
    dist.gather(local_x, all_x, dst=0)
    dist.gather(local_y, all_y, dst=0)
    if not main:
        return None
    return (
        torch.cat([x[:n] for x, n in zip(all_x, counts, strict=True)]).cpu(),
        torch.cat([y[:n] for y, n in zip(all_y, counts, strict=True)]).cpu(),
    )


def in_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory images and labels as the (images, labels) batches `extract` reads."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]
