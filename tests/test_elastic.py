"""The same sample stream and trajectory at any world size, and exact gradient accumulation, on real
gloo ranks: a run's global batch and sample order do not depend on how many ranks train it, so a
resume on another number of ranks continues it (to float rounding), and K micro-batches of b are
one step on a batch of K·b."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_VIT, losses, run_train, sample_sets, weights
from tests.image_tree import class_tree_and_shards

EXACT = [TINY_VIT, "loss.num_slices=64", "train.precision=fp32", "train.log_every=1", "log.sample_keys=true"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """80 real JPEGs in 5 shards of 16: 8 steps of 16 cross an epoch boundary."""
    root = tmp_path_factory.mktemp("elastic")
    return class_tree_and_shards(root, classes=4, per_class=20, shard_size=16)[1]


def crashed_after(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of a finished run as it was when it died right after checkpoint `step`."""
    shutil.copytree(run_dir, copy)
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    (copy / "model.pt").unlink()
    return copy


def test_a_run_resumed_on_another_world_size_continues_its_sample_stream(tmp_path, shards):
    """2 ranks x 8 steps of a global batch of 16 over shards, checkpoint at step 4, resumed on 1 rank
    (2 micro-batches of 8) and on 4 ranks (4 each): every step trains on the same samples and gives
    the same loss; 3 ranks cannot split 16 and are refused with the sizes that can."""
    common = [*EXACT, "data.source=shards", f"data.train={shards}", "data.num_workers=2", "train.steps=8",
              "train.global_batch_size=16", "train.batch_size=8", "checkpoint.every_steps=4"]  # fmt: skip
    run_train(tmp_path / "two", *common, nproc=2)
    reference, reference_losses = sample_sets(tmp_path / "two"), dict(losses(tmp_path / "two"))
    assert sorted(reference) == list(range(8)) and all(len(keys) == 16 for keys in reference.values())
    for world in (1, 4):
        resumed = crashed_after(tmp_path / "two", tmp_path / f"on{world}", 4)
        result = run_train(resumed, *common, nproc=world)
        assert "samples consumed) continues on" in result.stderr
        assert sample_sets(resumed) == reference
        for step, loss in losses(resumed):
            assert abs(loss - reference_losses[step]) <= 1e-4 * abs(reference_losses[step]), (world, step)
    refused = run_train(crashed_after(tmp_path / "two", tmp_path / "on3", 4), *common, nproc=3, check=False)
    assert refused.returncode != 0
    lines = {line for line in refused.stderr.splitlines() if line.startswith("error:")}
    assert lines == {
        "error: train.global_batch_size=16 does not split over 3 ranks: the world sizes that divide it are "
        "1, 2, 4, 8, 16"
    }


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> bool:
    return all((a[k] - b[k]).abs().max() <= tolerance for k in a if a[k].is_floating_point())


def test_two_micro_batches_of_8_are_one_batch_of_16(tmp_path, shards):
    """In memory on 1 rank (interrupted after step 2 and resumed) and over shards on 2 ranks: loss and
    weights of K=2 x 8 equal one batch of 16 after 4 AdamW steps (SIGReg's statistic, the
    projector's BatchNorm, the prediction term and the online probe all over the 16)."""
    common = [*EXACT, "train.steps=4", "checkpoint.every_steps=2", "optim.lr=1e-4", "optim.eps=1e-6"]
    on_shards = ["data.source=shards", f"data.train={shards}", "data.num_workers=0"]
    for name, nproc, extra in (("memory", 1, []), ("shards", 2, on_shards)):
        run_train(tmp_path / f"{name}-16", *common, *extra, "train.batch_size=16", nproc=nproc)
        accumulated = tmp_path / f"{name}-2x8"
        run_train(accumulated, *common, *extra, "train.batch_size=8", "train.grad_accum_steps=2", nproc=nproc)
        if name == "memory":  # the same run, died after checkpoint 2 and resumed
            accumulated = crashed_after(accumulated, tmp_path / "memory-resumed", 2)
            run_train(accumulated, *common, *extra, "train.batch_size=8", "train.grad_accum_steps=2")
        one, two = dict(losses(tmp_path / f"{name}-16")), dict(losses(accumulated))
        assert one.keys() == two.keys() == {0, 1, 2, 3}
        assert all(abs(one[s] - two[s]) <= 1e-5 * abs(one[s]) for s in one), (name, one, two)
        assert close(weights(tmp_path / f"{name}-16"), weights(accumulated), 1e-5), name
        assert sample_sets(tmp_path / f"{name}-16") == sample_sets(accumulated)


def test_a_checkpoint_of_either_data_order_resumes_in_the_other(tmp_path, shards):
    """A run that changes `data.order` between restarts (or a checkpoint written before local shards
    were read by index) starts its epoch again in the new order, says so, and trains on: the first
    step after the resume takes the new order's first samples of that epoch."""
    common = [*EXACT, "data.source=shards", f"data.train={shards}", "data.num_workers=0", "train.steps=4",
              "train.batch_size=16", "checkpoint.every_steps=2"]  # fmt: skip
    for order in ("stream", "indexed"):
        run_train(tmp_path / order, *common, f"data.order={order}")
    for saved, resumed_in, says in (
        ("stream", "indexed", "is of a rank-split order: epoch 0 starts again from its first sample"),
        ("indexed", "stream", "is of the indexed order: epoch 0 starts again from its first batch"),
    ):
        resumed = crashed_after(tmp_path / saved, tmp_path / f"{saved}-then-{resumed_in}", 2)
        result = run_train(resumed, *common, f"data.order={resumed_in}")
        assert says in result.stderr
        assert sample_sets(resumed)[2] == sample_sets(tmp_path / resumed_in)[0]
