"""Weighted mixtures of data sources in the world-size-free order: each global batch draws from the
sources in proportion, deterministically, and a resume (at any world size) continues exactly."""

from __future__ import annotations

import torch

from data_pipeline.builtin import load_digits
from data_pipeline.indexed import IndexedViews, MemorySource
from data_pipeline.views import CropSpec, Photometric
from tests.helpers import TINY, metrics, run_train
from tests.image_tree import class_tree_and_shards

CROPS = [CropSpec(2, 16, (0.3, 1.0))]


def mixture(rank: int = 0, world_size: int = 1, global_batch: int = 100) -> IndexedViews:
    digits = load_digits()
    a = MemorySource("a", digits.train_images[:600], digits.train_labels[:600])
    b = MemorySource("b", digits.train_images[600:], digits.train_labels[600:])
    return IndexedViews([a, b], weights=[0.7, 0.3], global_batch=global_batch,
                        micro_batch=global_batch // world_size, crops=CROPS, photometric=Photometric(),
                        rank=rank, world_size=world_size)  # fmt: skip


def keys(loader: IndexedViews, steps: int) -> list[list[str]]:
    batches = iter(loader)
    return [next(batches).keys for _ in range(steps)]


def test_a_70_30_mixture_draws_in_proportion_and_resumes_exactly_at_another_world_size():
    loader = mixture()
    uninterrupted = keys(loader, 20)  # 2,000 samples
    drawn = [key.split("/")[0] for step in uninterrupted for key in step]
    assert abs(drawn.count("a") / 2000 - 0.7) <= 0.02 and abs(drawn.count("b") / 2000 - 0.3) <= 0.02
    assert all(abs(sum(key.startswith("a/") for key in step) - 70) <= 1 for step in uninterrupted)
    assert loader.counters() == {"corrupt_samples": 0, "samples/a": 1400, "samples/b": 600}
    first = mixture()
    half = keys(first, 10)
    state = first.state_dict()
    resumed = []
    for rank in range(2):  # the second half on 2 ranks: each takes half of every global batch
        loader = mixture(rank, 2)
        loader.load_from_other_world(state, 1, 10)
        resumed.append(keys(loader, 10))
    assert half == uninterrupted[:10]
    assert [sorted(a + b) for a, b in zip(*resumed, strict=True)] == [sorted(s) for s in uninterrupted[10:]]


def test_training_on_a_mixture_of_shards_and_a_built_in_set_logs_what_each_gave(tmp_path):
    shards = class_tree_and_shards(tmp_path / "data", classes=2, per_class=8, shard_size=8)[1]
    mix = f"data.mixture=[{{train: {shards}, weight: 0.75, name: photos}}, {{train: digits, weight: 0.25}}]"
    run_train(tmp_path / "run", *TINY, mix, "train.steps=4", "train.log_every=1", "data.num_workers=0")
    last = metrics(tmp_path / "run")[-1]
    assert (last["samples/photos"], last["samples/digits"]) == (48, 16)  # 4 steps of 16
    assert "probe_acc" not in last  # the sources' labels mean different things
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)
