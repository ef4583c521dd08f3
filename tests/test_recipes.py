"""The small-data recipes (the paper's Table 5: CIFAR-100, Flowers102, Galaxy10) load shards made by
`python -m data_pipeline.convert folder` and train their stated architecture for 50 steps on CPU."""

import subprocess
import sys

import pytest

from tests.helpers import ENV, ROOT, metrics
from tests.image_tree import class_tree_and_shards

SMOKE = [
    "train.steps=50",
    "train.batch_size=8",
    "train.precision=fp32",
    "train.log_every=10",
    "data.val=null",
    "data.num_workers=0",
    "views.global_size=32",
    "views.local_size=16",
    "loss.num_slices=64",
    "optim.warmup_steps=5",
    "checkpoint.every_steps=0",
    "model.proj_hidden_dim=256",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    _, shards = class_tree_and_shards(
        tmp_path_factory.mktemp("small_data"), classes=3, per_class=6, shard_size=6
    )
    return shards


@pytest.mark.parametrize("recipe", ["cifar100_resnet18", "flowers102_resnet18", "galaxy10_resnet34"])
def test_small_data_recipe_trains_50_steps_from_converted_shards(recipe, shards, tmp_path):
    config = ROOT / "configs" / f"{recipe}.yaml"
    command = [sys.executable, "-m", "lejepa_scale.train", "--config", str(config), f"run.dir={tmp_path}",
               f"data.train={shards}", *SMOKE]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 49]
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    assert recipe.split("_")[1] in result.stderr  # the stated architecture, e.g. resnet18
