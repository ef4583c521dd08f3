"""Checkpoints and resume with real gloo ranks under torchrun: bit-exact resume after SIGKILL,
half-written checkpoints, SIGUSR2, retention, tampered files, non-finite losses."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lejepa_scale.checkpointing.safe_loading import CheckpointError, load_tensors
from lejepa_scale.cluster.preemption import EXIT_PREEMPTED
from tests.distributed import run_ranks
from tests.helpers import ENV, ROOT, TINY, TINY_VIT, losses, run_train, train_command, weights

SMALL = [*TINY, "train.log_every=1", "optim.warmup_steps=2"]


def command(run_dir, nproc, *overrides):
    return train_command(run_dir, *SMALL, *overrides, nproc=nproc)


def run(run_dir, nproc, *overrides, check=True):
    return run_train(run_dir, *SMALL, *overrides, nproc=nproc, check=check, timeout=300)


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise TimeoutError


def rank_pids(launcher_pid):
    """The trainer processes torchrun started (not its helper processes)."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if b"lejepa_scale.train" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.parametrize("layout", [[], ["parallel.dp_replicate=2"]], ids=["fsdp", "hsdp"])
def test_sigkill_of_one_rank_then_restart_is_bit_exact(tmp_path, layout):
    """Under HSDP (2 replicas of 1 shard) the restart reads the checkpoint on replica 0 only."""
    steps = ["train.steps=8", "checkpoint.every_steps=5", *layout]
    run(tmp_path / "straight", 2, *steps)
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        command(interrupted, 2, *steps),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(
        lambda: (
            (interrupted / "checkpoints" / "step-00000005.tmp").exists()
            or (interrupted / "checkpoints" / "step-00000005").exists()
        )
    )
    os.kill(rank_pids(proc.pid)[-1], signal.SIGKILL)  # one rank dies; torchrun tears the job down
    assert proc.wait(timeout=120) != 0
    assert not (interrupted / "model.pt").exists()
    run(interrupted, 2, *steps)  # same command: resumes from the newest complete checkpoint
    assert losses(interrupted) == losses(tmp_path / "straight")
    straight, resumed = weights(tmp_path / "straight"), weights(interrupted)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    run(tmp_path, 2, "train.steps=4", "checkpoint.every_steps=2")
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000004"]
    # what a job killed mid-write leaves: a .tmp directory with partial shards
    partial = folder / "step-00000006.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 100)
    result = run(tmp_path, 2, "train.steps=6", "checkpoint.every_steps=2")
    assert "resumed from" in result.stderr and "step-00000004" in result.stderr
    assert "removing incomplete checkpoint" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004", "step-00000006"]


def preempt(run_dir, *overrides):
    """Train on 2 ranks, send SIGUSR2 to one of them after 3 logged steps; the trainer's stderr."""
    proc = subprocess.Popen(command(run_dir, 2, "train.steps=200", *overrides), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    os.kill(rank_pids(proc.pid)[0], signal.SIGUSR2)  # like `scancel --signal=USR2`, to one rank
    _, stderr = proc.communicate(timeout=120)
    assert f"exitcode  : {EXIT_PREEMPTED}" in stderr or f"exit code {EXIT_PREEMPTED}" in stderr.lower()
    return stderr


def test_sigusr2_saves_at_the_next_step_boundary_and_exits_for_requeue(tmp_path):
    stderr = preempt(tmp_path, "checkpoint.every_steps=0", "checkpoint.every_minutes=0")
    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert len(saved) == 1 and not saved[0].name.endswith(".tmp")
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < 200 and not (tmp_path / "model.pt").exists()
    assert max(s for s, _ in losses(tmp_path)) == step - 1  # stopped at the boundary it saved
    assert f"preemption at step {step}: saved (" in stderr  # no checkpoint of this step existed


def test_preemption_completes_the_save_in_flight_instead_of_saving_again(tmp_path):
    """A background save of the current step is under way when the signal is agreed on (one every
    step here): the trainer waits for it and exits; it writes no second checkpoint."""
    stderr = preempt(
        tmp_path, "checkpoint.every_steps=1", "train.control_every=1", "checkpoint.keep_last=100"
    )
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    step = max(s for s, _ in losses(tmp_path)) + 1
    assert saved[-1] == f"step-{step:08d}" and not any(name.endswith(".tmp") for name in saved)
    message = re.search(rf"preemption at step {step}: (.*) \(", stderr).group(1)
    assert message in (
        "completed the background save of this step",
        "the checkpoint of this step is complete",
    )


def test_retention_keeps_exactly_k_plus_the_permanent_ones(tmp_path):
    result = run(
        tmp_path,
        1,
        "train.steps=9",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=4",
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000008", "step-00000009"]
    assert "assuming the intent" not in result.stderr  # DCP's single-process warning: intended here
    run(tmp_path / "plain", 1, "train.steps=9", "checkpoint.every_steps=2", "checkpoint.keep_last=3")
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()) == [
        "step-00000006",
        "step-00000008",
        "step-00000009",
    ]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PAYLOAD_MARK'])}",))


def test_tampered_checkpoint_is_refused(tmp_path, monkeypatch):
    run(tmp_path, 1, "train.steps=2", "checkpoint.every_steps=0")
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    mark = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refusing to load posix.system|refusing to load os.system"):
        load_tensors(ckpt, {"x": torch.zeros(1)})
    assert not mark.exists()
    # and the trainer itself refuses to resume from it
    result = run(tmp_path, 1, "train.steps=3", "checkpoint.every_steps=0", check=False)
    assert result.returncode != 0 and "refusing to load" in result.stderr and not mark.exists()


def test_nonfinite_losses_skip_updates_then_stop_with_a_clear_error(tmp_path):
    result = run(
        tmp_path,
        1,
        "train.steps=30",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_nonfinite_steps=3",
        "checkpoint.every_steps=1",
        check=False,
    )
    assert result.returncode != 0
    assert "NaN/Inf for 3 consecutive steps" in result.stderr
    for ckpt in (tmp_path / "checkpoints").glob("step-*"):
        assert not ckpt.name.endswith(".tmp")


def test_export_loads_into_timm_with_matching_outputs(tmp_path):
    import timm
    from safetensors.torch import load_file, safe_open

    from lejepa_scale.config import load_config
    from lejepa_scale.training.build import build_model

    run(tmp_path, 2, "train.steps=2", "checkpoint.every_steps=0")  # sharded over 2 ranks
    out = tmp_path / "backbone.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "lejepa_scale.pretrained", "export", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    backbone = timm.create_model(meta["timm_model"], num_classes=0, **json.loads(meta["timm_kwargs"])).eval()
    backbone.load_state_dict(load_file(str(out)), strict=True)
    cfg = load_config(ROOT / "configs/demo_cpu_vit.yaml", [f"run.dir={tmp_path}", *SMALL])
    trained = build_model(cfg).eval()
    trained.load_state_dict(weights(tmp_path))
    images = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trained.features(images))


def test_load_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    run(tmp_path / "a", 2, "train.steps=3", "checkpoint.every_steps=0")
    result = run(
        tmp_path / "b",
        1,
        "train.steps=0",
        "optim.warmup_steps=0",
        f"checkpoint.load_from={tmp_path / 'a'}",
        check=False,
    )
    assert "train.steps must be >= 1" in result.stderr  # config errors come first
    run(
        tmp_path / "b",
        1,
        "train.steps=1",
        "optim.lr=1e-12",
        "optim.warmup_steps=0",
        f"checkpoint.load_from={tmp_path / 'a'}",
    )
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")  # 2 ranks -> 1: resharded
    assert all(
        torch.allclose(a[k], b[k], atol=1e-6) for k in a if "running" not in k and "num_batches" not in k
    )
    assert not (tmp_path / "b" / "checkpoints" / "step-00000003").exists()  # a fresh run, step 0


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_reshards_and_continues(tmp_path, before, after):
    run(tmp_path, before, "train.steps=3", "checkpoint.every_steps=0")
    saved = weights(tmp_path)
    result = run(tmp_path, after, "train.steps=3", "checkpoint.every_steps=0")  # load only, no step left
    assert "resharded exactly" in result.stderr and "samples consumed) continues on" in result.stderr
    reloaded = weights(tmp_path)
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)  # parameters equal the saved ones
    run(tmp_path, after, "train.steps=5", "checkpoint.every_steps=0")  # and training continues
    assert [s for s, _ in losses(tmp_path)] == [0, 1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "step-00000005").exists()


def hsdp_save_and_restart_worker(rank, world_size, folder):
    from lejepa_scale.checkpointing.replicas import replica_share
    from lejepa_scale.checkpointing.safe_loading import SafeReader
    from lejepa_scale.checkpointing.states import ModelState, OptimizerState
    from lejepa_scale.config import load_config
    from lejepa_scale.distributed.parallel import full_state_dict
    from lejepa_scale.distributed.process_groups import init_distributed
    from lejepa_scale.training.build import (
        build_checkpointer,
        build_loss,
        build_optimizer,
        build_parallel_model,
        build_scheduler,
    )

    overrides = [f"run.dir={folder}", TINY_VIT, "parallel.dp_replicate=2", "train.precision=fp32",
                 "loss.num_slices=64"]  # fmt: skip
    cfg = load_config(ROOT / "configs/demo_cpu_vit.yaml", overrides)
    env = init_distributed("cpu")
    model = build_parallel_model(cfg, env)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    gen = torch.Generator().manual_seed(rank)
    out = model(torch.randn(2, 4, 3, 24, 24, generator=gen), torch.randn(4, 4, 3, 12, 12, generator=gen))
    build_loss(cfg)(out.z_global, out.z_local, 0).total.backward()
    optimizer.step()
    scheduler.step()
    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer), "schedule": scheduler}
    saver = build_checkpointer(cfg, env, state, {}, {})
    saver.save(1, blocking=True)
    written = (Path(folder) / "checkpoints/step-00000001" / f"__{rank}_0.distcp").stat().st_size
    whole = replica_share({k: v.state_dict() for k, v in state.items()}, 0, 1)[
        1
    ]  # everything this rank holds
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        restarted = build_parallel_model(cfg, env, initialize=False)  # what a resume builds
    broadcasts = sum(e.name == "c10d::broadcast_" for e in prof.events())
    optimizer2 = build_optimizer(restarted, cfg)
    scheduler2 = build_scheduler(optimizer2, cfg)
    state2 = {
        "model": ModelState(restarted),
        "optim": OptimizerState(restarted, optimizer2),
        "schedule": scheduler2,
    }
    loader = build_checkpointer(cfg, env, state2, {}, {})
    reads, read_data = [], SafeReader.read_data

    def counted(self, plan, planner):
        reads.extend(plan.items)
        return read_data(self, plan, planner)

    SafeReader.read_data = counted
    loader.load(loader.latest())
    same_moments = all(
        torch.equal(optimizer.state[p][k].to_local(), optimizer2.state[q][k].to_local())
        for p, q in zip(model.parameters(), restarted.parameters(), strict=True)
        for k in ("exp_avg", "exp_avg_sq")
    )
    same_schedule = scheduler2.state_dict() == scheduler.state_dict() and (
        optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    )
    return (
        saver.staged_bytes,
        written,
        whole,
        broadcasts,
        full_state_dict(model),
        full_state_dict(restarted),
        same_moments and same_schedule,
        len(reads),
    )


def test_hsdp_replicas_stage_only_what_they_write_and_a_restart_reads_once_without_init_broadcast(tmp_path):
    """HSDP 2 x 2: each rank copies to host only its share of the checkpoint; a model built for a
    resume is only allocated (no init broadcast); replica 0 reads the checkpoint and shares it with
    replica 1; model, optimizer and schedule equal the saved ones after loading."""
    results = run_ranks(hsdp_save_and_restart_worker, 4, str(tmp_path))
    for rank, (staged, written, whole, broadcasts, _, _, same_state, reads) in enumerate(results):
        assert staged <= 1.05 * written  # it stages what it writes...
        assert staged < 0.6 * whole  # ...about half of what it holds (2 replicas)
        assert broadcasts == 0 and same_state
        assert (reads > 0) == (rank < 2), (rank, reads)  # ranks 0-1 are replica 0, ranks 2-3 replica 1
    saved, restarted = results[0][4], results[0][5]
    assert saved.keys() == restarted.keys() and all(torch.equal(saved[k], restarted[k]) for k in saved)
