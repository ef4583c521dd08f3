"""Observability: wandb offline runs that survive a resume, the logged metrics, and the label-free
embedding-health signal against its Gaussian and collapse reference levels."""

import json
from pathlib import Path

import pytest
import torch

from lejepa_scale.method.health import collapse_alarm, effective_rank, embedding_health
from lejepa_scale.method.objective import LeJEPALoss
from lejepa_scale.method.sigreg import SIGReg
from lejepa_scale.training.metrics import wandb_mode
from tests.helpers import ENV, TINY, metrics, run_train

LOGGED = [*TINY, "train.log_every=1", "log.health_every=2", "checkpoint.every_steps=2"]


def train(run_dir, *overrides):
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB")}
    env.update(HOME=str(run_dir.parent))  # no netrc key: wandb runs offline
    return run_train(run_dir, *LOGGED, *overrides, env=env, timeout=300)


def test_wandb_offline_run_and_a_resume_that_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    first = train(run_dir, "train.steps=4")
    assert "wandb sync" in first.stderr  # the upload instructions for a cluster without internet
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert offline.name.endswith(f"-{run_id}")
    log = (offline / f"run-{run_id}.wandb").read_bytes()
    for key in (
        b"loss",
        b"scaled_loss",
        b"grad_norm",
        b"img_per_s",
        b"peak_mem_gib",
        b"health/effective_rank",
    ):
        assert key in log, key
    assert b"demo_cpu_vit" in log and b"vit_tiny_patch16_224" in log  # the run name and its config
    meta = json.loads((run_dir / "checkpoints/step-00000004/meta.json").read_text())
    assert meta["wandb_run_id"] == run_id

    # a requeued job on a fresh node may lose the run dir's id file: the checkpoint carries it
    (run_dir / "wandb_run_id").unlink()
    second = train(run_dir, "train.steps=6")
    assert "resumed from" in second.stderr
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{run_id}") for s in segments)
    hint = second.stderr.split("wandb sync ")[1].split()[0]  # one command uploads every segment
    assert sorted(Path("/").glob(hint.lstrip("/"))) == segments
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert [r["step"] for r in metrics(run_dir)] == list(range(6))


def test_every_step_metrics_and_health_are_logged(tmp_path):
    result = train(tmp_path, "train.steps=3", "log.wandb=disabled")
    records = metrics(tmp_path)
    # redirected output (a SLURM log, `> file`): a line per logged step, no progress-bar redraws
    assert "\r" not in result.stderr and "step 2/3 loss=" in result.stderr
    for key in ("loss", "pred", "sigreg", "scaled_loss", "lr", "grad_norm", "img_per_s", "img_per_s_per_rank",
                "data_wait", "peak_mem_gib"):  # fmt: skip
        assert all(key in r for r in records), key
    assert records[0]["scaled_loss"] == pytest.approx(records[0]["loss"] / 0.05**0.4)
    assert "health/effective_rank" in records[0] and "health/effective_rank" not in records[1]
    assert records[0]["health/sigreg_collapse_level"] == pytest.approx(0.4 * 16)
    assert not (tmp_path / "wandb").exists()


def test_throughput_is_measured_between_logged_steps(tmp_path):
    """GPUs run ahead of the host: a logged step's images/s covers every step since the previous
    logged one, timed when their values are read, not one step's host time."""
    run_train(tmp_path, *TINY, "train.steps=7", "train.log_every=3", "log.health_every=1000")
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 3, 6]
    for before, after in zip(records, records[1:], strict=False):
        elapsed = after["time"] - before["time"]  # both stamped right after the values were read
        assert after["img_per_s"] * elapsed / 3 == pytest.approx(16, rel=0.02)


def test_wandb_mode_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"


def health_of(z_global, z_local, step=0):
    parts = LeJEPALoss(0.05, SIGReg(num_slices=256))(z_global, z_local, step)
    return embedding_health(z_global, z_local, parts.sigreg_per_view, z_global.shape[1])


def test_health_of_gaussian_embeddings(gen):
    h = health_of(torch.randn(2, 512, 16, generator=gen), torch.randn(4, 512, 16, generator=gen))
    for v in range(6):
        assert 0.7 < h[f"health/sigreg_view{v}"] < 2.0  # near the Gaussian level 1.05 (sample noise)
    assert h["health/collapse_fraction"] < 0.01  # far from 0.40 N = 205
    assert h["health/effective_rank"] > 15  # of 16 dimensions
    assert h["health/std_min"] > 0.9 and h["health/std_max"] < 1.1
    assert collapse_alarm(h) is None


def test_health_of_collapsing_embeddings_raises_the_alarm(gen):
    direction = torch.randn(1, 1, 16, generator=gen)
    shared = direction + 1e-3 * torch.randn(6, 512, 16, generator=gen)  # every embedding nearly equal
    h = health_of(shared[:2], shared[2:])
    assert h["health/collapse_fraction"] > 0.9  # SIGReg near 0.40 N
    assert h["health/std_max"] < 1e-2
    alarm = collapse_alarm(h)
    assert alarm and "approach collapse" in alarm


def test_effective_rank_counts_the_used_dimensions(gen):
    z = torch.randn(4096, 8, generator=gen)
    assert effective_rank(z) == pytest.approx(8, rel=0.02)
    assert effective_rank(torch.cat([z[:, :3], torch.zeros(4096, 5)], 1)) == pytest.approx(3, rel=0.02)
