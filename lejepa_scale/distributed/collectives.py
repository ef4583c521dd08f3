"""The project's collectives: autograd-aware sums for statistics of the global batch (SIGReg's ECF,
BatchNorm moments), and the agreement of host-side decisions (save now? stop now?) across ranks.

The differentiable sum's forward sums a tensor over the data-parallel group; the backward sums the
gradient over the group as well. Each rank's loss depends on every rank's samples through the
summed statistic, so the backward sum delivers to each rank the gradient of every rank's loss, and
after FSDP/DDP average gradients over ranks, parameter gradients equal the single-process ones on
the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lejepa_scale.distributed.process_groups import control_group


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable SUM over `group`: every rank's gradient is the sum of all ranks' gradients."""
    return _AllReduceSum.apply(x, group)


def default_group() -> dist.ProcessGroup | None:
    """The world when torch.distributed runs with more than one rank, else None (local statistic)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def from_rank0(value):
    """Rank 0's `value` on every rank (through the CPU control group): one rank decides what the
    file system says (which checkpoint is the newest, whether one exists), so ranks whose view of a
    shared file system lags (NFS attribute caching) cannot decide differently."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, group=control_group(), group_src=0)
    return box[0]


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether it holds on at least one rank: one packed all-reduce (MAX) through a
    CPU (gloo) group of its own, so it never waits on the accelerator, works beside NCCL and never
    interleaves with the collectives of a checkpoint being written in the background."""
    if not dist.is_initialized():
        return list(flags)
    packed = torch.tensor([int(f) for f in flags])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=control_group())
    return [bool(v) for v in packed.tolist()]
