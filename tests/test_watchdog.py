"""The hang watchdog on 2 real gloo ranks: a frozen peer (SIGSTOP: it neither dies nor answers)
leaves the other rank blocked in a collective; its watchdog names the step and the collective,
exits with EXIT_HUNG, and the rerun resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lejepa_scale.cluster.watchdog import EXIT_HUNG, slow_step_seconds, timeout_too_short
from tests.helpers import ENV, ROOT, TINY, losses, run_train, train_command, weights

COMMON = [*TINY, "train.steps=8", "checkpoint.every_steps=2", "train.log_every=1", "train.hang_timeout=6"]


def rank_pid(marker: str, rank: int) -> int:
    """The trainer process of `rank` whose command line contains `marker` (its run dir)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (
            marker.encode() in cmdline
            and b"lejepa_scale.train" in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    raise LookupError(f"no rank {rank} of {marker}")


def test_a_frozen_peer_is_named_and_the_run_resumes_exactly(tmp_path):
    run_train(tmp_path / "straight", *COMMON, nproc=2)
    hung = tmp_path / "hung"
    proc = subprocess.Popen(train_command(hung, *COMMON, nproc=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip
    frozen = None
    try:
        deadline = time.time() + 300
        while not (hung / "checkpoints" / "step-00000004").is_dir() and time.time() < deadline:
            time.sleep(0.05)
        frozen = rank_pid(str(hung), 1)
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, stderr = proc.communicate(timeout=180)
        waited = time.monotonic() - stopped_at
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        proc.kill()
    assert proc.returncode != 0
    line = next(line for line in stderr.splitlines() if "no training step completed" in line)
    assert "train.hang_timeout=6" in line and "last completed step:" in line
    assert "the training loop waits in torch.distributed." in line and "(called from lejepa_scale/" in line
    assert f"exitcode  : {EXIT_HUNG}" in stderr  # torchrun's summary of rank 0
    assert waited < 60  # detected within the timeout plus the watchdog's polling, not by SLURM

    run_train(hung, *COMMON, nproc=2)  # the requeued job: resumes from the newest checkpoint
    assert losses(hung) == losses(tmp_path / "straight")
    final, reference = weights(hung), weights(tmp_path / "straight")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_suspended_job_is_not_a_hang(tmp_path):
    """`scontrol suspend` stops every process of the job (SIGSTOP) for as long as SLURM wants: after
    the resume, the time it was stopped is not counted against train.hang_timeout."""
    run_dir = tmp_path / "suspended"
    proc = subprocess.Popen(train_command(run_dir, *COMMON, nproc=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step-00000004").is_dir() and time.time() < deadline:
            time.sleep(0.05)
        ranks = [rank_pid(str(run_dir), rank) for rank in (0, 1)]
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(14)  # over twice train.hang_timeout=6
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "no training step completed" not in stderr, stderr[-2000:]
    assert len(losses(run_dir)) == 8


def test_the_timeout_is_checked_against_a_slow_step_of_the_model():
    """ViT-g/14-like step: 1e15 FLOPs per rank on a 989 TFLOP/s GPU at 5 % MFU ≈ 20 s, plus a 2 GB
    checkpoint share at 100 MB/s = 20 s: the 1800 s default passes, 60 s does not."""
    slow = slow_step_seconds(1e15, 989.0, 2e9)
    assert slow == pytest.approx(1e15 / (0.05 * 989e12) + 20)
    assert timeout_too_short(1800, slow) is None and timeout_too_short(0, slow) is None  # 0: off
    assert "raise it to 121 s or more" in timeout_too_short(60, slow)
