"""Report plots: real PNGs from a real run, and Spearman's ρ over a small synthetic sweep."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lejepa_scale import report
from tests.helpers import TINY, run_train


def assert_real_png(path: Path) -> None:
    assert path.stat().st_size > 5000, path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, f"{path} is blank"


CNN = ["model.name=resnet10t", "model.backbone_kwargs={}", "views.global_size=28", "views.local_size=16"]


@pytest.mark.parametrize("model", [[], CNN], ids=["vit", "cnn"])
def test_report_of_a_run_writes_its_plots(tmp_path, model):
    """A CNN's PCA picture comes from its last feature map (1 x 1 at 28 px: one colour per image)."""
    run_train(tmp_path, *TINY, *model, "train.steps=6", "train.log_every=1", "log.health_every=2")
    report.main([str(tmp_path), "--pca-images", "4", "--out", str(tmp_path / "sweep")])
    names = ["losses", "scaled_loss", "health", "lr_throughput", "pca_patches"]
    for name in names:
        assert_real_png(tmp_path / "report" / f"{name}.png")
    assert not (tmp_path / "sweep").exists()  # one run without eval.json: no sweep plot


def rank(values):
    order = np.argsort(values)
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def test_spearman_over_a_synthetic_sweep(tmp_path):
    """Five runs whose accuracy falls exactly as loss / lam**0.4 rises, while the raw loss orders
    them differently: ρ(scaled) = -1, and ρ(raw) equals NumPy's rank correlation."""
    lams = [0.01, 0.02, 0.05, 0.1, 0.2]
    raw = [0.20, 0.24, 0.30, 0.33, 0.45]
    scaled = [loss / lam**0.4 for loss, lam in zip(raw, lams, strict=True)]
    accuracy = [0.9 - 0.1 * r for r in rank(scaled)]
    runs = []
    for lam, loss, acc in zip(lams, raw, accuracy, strict=True):
        run = tmp_path / f"lam{lam}"
        run.mkdir()
        (run / "config.yaml").write_text(f"loss:\n  lam: {lam}\n")
        noisy_start = [{"step": s, "loss": 5.0} for s in range(90)]  # only the last 10% counts
        lines = noisy_start + [{"step": 90 + s, "loss": loss} for s in range(10)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (run / "eval.json").write_text(json.dumps({"linear": {"top1": acc, "top5": 1.0}}))
        runs.append(run)
    summary = report.sweep_summary(runs, alpha=0.4)
    assert summary["spearman_scaled"] == pytest.approx(-1.0)
    expected_raw = np.corrcoef(rank(raw), rank(accuracy))[0, 1]
    assert summary["spearman_raw"] == pytest.approx(expected_raw)
    assert summary["spearman_raw"] > -1.0
    assert [r["scaled_loss"] for r in summary["runs"]] == pytest.approx(scaled)
    out = tmp_path / "sweep"
    assert_real_png(report.sweep_plot(summary, out.mkdir() or out))
