"""What many tests share: the tiny ViT override, and the trainer's real command line (one process,
or N gloo ranks under torchrun) run on the demo recipe, with readers for what a run leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo_cpu_vit.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TINY_VIT = "model.backbone_kwargs={patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}"  # 0.1M params
TINY = ["train.batch_size=16", "loss.num_slices=64", TINY_VIT]  # a few seconds per step on one core


def tiny_job(steps: int) -> list[str]:
    """The tiny ViT as a launched job: every step logged, a checkpoint every 10 steps, one thread."""
    logging = ["train.log_every=1", "checkpoint.every_steps=10"]
    return [*TINY, f"train.steps={steps}", *logging, "optim.warmup_steps=2", "train.threads=1"]


def train_command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """`python -m lejepa_scale.train --config configs/demo_cpu_vit.yaml run.dir=... OVERRIDES`, under
    torchrun with `nproc` gloo ranks when nproc > 1."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    launcher = torchrun if nproc > 1 else []
    trainer = ["-m", "lejepa_scale.train", "--config", str(DEMO), f"run.dir={run_dir}"]
    return [sys.executable, *launcher, *trainer, *overrides]


def run_train(
    run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, env: dict | None = None, timeout=900
) -> subprocess.CompletedProcess:
    """Run the trainer to its end; with `check`, a non-zero exit fails the test with its stderr."""
    result = subprocess.run(
        train_command(run_dir, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=ROOT,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final full state dict a run writes to `<run>/model.pt`."""
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def sample_sets(run_dir: Path) -> dict[int, set[str]]:
    """For every step, the union of the sample keys all ranks trained on (`log.sample_keys=true`)."""
    steps: dict[int, set[str]] = {}
    for path in (Path(run_dir) / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], set()).update(record["keys"])
    return steps
