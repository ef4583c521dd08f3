"""Label-free embedding health: is SIGReg holding the embeddings near an isotropic Gaussian, or are
they collapsing? Two reference levels of the per-view statistic frame the answer: ≈1.05 for Gaussian
embeddings (the default [0, 3] / 17-knot quadrature) and ≈0.40·N when all N embeddings are equal."""

from __future__ import annotations

import torch

GAUSSIAN_LEVEL = 1.05
COLLAPSE_PER_SAMPLE = 0.40
ALARM_FRACTION = 0.5  # SIGReg above this fraction of the collapse level, after warm-up, raises the alarm


def effective_rank(z: torch.Tensor) -> float:
    """exp(entropy) of the normalised covariance spectrum (Roy & Vetterli): 1 for collapsed, K for
    isotropic K-dimensional embeddings."""
    z = z.float() - z.float().mean(0)
    eigenvalues = torch.linalg.eigvalsh(z.T @ z / max(1, len(z) - 1)).clamp_min(0)
    p = eigenvalues / eigenvalues.sum().clamp_min(1e-30)
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))


def embedding_health(
    z_global: torch.Tensor, z_local: torch.Tensor | None, sigreg_per_view: torch.Tensor, n_global: int
) -> dict[str, float]:
    """z_global (Vg, B, K) and z_local (Vl, B, K): this rank's embeddings; sigreg_per_view: (V,)
    statistics of the global batch of `n_global` samples per view."""
    z = torch.cat([z_global.flatten(0, 1)] + ([z_local.flatten(0, 1)] if z_local is not None else []))
    collapse = COLLAPSE_PER_SAMPLE * n_global
    per_view = sigreg_per_view.detach().float().cpu()
    std = z.detach().float().std(0)
    rank = effective_rank(z.detach())
    metrics = {f"health/sigreg_view{i}": float(v) for i, v in enumerate(per_view)}
    metrics.update(
        {
            "health/sigreg_gaussian_level": GAUSSIAN_LEVEL,
            "health/sigreg_collapse_level": collapse,
            "health/collapse_fraction": float(per_view.max()) / collapse,
            "health/effective_rank": rank,
            "health/effective_rank_fraction": rank / z.shape[1],
            "health/std_min": float(std.min()),
            "health/std_mean": float(std.mean()),
            "health/std_max": float(std.max()),
        }
    )
    return metrics


def collapse_alarm(health: dict[str, float]) -> str | None:
    """A warning to log when SIGReg has climbed towards its collapse level."""
    fraction = health["health/collapse_fraction"]
    if fraction < ALARM_FRACTION:
        return None
    return (
        f"embeddings approach collapse: SIGReg is {100 * fraction:.0f}% of its collapse level "
        f"{health['health/sigreg_collapse_level']:.0f} (Gaussian: {GAUSSIAN_LEVEL}), effective rank "
        f"{health['health/effective_rank']:.1f}, smallest per-dimension std {health['health/std_min']:.2g}; "
        "raise loss.lam or lower optim.lr"
    )
