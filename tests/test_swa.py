"""The SWA target option: off by default; on 2 gloo ranks the averaged weights are the running mean
of the model's weights after each step; a resumed run continues with the same average."""

import torch

from lejepa_scale.config import load_config
from lejepa_scale.distributed.parallel import full_state_dict
from lejepa_scale.distributed.process_groups import init_distributed
from lejepa_scale.training.build import (
    build_loss,
    build_optimizer,
    build_parallel_model,
    build_scheduler,
    build_swa,
)
from lejepa_scale.training.step import train_step
from tests.distributed import run_ranks
from tests.helpers import DEMO, TINY, TINY_VIT, losses, run_train

SMALL = ["run.dir=unused", TINY_VIT, "train.precision=fp32", "loss.num_slices=64", "optim.lr=1e-3"]


def averaging_worker(rank, world_size):
    cfg = load_config(DEMO, [*SMALL, "model.swa_target=true"])
    env = init_distributed("cpu")
    model = build_parallel_model(cfg, env)
    optimizer, loss_fn = build_optimizer(model, cfg), build_loss(cfg)
    scheduler, swa = build_scheduler(optimizer, cfg), build_swa(cfg, env, model)
    gen = torch.Generator().manual_seed(rank)
    after_each_step = []
    for step in range(3):
        views = [torch.randn(2, 4, 3, 24, 24, generator=gen), torch.randn(4, 4, 3, 12, 12, generator=gen)]
        train_step(model, loss_fn, optimizer, scheduler, views, step, torch.autocast("cpu", enabled=False),
                   target=swa)  # fmt: skip
        after_each_step.append(full_state_dict(model))
    return after_each_step, full_state_dict(swa.average), swa.count


def test_swa_is_off_by_default_and_averages_the_weights_of_every_step():
    assert build_swa(load_config(DEMO, SMALL), None, None) is None
    snapshots, average, count = run_ranks(averaging_worker, 2)[0]
    assert count == 3
    for name, value in average.items():
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics are the average model's own
        by_hand = sum(snapshot[name] for snapshot in snapshots) / 3
        torch.testing.assert_close(value, by_hand, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(average["backbone.cls_token"], snapshots[-1]["backbone.cls_token"])


def test_a_resumed_run_keeps_its_average(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    common = [
        *TINY,
        "model.swa_target=true",
        "model.swa_start=1",
        "train.log_every=1",
        "checkpoint.every_steps=2",
    ]
    run_train(tmp_path / "straight", *common, "train.steps=4", nproc=2)
    run_train(tmp_path / "resumed", *common, "train.steps=2", nproc=2)
    run_train(tmp_path / "resumed", *common, "train.steps=4", nproc=2)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # the centres come from the average
    keys = (
        FileSystemReader(tmp_path / "straight/checkpoints/step-00000004").read_metadata().state_dict_metadata
    )
    assert "swa.count" in keys and "swa.model.backbone.blocks.0.attn.qkv.weight" in keys
