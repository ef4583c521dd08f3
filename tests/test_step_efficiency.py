"""What a training step costs outside compute, counted from outside the step on 2 real gloo ranks
(collectives by kind, host reads of device values by the project's code), and the single-call
multi-resolution forward against per-size passes."""

import pytest
import torch

from lejepa_scale.config import load_config
from lejepa_scale.distributed.process_groups import init_distributed
from lejepa_scale.training.build import build_loss, build_model, build_parallel_model
from tests.counting import StepCounts
from tests.distributed import run_ranks
from tests.helpers import DEMO, TINY, TINY_VIT, losses, run_train

BLOCKS = 4
COUNTED = [
    "model.backbone_kwargs={patch_size: 4, embed_dim: 64, depth: 4, num_heads: 2}",
    "train.batch_size=16",
    "loss.num_slices=64",
    "train.steps=12",
    "train.log_every=1000",  # steps 0 and 11 log; 1..10 do not
    "log.health_every=1000",
    "checkpoint.every_steps=0",
    "checkpoint.every_minutes=0",
    "train.control_every=10",
]


def counting_worker(rank, world_size, run_dir, overrides):
    from lejepa_scale import train as trainer
    from lejepa_scale.checkpointing.checkpoint import Checkpointer
    from lejepa_scale.training import step as step_module

    cfg = load_config(DEMO, [f"run.dir={run_dir}", *overrides])
    counts, control_steps = StepCounts(), []
    train_step, agree = step_module.train_step, Checkpointer.agree

    def marked_step(*args, **kwargs):
        counts.mark()
        return train_step(*args, **kwargs)

    def marked_control(self, *flags):
        control_steps.append(len(counts.intervals))
        return agree(self, *flags)

    step_module.train_step, Checkpointer.agree = marked_step, marked_control
    with counts:
        trainer.train(cfg)
    return counts.per_step(1, 11), control_steps


def test_a_step_that_does_not_log_gathers_once_per_unit_and_never_reads_the_device(tmp_path):
    results = run_ranks(counting_worker, 2, str(tmp_path), COUNTED)
    for per_step, control_steps in results:
        assert control_steps == [9, 11]  # every train.control_every steps, and at the end
        # FSDP units: 4 blocks + the root. Forward gathers each once (both crop sizes in one call);
        # backward gathers the blocks again, the root stays gathered from forward.
        assert per_step["all_gather"] == 2 * BLOCKS + 1 <= 2 * (BLOCKS + 1)
        assert per_step["reduce_scatter"] == BLOCKS + 1
        # SIGReg forward + backward (2), two global BatchNorms forward + backward (4), the global
        # gradient norm (1, it also decides a skipped update), the online probe (1); plus the
        # control step's packed agreement (1 per 10 steps, on a CPU group of its own)
        assert per_step["all_reduce"] == pytest.approx(8 + 1 / 10), per_step
        assert per_step["host_reads"] == pytest.approx(1 / 10)  # the control step's CPU result
        # nothing else that makes a GPU wait: no Python numbers written into tensors, no tensors
        # made from host data on the device, no blocking copies
        assert (per_step["scalar_writes"], per_step["host_tensors"], per_step["blocking_copies"]) == (0, 0, 0)


def test_one_call_per_block_equals_one_pass_per_crop_size():
    """Loss and every gradient, fp32: both crop sizes through each block in one call vs per-size passes."""
    vit = "model.backbone_kwargs={patch_size: 4, embed_dim: 64, depth: 3, num_heads: 2}"
    cfg = load_config(DEMO, ["run.dir=x", "train.precision=fp32", "loss.num_slices=64", vit])
    views = [torch.randn(2, 8, 3, 24, 24), torch.randn(4, 8, 3, 12, 12)]
    results = []
    for one_call in (True, False):
        model = build_model(cfg)
        assert model.blocks_take_lists
        model.blocks_take_lists = one_call  # False: the per-size path other backbones take
        out = model(*views)
        loss = build_loss(cfg)(out.z_global, out.z_local, 0).total
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=0, atol=1e-6, msg=name)


def fsdp_forward_worker(rank, world_size):
    cfg = load_config(DEMO, ["run.dir=x", "train.precision=fp32", "loss.num_slices=64", TINY_VIT])
    env = init_distributed("cpu")
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 8, 3, 24, 24, generator=gen), torch.randn(4, 8, 3, 12, 12, generator=gen)]
    mine = [v[:, rank * 4 : (rank + 1) * 4] for v in views]
    out = []
    for one_call in (True, False):
        model = build_parallel_model(cfg, env)
        model.blocks_take_lists = one_call
        result = model(*mine)
        loss = build_loss(cfg)(result.z_global, result.z_local, 0).total
        loss.backward()
        out.append((loss.detach(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}))
    return out


def test_one_call_per_block_under_fsdp_on_two_ranks():
    for (loss_a, grads_a), (loss_b, grads_b) in run_ranks(fsdp_forward_worker, 2):
        torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grad, grads_b[name], rtol=0, atol=1e-6, msg=name)


def test_float8_run_resumes_exactly_and_keeps_checkpoint_keys(tmp_path):
    """parallel.float8 on 2 gloo ranks (torchao's emulation): it trains, saves the usual keys, resumes."""
    from torch.distributed.checkpoint import FileSystemReader

    common = [*TINY, "parallel.float8=true", "train.log_every=1", "checkpoint.every_steps=2"]
    run_train(tmp_path / "straight", *common, "train.steps=3", nproc=2)
    run_train(tmp_path / "resumed", *common, "train.steps=2", nproc=2)
    run_train(tmp_path / "resumed", *common, "train.steps=3", nproc=2)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert all(torch.isfinite(torch.tensor([loss for _, loss in losses(tmp_path / "straight")])))
    keys = (
        FileSystemReader(tmp_path / "straight/checkpoints/step-00000003").read_metadata().state_dict_metadata
    )
    assert "model.backbone.blocks.0.mlp.fc1.weight" in keys


def test_profiler_writes_a_chrome_trace_per_rank(tmp_path):
    run_train(tmp_path, *TINY, "train.steps=4", "profile.enabled=true", "profile.every=3", "profile.warmup=1",
              "profile.active=1", nproc=2)  # fmt: skip
    traces = sorted(
        p.relative_to(tmp_path / "profile").as_posix() for p in (tmp_path / "profile").rglob("*.json")
    )
    assert traces == ["step-00000003/rank-00000.json", "step-00000003/rank-00001.json"]
    trace = (tmp_path / "profile" / traces[0]).read_text()
    assert "ProfilerStep" in trace and "c10d::" in trace  # a real step, collectives included
