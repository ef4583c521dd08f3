"""Rules CUDA and NCCL enforce that CPU and gloo never do, made to fail here: float8 weight
subclasses in checkpoints (torchao's FSDP float8 all-gather forced on, emulated), token counts float8
matmuls cannot take, pinned and contiguous batches, features gathered as tensors (NCCL sends no
pickles), host-resident state kept off the training backend, and the GPU a task picks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from data_pipeline.indexed import IndexedViews, MemorySource
from data_pipeline.views import CropSpec, Photometric, ViewBatch
from lejepa_scale.checkpointing.replicas import on_device
from lejepa_scale.checkpointing.staging import BackgroundStager
from lejepa_scale.config import ConfigError, load_config
from lejepa_scale.distributed.process_groups import cuda_index
from lejepa_scale.training.build import check_model
from tests.distributed import run_ranks
from tests.helpers import DEMO, ENV, ROOT, TINY, run_train, weights

FLOAT8 = [*TINY, "parallel.float8=true", "parallel.float8_all_gather=true", "train.log_every=1"]


def test_a_float8_async_checkpoint_holds_the_live_weights_and_loads_without_torchao(tmp_path):
    """With float8 all-gathers every block weight is torchao's subclass; DCP's stager cannot copy it
    (it stages uninitialised memory). A background save must equal a blocking one of the same step,
    and what is written must be plain tensors (model.pt loads with weights_only, export works)."""
    from lejepa_scale.pretrained import export_backbone, load_run

    common = [*FLOAT8, "train.steps=3", "checkpoint.every_steps=2"]
    run_train(tmp_path / "async", *common, nproc=2)
    run_train(tmp_path / "blocking", *common, "checkpoint.async_save=false", nproc=2)
    step2 = "checkpoints/step-00000002"
    background = load_run(tmp_path / "async" / step2)[0].state_dict()  # a plain model: no float8 here
    blocking = load_run(tmp_path / "blocking" / step2)[0].state_dict()
    for name, value in blocking.items():
        assert torch.equal(background[name], value), name
    final = weights(tmp_path / "async")  # torch.load(weights_only=True): refuses torchao's classes
    assert all(type(v) is torch.Tensor for v in final.values())
    export_backbone(tmp_path / "async", tmp_path / "backbone.safetensors")  # safetensors refuses subclasses


def float8_scales_worker(rank, world_size):
    from lejepa_scale.distributed.float8 import float8_scale_update, is_float8_weight
    from lejepa_scale.distributed.process_groups import init_distributed
    from lejepa_scale.training.build import build_loss, build_optimizer, build_parallel_model, build_scheduler
    from lejepa_scale.training.step import train_step

    cfg = load_config(DEMO, ["run.dir=x", *FLOAT8, "train.precision=fp32"])
    env = init_distributed("cpu")
    model = build_parallel_model(cfg, env)
    optimizer = build_optimizer(model, cfg)
    float8 = [p for p in model.parameters() if is_float8_weight(p)]
    views = [torch.rand(2, 16, 3, 24, 24), torch.rand(4, 16, 3, 12, 12)]
    train_step(model, build_loss(cfg), optimizer, build_scheduler(optimizer, cfg), views, 0,
               torch.autocast("cpu", enabled=False), after_update=float8_scale_update(model))  # fmt: skip
    return len(float8), [p._local_tensor._precomputed_scale is not None for p in float8]


@pytest.mark.parametrize("reusable", [True, False])
def test_every_background_save_copies_that_saves_state_whether_or_not_torch_can_reuse_its_stager(reusable):
    """torch 2.11's DefaultStager cannot stage twice (pytorch#183413; the first GPU run of gpu_check
    failed there at the second save): where it cannot, each save gets a new one."""
    stager = BackgroundStager(reusable)
    weight, copiers = torch.zeros(64), []
    for save in range(3):
        weight.fill_(save)
        staged = stager.stage({"model": {"weight": weight}, "step": save}).result()
        weight.fill_(-1)  # the loop's next update: must not reach the copy
        assert staged["step"] == save
        assert torch.equal(staged["model"]["weight"], torch.full((64,), float(save)))
        copiers.append(stager.stager)
    stager.close()
    assert len({id(c) for c in copiers}) == (1 if reusable else 3)


def test_float8_all_gather_scales_are_precomputed_after_each_update():
    for count, precomputed in run_ranks(float8_scales_worker, 2):
        assert count == 8 and all(precomputed)  # 2 blocks x (qkv, proj, fc1, fc2)


@pytest.mark.parametrize("batch, ok", [(29, False), (50, False), (54, False), (56, True), (64, True)])
def test_float8_token_counts_that_scaled_mm_refuses_fail_at_config_time(batch, ok):
    """ViT-g/14 at 224 px: 257 tokens per view, so 2 global views x B images x 257 must be a
    multiple of 16 (B a multiple of 8); the planner's suggestions 29, 50, 54 are not."""
    recipe = "configs/vit_g14_in1k_16nodes.yaml"
    cfg = load_config(recipe, ["run.dir=x", "parallel.float8=true", f"train.batch_size={batch}"])
    if ok:
        check_model(cfg)
    else:
        with pytest.raises(ConfigError, match=r"2 views x \d+ images x 257 tokens .* multiple of 8"):
            check_model(cfg)


def test_batches_are_pinned_contiguous_on_both_sources(monkeypatch):
    """torch's pin_memory passes a dataclass through unpinned; ViewBatch pins itself. A grayscale
    image expanded to 3 channels is a broadcast view: it is made contiguous before pinning (CPU
    builds of torch cannot pin, so the pinning call is recorded here)."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # the DataLoader pins only then
    images, labels = torch.randint(0, 255, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40)
    crops = [CropSpec(2, 24, (0.3, 1.0)), CropSpec(2, 12, (0.1, 0.3))]
    source = IndexedViews([MemorySource("x", images, labels)], global_batch=8, micro_batch=8, crops=crops,
                          photometric=Photometric(), pin_memory=True)  # fmt: skip
    batch = next(iter(source))
    assert len(pinned) == 5 and all(
        t.is_contiguous() for t in pinned
    )  # 2 crop kinds, their parameters, labels
    assert batch.views[0].stride()[2] != 0  # not the broadcast view
    pinned.clear()
    loader_batch = ViewBatch(views=[torch.zeros(2, 4, 1, 8, 8).expand(-1, -1, 3, -1, -1)], labels=None)
    out = pin_memory(loader_batch)  # what the DataLoader's pin thread does with each batch
    assert isinstance(out, ViewBatch) and len(pinned) == 1 and pinned[0].is_contiguous()


def extraction_worker(rank, world_size):
    from torch.distributed import distributed_c10d

    from lejepa_scale.evaluation.features import extract

    pickled = []
    original = distributed_c10d._object_to_tensor
    distributed_c10d._object_to_tensor = lambda *a, **k: pickled.append(1) or original(*a, **k)
    share = rank * 3 + 2  # unequal shares: 2 and 5 images
    batches = [(torch.full((share, 3, 8, 8), float(rank)), torch.full((share,), rank))]
    result = extract(lambda x: x.mean((2, 3)), batches, torch.device("cpu"), lambda x: x)
    return result, len(pickled)


def test_evaluation_features_are_gathered_as_tensors_not_pickles():
    (gathered, pickles0), (nothing, pickles1) = run_ranks(extraction_worker, 2)
    features, labels = gathered
    assert labels.tolist() == [0, 0, 1, 1, 1, 1, 1] and features.shape == (7, 3)
    assert nothing is None and pickles0 == pickles1 == 0


def test_host_resident_state_is_told_apart_from_device_state():
    """What an HSDP resume broadcasts over the training backend: only leaves on the training device
    ("meta" stands in for a GPU here); a CPU step count or a Python number goes over gloo."""
    device = torch.device("meta")
    leaves = [torch.empty(4, device=device), torch.tensor(3.0), 7, "adamw", torch.empty((), device=device)]
    assert on_device(leaves, device) == [True, False, False, False, True]
    assert on_device(leaves, torch.device("cpu")) == [False, True, False, False, False]


def test_each_task_picks_a_gpu_it_can_see():
    assert [cuda_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]  # every GPU visible to every task
    assert [cuda_index(r, 1) for r in (0, 3, 7)] == [0, 0, 0]  # --gpus-per-task=1: one GPU per task


GPU_CHECK = [sys.executable, "benchmarks/gpu_check.py", "--smoke"]


def gpu_check_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


def test_the_gpu_acceptance_command_fits_its_budget_on_cpu(tmp_path):
    """`--smoke --budget-s 90`: every check of the GPU command, tiny and on CPU, within the budget;
    what would not fit is skipped with its estimate, nothing fails, and the rows render (a loaded
    machine can outrun an estimate: a check still running at the budget's end is `stopped`)."""
    start = time.monotonic()
    result = subprocess.run([*GPU_CHECK, "--budget-s", "90", "--out", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, env=ENV, timeout=300)  # fmt: skip
    took = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = gpu_check_rows(tmp_path)
    assert rows[0]["check"] == "environment" and rows[0]["torch"] == torch.__version__
    checks = rows[1:]
    assert len([r for r in checks if r["status"] == "pass"]) >= 2 and took < 90 + 30  # + one stop's grace
    assert all(r["status"] in ("pass", "skipped", "stopped") for r in checks), checks
    assert all(r["estimate_s"] is not None for r in checks if r["status"] == "skipped"), checks
    render = [*GPU_CHECK[:2], "--render", str(tmp_path / "gpu_check.jsonl")]
    table = subprocess.run(render, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120).stdout
    assert table.startswith("### CPU (smoke)") and table.count("\n| ") == len(checks) + 1


def test_a_killed_gpu_check_keeps_every_finished_row(tmp_path):
    """SIGKILL after the first check's row: every row written is whole, none half-written."""
    command = [*GPU_CHECK, "--only", "step,syncs", "--out", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV,
                            start_new_session=True)  # fmt: skip
    path, deadline = tmp_path / "gpu_check.jsonl", time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 2):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = path.read_text()
    assert text.endswith("\n")
    rows = gpu_check_rows(tmp_path)
    assert [r["check"] for r in rows[:2]] == ["environment", rows[1]["check"]] and rows[1]["status"] == "pass"
    assert len(rows) < 5  # it was stopped before the end (2 step rows and 2 syncs rows)


def test_a_check_that_cannot_fit_is_skipped_with_its_estimate(tmp_path):
    result = subprocess.run([*GPU_CHECK, "--budget-s", "2", "--out", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, env=ENV, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    checks = gpu_check_rows(tmp_path)[1:]
    skipped = [r for r in checks if r["status"] == "skipped" and not r["check"].startswith("compile")]
    assert len(skipped) == 5 and all(r["estimate_s"] > 2 and "needs about" in r["detail"] for r in skipped)


def mesh_worker(rank, world_size):
    from lejepa_scale.distributed.process_groups import init_distributed
    from lejepa_scale.training.build import build_checkpointer, build_mesh, build_parallel_model, build_swa

    overrides = [*TINY, "parallel.dp_replicate=2", "model.swa_target=true", "checkpoint.enabled=false"]
    cfg = load_config(DEMO, ["run.dir=/tmp/unused", *overrides])
    env = init_distributed("cpu")
    model = build_parallel_model(cfg, env)
    swa = build_swa(cfg, env, model)
    mesh = build_mesh(env, 2)
    checkpointer = build_checkpointer(cfg, env, {}, {}, {})
    meshes = {p.device_mesh for p in (*model.parameters(), *swa.average.parameters())}
    return meshes == {mesh}, checkpointer.replicate_group is mesh.get_group("dp_replicate")


def test_the_swa_copy_and_the_checkpointer_reuse_the_training_mesh():
    """Each extra NCCL communicator holds GPU memory: the SWA average is sharded on the training
    mesh, and HSDP checkpoints share over the mesh's replicate group, not groups of their own."""
    for one_mesh, shared_group in run_ranks(mesh_worker, 2):
        assert one_mesh and shared_group


def test_sync_debug_covers_the_step_and_leaves_the_planned_syncs_out(tmp_path, monkeypatch):
    """With train.sync_debug the error mode is on around the step proper only: logging, control
    steps and saves (planned host syncs) run outside it. Recorded on CPU, where the mode is a no-op."""
    from contextlib import contextmanager

    from lejepa_scale import train as trainer
    from lejepa_scale.checkpointing.checkpoint import Checkpointer
    from lejepa_scale.training.metrics import MetricsLogger

    regions, inside, planned = [], [False], []

    @contextmanager
    def recorded(enabled, device):
        regions.append(enabled)
        inside[0] = enabled
        yield
        inside[0] = False

    def outside(name, original):
        def call(*args, **kwargs):
            planned.append((name, inside[0]))
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(trainer, "host_syncs_fail", recorded)
    monkeypatch.setattr(Checkpointer, "agree", outside("control", Checkpointer.agree))
    monkeypatch.setattr(Checkpointer, "save", outside("save", Checkpointer.save))
    monkeypatch.setattr(MetricsLogger, "log_step", outside("log", MetricsLogger.log_step))
    schedule = ["train.steps=6", "train.log_every=3", "checkpoint.every_steps=2", "train.control_every=4"]
    cfg = load_config(DEMO, [f"run.dir={tmp_path}", *TINY, *schedule, "train.sync_debug=true"])
    trainer.train(cfg)
    assert regions == [False, True, True, False, True, False]  # steps 0, 3 and 5 (the last) log
    assert {name for name, _ in planned} == {"control", "save", "log"}
    assert not any(was_inside for _, was_inside in planned)
