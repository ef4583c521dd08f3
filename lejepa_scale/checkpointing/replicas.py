"""HSDP replicas and checkpoints: each replica writes a disjoint share of the state, and a resume
reads the checkpoint once (replica 0) and shares it with the other replicas."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from lejepa_scale.distributed.parallel import local_shard


def replica_share(tree: Any, replica: int, replicas: int) -> tuple[Any, int]:
    """The part of a state this replica writes, and its tensor bytes. Under HSDP every replica holds
    the same state: each entry goes to the replica with the fewest bytes so far (by global sizes,
    so every rank decides alike), so together the replicas write everything once, in about equal
    shares, and each rank copies to host only what it writes. Lists stay whole (DCP names their
    items by position)."""
    load, kept, mine = [0] * replicas, {}, 0

    def visit(node: dict, out: dict) -> None:
        nonlocal mine
        for key, value in node.items():
            if isinstance(value, dict):
                out[key] = {}
                visit(value, out[key])
                continue
            tensors = [
                t for t in (value if isinstance(value, list) else [value]) if isinstance(t, torch.Tensor)
            ]
            owner = load.index(min(load))
            load[owner] += sum(t.numel() * t.element_size() for t in tensors) + 1  # + 1: spread small entries
            if owner == replica:
                out[key] = value
                local = [local_shard(t) for t in tensors]
                mine += sum(t.numel() * t.element_size() for t in local)

    visit(tree, kept)
    return kept, mine


def on_device(leaves: list[Any], device: torch.device) -> list[bool]:
    """Which state leaves live on the training device (a DTensor by its shard): those go over the
    training backend; the rest (an optimizer's CPU step count, SWA's count, Python values) stay on
    the host, where NCCL cannot send them."""
    return [isinstance(leaf, torch.Tensor) and local_shard(leaf).device == device for leaf in leaves]


def broadcast_from_first_replica(tree: Any, device: torch.device, replicate_group, host_group) -> Any:
    """`tree` as replica 0 holds it, on every replica: each rank of replica 0 broadcasts what it
    holds to the ranks holding the same shard in the other replicas, device tensors over the mesh's
    replicate group (NCCL between GPUs), what lives on the host as objects over a gloo group."""
    leaves, spec = tree_flatten(tree)
    here = on_device(leaves, device)
    for leaf, on in zip(leaves, here, strict=True):
        if on:
            dist.broadcast(local_shard(leaf), group=replicate_group, group_src=0)
    host = [leaf for leaf, on in zip(leaves, here, strict=True) if not on]
    dist.broadcast_object_list(host, group=host_group, group_src=0)
    received = iter(host)
    return tree_unflatten(
        [leaf if on else next(received) for leaf, on in zip(leaves, here, strict=True)], spec
    )
