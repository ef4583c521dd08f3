"""SIGReg against an independent float64 NumPy Epps–Pulley, reference levels, and the lean gradient."""

import numpy as np
import pytest
import torch

from lejepa_scale.method.sigreg import SIGReg, epps_pulley


def epps_pulley_numpy(
    x: np.ndarray, t_max: float, knots: int, integration: str, unbiased: bool
) -> np.ndarray:
    """N ∫ |ecf(t) - exp(-t²/2)|² exp(-t²/2) dt per column of x (N, M), with complex exponentials."""
    n = x.shape[0]
    t = np.linspace(0.0, t_max, knots) if integration == "half" else np.linspace(-t_max, t_max, knots)
    phi = np.exp(-(t**2) / 2)
    ecf = np.exp(1j * x[:, :, None] * t).mean(0)  # (M, T)
    err = np.abs(ecf - phi) ** 2
    if unbiased:
        err = err - (1 - np.abs(ecf) ** 2) / (n - 1)
    integral = np.trapezoid(err * phi, t, axis=-1)
    return n * (2 * integral if integration == "half" else integral)


def samples(kind: str, n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    return {
        "gaussian": lambda: rng.standard_normal((n, m)),
        "uniform": lambda: rng.uniform(-2, 2, (n, m)),
        "shifted": lambda: rng.standard_normal((n, m)) + 1.0,
        "scaled": lambda: 3.0 * rng.standard_normal((n, m)),
        "heavy_tailed": lambda: rng.standard_t(2, (n, m)),
    }[kind]()


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "shifted", "scaled", "heavy_tailed"])
@pytest.mark.parametrize("integration,t_max", [("half", 3.0), ("symmetric", 5.0)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_numpy_reference(kind, integration, t_max, unbiased):
    x = samples(kind, 300, 16, np.random.default_rng(0))
    expected = epps_pulley_numpy(x, t_max, 17, integration, unbiased)
    for lean in (True, False):
        got = epps_pulley(
            torch.from_numpy(x), t_max=t_max, knots=17, integration=integration, unbiased=unbiased, lean=lean
        )
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-9)


def test_float32_inputs_and_batched_views():
    x = samples("uniform", 200, 8, np.random.default_rng(1))
    expected = epps_pulley_numpy(x, 3.0, 17, "half", False)
    stacked = torch.from_numpy(np.stack([x, x])).to(torch.bfloat16).float()  # (V, N, M)
    got = epps_pulley(torch.from_numpy(x).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)
    assert epps_pulley(stacked).shape == (2, 8)


def test_half_and_symmetric_grids_agree_within_two_percent():
    z = torch.from_numpy(samples("uniform", 2000, 64, np.random.default_rng(2)))
    half = epps_pulley(z, t_max=3.0, integration="half").mean()
    symmetric = epps_pulley(z, t_max=5.0, integration="symmetric").mean()
    assert abs(half / symmetric - 1) < 0.02


def test_gaussian_reference_level():
    """Perfectly Gaussian embeddings sit at ≈1.05, not 0 (the ×N-scaled minibatch bias)."""
    sigreg = SIGReg(num_slices=256)
    gen = torch.Generator().manual_seed(0)
    values = [sigreg(torch.randn(8192, 64, generator=gen), step=s).item() for s in range(8)]
    assert 0.95 <= np.mean(values) <= 1.15


def test_unbiased_removes_the_gaussian_floor():
    sigreg = SIGReg(num_slices=256, unbiased=True)
    gen = torch.Generator().manual_seed(0)
    values = [sigreg(torch.randn(4096, 64, generator=gen), step=s).item() for s in range(8)]
    assert abs(np.mean(values)) < 0.1


@pytest.mark.parametrize("n", [64, 1000])
def test_collapse_level(n):
    value = SIGReg(num_slices=32)(torch.zeros(n, 16), step=0).item()
    assert value == pytest.approx(0.40 * n, rel=0.05)


def test_directions_are_unit_and_step_seeded():
    sigreg = SIGReg(num_slices=64)
    a = sigreg.directions(32, 7, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(64))
    assert torch.equal(a, sigreg.directions(32, 7, torch.device("cpu"), torch.float32))
    assert not torch.equal(a, sigreg.directions(32, 8, torch.device("cpu"), torch.float32))


def test_lean_gradcheck_float64():
    proj = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: epps_pulley(p, knots=7, lean=True), (proj,))
    assert torch.autograd.gradcheck(lambda p: epps_pulley(p, knots=7, lean=True, unbiased=True), (proj,))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_lean_equals_naive(dtype, tol, monkeypatch):
    import lejepa_scale.method.sigreg as sigreg_module

    monkeypatch.setattr(sigreg_module, "_LEAN_BLOCK_ELEMENTS", 4096)  # force many chunks
    proj = torch.randn(3, 257, 32, dtype=dtype)
    weights = torch.randn(3, 32, dtype=dtype)
    results = []
    for lean in (True, False):
        p = proj.clone().requires_grad_()
        value = epps_pulley(p, lean=lean)
        (value * weights).sum().backward()
        results.append((value.detach(), p.grad))
    (v_lean, g_lean), (v_naive, g_naive) = results
    torch.testing.assert_close(v_lean, v_naive, rtol=tol, atol=tol)
    torch.testing.assert_close(g_lean, g_naive, rtol=tol, atol=tol * g_naive.abs().max().item())


def test_sigreg_runs_in_float32_under_bf16_autocast():
    z = torch.randn(256, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = SIGReg(num_slices=64)(z.bfloat16(), step=3)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, SIGReg(num_slices=64)(z.bfloat16().float(), step=3))
