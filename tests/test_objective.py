import pytest
import torch

from lejepa_scale.method.objective import LeJEPALoss
from lejepa_scale.method.sigreg import SIGReg


def embeddings(gen, n_global=2, n_local=4, n=64, k=16):
    return torch.randn(n_global, n, k, generator=gen), torch.randn(n_local, n, k, generator=gen)


def test_prediction_uses_centres_of_global_views_only(gen):
    z_global, z_local = embeddings(gen)
    parts = LeJEPALoss(0.05, SIGReg(num_slices=32))(z_global, z_local, step=0)
    centres = z_global.mean(0)
    expected = (centres - torch.cat([z_global, z_local])).square().mean()
    torch.testing.assert_close(parts.prediction, expected)
    # moving the local views does not move the centres: the global views' own term is unchanged
    shifted = LeJEPALoss(0.05, SIGReg(num_slices=32))(z_global, z_local + 10, step=0)
    own = (centres - z_global).square().mean() * 2 / 6
    torch.testing.assert_close(shifted.prediction - (centres - z_local - 10).square().mean() * 4 / 6, own)


def test_no_stop_gradient_through_centres(gen):
    z_global = torch.randn(1, 8, 4, generator=gen).repeat(2, 1, 1).requires_grad_()  # global views agree
    z_local = torch.randn(3, 8, 4, generator=gen)
    LeJEPALoss(0.0, SIGReg(num_slices=8))(z_global, z_local, step=0).total.backward()
    assert z_global.grad.abs().sum() > 0  # only the local views' pull reaches the centres


def test_lambda_limits(gen):
    z_global, z_local = embeddings(gen)
    pred_only = LeJEPALoss(0.0, SIGReg(num_slices=32))(z_global, z_local, step=3)
    sigreg_only = LeJEPALoss(1.0, SIGReg(num_slices=32))(z_global, z_local, step=3)
    torch.testing.assert_close(pred_only.total, pred_only.prediction)
    torch.testing.assert_close(sigreg_only.total, sigreg_only.sigreg)
    mixed = LeJEPALoss(0.3, SIGReg(num_slices=32))(z_global, z_local, step=3)
    torch.testing.assert_close(mixed.total, 0.7 * pred_only.prediction + 0.3 * sigreg_only.sigreg)


def test_sigreg_is_per_view_then_averaged(gen):
    z_global, z_local = embeddings(gen)
    sigreg = SIGReg(num_slices=32)
    parts = LeJEPALoss(0.05, sigreg)(z_global, z_local, step=1)
    views = torch.cat([z_global, z_local])
    per_view = torch.stack([sigreg(v, step=1) for v in views])
    torch.testing.assert_close(parts.sigreg_per_view, per_view)
    torch.testing.assert_close(parts.sigreg, per_view.mean())


def test_collapse_gives_zero_prediction_and_collapse_level_sigreg():
    n = 256
    z = torch.zeros(2, n, 16)
    parts = LeJEPALoss(0.05, SIGReg(num_slices=64))(z, torch.zeros(6, n, 16), step=0)
    assert parts.prediction.item() == 0.0
    assert parts.sigreg.item() == pytest.approx(0.40 * n, rel=0.05)


def test_global_views_only():
    z_global = torch.randn(2, 32, 8)
    parts = LeJEPALoss(0.05, SIGReg(num_slices=16))(z_global, None, step=0)
    assert parts.sigreg_per_view.shape == (2,)


def test_lambda_out_of_range():
    with pytest.raises(ValueError, match="loss.lam"):
        LeJEPALoss(1.5)
