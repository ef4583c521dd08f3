"""SIGReg under data parallelism with real gloo ranks: the global statistic and exact gradients.

Each rank holds a slice of one batch (slices may be unequal). The SIGReg value on every rank must
equal the single-process value on the whole batch, and the parameter gradients after DDP-style
averaging (sum over ranks / world size) must equal the single-process gradients.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lejepa_scale.method.sigreg as sigreg_module
from lejepa_scale.method.sigreg import SIGReg
from tests.distributed import run_ranks

DIM_IN, DIM_OUT, SLICES, STEP = 12, 8, 64, 5


def make_problem(total: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, total, DIM_IN, generator=gen)  # (V, N, D): three views of `total` images
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Linear(16, DIM_OUT))
    return x, encoder


def sigreg_and_grads(encoder: nn.Module, x: torch.Tensor):
    value = SIGReg(num_slices=SLICES)(encoder(x), step=STEP)
    value.backward()
    return value.detach(), [p.grad.clone() for p in encoder.parameters()]


def detached_all_reduce_sum(x, group):
    """The known bug: the forward is global but the gradient only sees the local term."""
    reduced = x.detach().clone()
    dist.all_reduce(reduced, group=group)
    return x + (reduced - x.detach())


def rank_worker(rank: int, world_size: int, sizes: list[int], detached: bool):
    if detached:
        sigreg_module.all_reduce_sum = detached_all_reduce_sum
    x, encoder = make_problem(sum(sizes))
    start = sum(sizes[:rank])
    value, grads = sigreg_and_grads(encoder, x[:, start : start + sizes[rank]])
    for g in grads:  # what DDP / FSDP do to gradients
        dist.all_reduce(g)
        g /= world_size
    return value, grads


def max_relative_error(grads, reference):
    return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True))


@pytest.mark.parametrize("sizes", [[40, 40], [50, 30], [20, 20, 20, 20], [31, 7, 25, 17]])
def test_distributed_sigreg_equals_single_process(sizes):
    ref_value, ref_grads = sigreg_and_grads(*reversed(make_problem(sum(sizes))))
    for value, grads in run_ranks(rank_worker, len(sizes), sizes, False):
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=0)
        assert max_relative_error(grads, ref_grads) < 1e-5


def test_detached_reduction_fails_the_same_check():
    sizes = [40, 40]
    ref_value, ref_grads = sigreg_and_grads(*reversed(make_problem(sum(sizes))))
    for value, grads in run_ranks(rank_worker, len(sizes), sizes, True):
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=0)  # the value still looks right...
        assert max_relative_error(grads, ref_grads) > 0.3  # ...but the gradient is divided by W
