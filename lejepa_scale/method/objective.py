"""The LeJEPA loss over global and local views: (1 - λ)·prediction + λ·SIGReg."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lejepa_scale.method.sigreg import SIGReg


@dataclass
class LossParts:
    """The total loss and what it is made of (SIGReg also per view, for health monitoring)."""

    total: torch.Tensor
    prediction: torch.Tensor
    sigreg: torch.Tensor
    sigreg_per_view: torch.Tensor  # (V,), global views first


class LeJEPALoss(nn.Module):
    """Pull every view towards the mean of its image's global views; keep each view's batch Gaussian.

    The centre uses the global views only and is not detached (no stop-gradient). The prediction term
    is a per-coordinate mean, the scale the published λ values assume. Both terms run in float32.
    """

    def __init__(self, lam: float = 0.05, sigreg: SIGReg | None = None):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"loss.lam must be in [0, 1], got {lam}")
        self.lam = lam
        self.sigreg = sigreg if sigreg is not None else SIGReg()

    def forward(
        self,
        z_global: torch.Tensor,
        z_local: torch.Tensor | None,
        step: int,
        group: dist.ProcessGroup | None = None,
        centres: torch.Tensor | None = None,
    ) -> LossParts:
        """z_global: (Vg, N, K) embeddings of the global views; z_local: (Vl, N, K) or None;
        `centres` (N, K): given targets (an SWA model's, no gradient) instead of z_global's mean."""
        with torch.autocast(device_type=z_global.device.type, enabled=False):
            z_global = z_global.float() if z_global.dtype != torch.float64 else z_global
            views = z_global if z_local is None else torch.cat([z_global, z_local.to(z_global.dtype)])
            centres = z_global.mean(0) if centres is None else centres.to(z_global.dtype)
            prediction = (centres - views).square().mean()
            per_view = self.sigreg.slice_statistics(views, step, group).mean(-1)
            sigreg = per_view.mean()
            total = (1 - self.lam) * prediction + self.lam * sigreg
        return LossParts(total=total, prediction=prediction, sigreg=sigreg, sigreg_per_view=per_view)
