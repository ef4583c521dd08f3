"""SIGReg: LeJEPA's sliced Epps–Pulley test, exact under data parallelism.

Each rank sums cos(t·u) and sin(t·u) over its own samples. Those sums and the sample count are
all-reduced (SUM) through an autograd-aware collective, so the statistic is the one of the global
batch and, once FSDP/DDP average gradients over ranks, every gradient equals the single-process
gradient on the concatenated batch. A detached reduction would silently divide SIGReg's gradient by
the world size.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from lejepa_scale.distributed.collectives import all_reduce_sum, default_group

Integration = Literal["half", "symmetric"]

# Elements of one (chunk, M, knots) phase block in the lean path: ~16 MB in float32. Big enough that
# the Python loop is negligible, small enough to stay in cache-friendly territory.
_LEAN_BLOCK_ELEMENTS = 1 << 22


def quadrature(
    t_max: float, knots: int, integration: Integration, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots t and weights w such that sum_j w_j f(t_j) ≈ ∫_{-t_max}^{t_max} f(t) exp(-t²/2) dt.

    "half" integrates on [0, t_max] and doubles the weights (the integrand is even in t; the doubled
    weight at t = 0 is harmless because the ECF error is exactly 0 there). "symmetric" is the paper's
    plain trapezoid on [-t_max, t_max].
    """
    if knots < 2:
        raise ValueError(f"loss.knots must be >= 2, got {knots}")
    if integration == "half":
        t = torch.linspace(0.0, t_max, knots, dtype=dtype, device=device)
        step = t_max / (knots - 1)
        w = torch.full_like(t, 2 * step)
        w[0] = w[-1] = step
    elif integration == "symmetric":
        t = torch.linspace(-t_max, t_max, knots, dtype=dtype, device=device)
        step = 2 * t_max / (knots - 1)
        w = torch.full_like(t, step)
        w[0] = w[-1] = step / 2
    else:
        raise ValueError(f"loss.integration must be 'half' or 'symmetric', got {integration!r}")
    return t, w * torch.exp(-0.5 * t.square())


@functools.cache
def quadrature_on(
    t_max: float, knots: int, integration: Integration, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quadrature` built once per device and dtype: constants, so no step writes host numbers into
    device tensors (on a GPU each such write is a blocking copy)."""
    t, w = quadrature(t_max, knots, integration, dtype=dtype, device=torch.device("cpu"))
    return t.to(device), w.to(device)


def _phase_chunks(u: torch.Tensor, t: torch.Tensor):
    """Yield (slice along N, phases t·u of shape (..., chunk, M, T)) in memory-bounded blocks."""
    n, m = u.shape[-2], u.shape[-1]
    lead = math.prod(u.shape[:-2])
    chunk = max(1, _LEAN_BLOCK_ELEMENTS // max(1, lead * m * t.numel()))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        yield sl, u[..., sl, :].unsqueeze(-1) * t


class _ECFSums(torch.autograd.Function):
    """(Σ_n cos(t u_n), Σ_n sin(t u_n)) without keeping the (N, M, T) phases for backward.

    Forward and backward walk N in blocks; backward recomputes cos/sin, which the plain autograd
    path would compute as well (d cos = -sin, d sin = cos), so the saving costs no extra work.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, t)
        out = u.new_zeros((2, *u.shape[:-2], u.shape[-1], t.numel()))
        for _, x in _phase_chunks(u, t):
            out[0] += x.cos().sum(-3)
            out[1] += x.sin().sum(-3)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        u, t = ctx.saved_tensors
        t_grad_cos, t_grad_sin = (grad * t).unsqueeze(-3).unbind(0)  # (..., 1, M, T) each
        grad_u = torch.empty_like(u)
        for sl, x in _phase_chunks(u, t):
            grad_u[..., sl, :] = (x.cos() * t_grad_sin).sum(-1) - (x.sin() * t_grad_cos).sum(-1)
        return grad_u, None


def _ecf_sums_naive(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = u.unsqueeze(-1) * t
    return torch.stack([x.cos().sum(-3), x.sin().sum(-3)])


def epps_pulley(
    proj: torch.Tensor,
    *,
    t_max: float = 3.0,
    knots: int = 17,
    integration: Integration = "half",
    unbiased: bool = False,
    group: dist.ProcessGroup | None = None,
    lean: bool = True,
) -> torch.Tensor:
    """Epps–Pulley statistic per slice: projections (..., N, M) -> (..., M).

    The ECF is the one of the global batch over the data-parallel `group` (default: the world when
    torch.distributed is initialised), and the statistic is scaled by the global sample count.
    float64 stays float64; anything else is computed in float32. `unbiased` removes the O(1/N)
    minibatch bias with the U-statistic correction (1 - c² - s²) / (N - 1) per knot. `lean=False`
    is the plain autograd formulation (keeps the (N, M, knots) phases), kept as the reference.
    """
    dtype = torch.float64 if proj.dtype == torch.float64 else torch.float32
    u = proj.to(dtype)
    t, weights = quadrature_on(t_max, knots, integration, dtype, u.device)
    sums = _ECFSums.apply(u, t) if lean else _ecf_sums_naive(u, t)
    count = torch.full((1,), u.shape[-2], dtype=dtype, device=u.device)  # no host-to-device copy
    group = group if group is not None else default_group()
    if group is not None:
        packed = all_reduce_sum(torch.cat([sums.flatten(), count]), group)
        sums, count = packed[:-1].view_as(sums), packed[-1:]
    n = count.squeeze()
    cos_mean, sin_mean = sums / n
    phi = torch.exp(-0.5 * t.square())
    err = (cos_mean - phi).square() + sin_mean.square()
    if unbiased:
        err = err - (1 - cos_mean.square() - sin_mean.square()) / (n - 1)
    return n * (err @ weights)


class SIGReg(nn.Module):
    """Mean Epps–Pulley statistic over `num_slices` random unit directions, averaged over views.

    The directions are drawn from a generator seeded by the training step, so every rank draws the
    same matrix without communicating, and a resumed run draws the same matrices again.
    """

    def __init__(
        self,
        num_slices: int = 1024,
        *,
        t_max: float = 3.0,
        knots: int = 17,
        integration: Integration = "half",
        unbiased: bool = False,
        lean: bool = True,
    ):
        super().__init__()
        if num_slices < 1:
            raise ValueError(f"loss.num_slices must be >= 1, got {num_slices}")
        quadrature(t_max, knots, integration, dtype=torch.float32, device=torch.device("cpu"))  # validate
        self.num_slices = num_slices
        self.options = dict(t_max=t_max, knots=knots, integration=integration, unbiased=unbiased, lean=lean)

    def directions(self, dim: int, step: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(dim, num_slices) matrix of unit columns, a function of `step` only (per device type)."""
        gen = torch.Generator(device=device).manual_seed(int(step))
        a = torch.randn(dim, self.num_slices, generator=gen, device=device, dtype=dtype)
        return a / a.norm(dim=0, keepdim=True)

    def slice_statistics(
        self, z: torch.Tensor, step: int, group: dist.ProcessGroup | None = None
    ) -> torch.Tensor:
        """Per-slice statistics: embeddings (N, K) -> (M,), or (V, N, K) -> (V, M)."""
        if z.dim() not in (2, 3):
            raise ValueError(f"SIGReg expects embeddings of shape (N, K) or (V, N, K), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            z = z.to(dtype)
            proj = z @ self.directions(z.shape[-1], step, z.device, dtype)
            return epps_pulley(proj, group=group, **self.options)

    def forward(self, z: torch.Tensor, step: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        return self.slice_statistics(z, step, group).mean()
