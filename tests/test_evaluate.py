"""Frozen-feature evaluation: pretrained beats random init, k-NN against a brute-force reference,
folders vs shards, few-shot, and extraction split over real gloo ranks."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.views import normalize
from lejepa_scale import evaluate
from lejepa_scale.evaluation.features import extract, feature_fn
from lejepa_scale.evaluation.probes import few_shot, knn_classify
from lejepa_scale.pretrained import load_run
from tests.helpers import ENV, TINY, run_train
from tests.image_tree import class_tree_and_shards


def train(run_dir, *overrides):
    run_train(run_dir, "checkpoint.every_steps=0", *overrides)


def run_evaluate(*args):
    evaluate.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step run of a 0.4M-parameter ViT: a checkpoint to evaluate quickly."""
    run_dir = tmp_path_factory.mktemp("tiny")
    train(run_dir, "train.steps=4", *TINY)
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real JPEGs in class folders (3 classes x 8), and the same images converted to shards."""
    root = tmp_path_factory.mktemp("images")
    class_tree_and_shards(root, classes=3, per_class=8, shard_size=5)
    return root


def test_pretrained_features_beat_random_init_on_fashion_mnist(tmp_path):
    """The demo's model after 100 steps of LeJEPA vs the same architecture untrained: linear probe
    (20 epochs) and k-NN on 2000 training and 2000 test images."""
    train(tmp_path, "train.steps=100", "train.batch_size=64", "optim.warmup_steps=10", "loss.num_slices=256")
    common = ["--train", "fashion_mnist", "--val", "fashion_mnist", "--max-train", 2000, "--max-val", 2000,
              "--epochs", 20]  # fmt: skip
    run_evaluate("--checkpoint", tmp_path, *common)
    run_evaluate("--checkpoint", tmp_path, *common, "--random-init")
    pretrained = json.loads((tmp_path / "eval.json").read_text())
    random_init = json.loads((tmp_path / "eval_random_init.json").read_text())
    assert pretrained["weights"] == "pretrained" and random_init["weights"] == "random_init"
    assert pretrained["val_images"] == 2000
    for probe in ("linear", "knn"):
        assert pretrained[probe]["top1"] > random_init[probe]["top1"] + 0.03, (pretrained, random_init)


def test_the_default_protocol_is_the_official_one_and_cls_keeps_the_plain_probe(tiny_run, images, tmp_path):
    """Default: CLS of the last two layers, LayerNorm + Linear, AdamW wd 1e-6, warm-up then cosine.
    `--feature cls --warmup-epochs 0` is the plain probe on the last layer's CLS, number for number."""
    from data_pipeline.labelled import labelled_images
    from lejepa_scale.evaluation.probes import linear_probe

    data = images / "folder"
    common = ["--checkpoint", tiny_run, "--train", data, "--val", data, "--probe", "linear"]
    run_evaluate(*common, "--epochs", 20, "--out", tmp_path / "default.json")
    default = json.loads((tmp_path / "default.json").read_text())
    assert default["feature"] == "cls2"
    protocol = {"head": "LayerNorm + Linear", "optimizer": "AdamW", "lr": 1e-2, "weight_decay": 1e-6,
                "epochs": 20, "warmup_epochs": 2, "schedule": "linear warm-up, cosine"}  # fmt: skip
    assert default["probe"] == protocol  # warm-up: a tenth of the epochs
    run_evaluate(
        *common, "--epochs", 5, "--feature", "cls", "--warmup-epochs", 0, "--out", tmp_path / "cls.json"
    )
    model, cfg, _ = load_run(tiny_run)
    encode, _ = feature_fn(model.backbone, "cls")
    (x, y), = list(labelled_images(str(data), "train", cfg.views.global_size))  # fmt: skip
    prepare = lambda images: normalize(images, cfg.views.mean, cfg.views.std)  # noqa: E731
    feats = extract(encode, [(x, y)], torch.device("cpu"), prepare)[0]
    plain = linear_probe(feats, y, feats, y, epochs=5, lr=1e-2, batch_size=256)
    assert json.loads((tmp_path / "cls.json").read_text())["linear"]["top1"] == plain.top1


def test_a_cnn_says_its_feature_is_the_mean(tmp_path):
    from lejepa_scale.method.model import create_backbone

    encode, name = feature_fn(create_backbone("resnet10t", img_size=32).eval(), "cls")
    assert name == "mean (no CLS token)" and encode(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_knn_matches_a_brute_force_numpy_reference():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(200, 12)), rng.normal(size=(57, 12))
    train_y, test_y = rng.integers(0, 7, 200), rng.integers(0, 7, 57)
    k, temperature = 20, 0.07
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    top1 = top5 = 0
    for x, y in zip(unit(test_x), test_y, strict=True):
        sims = unit(train_x) @ x
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(7)
        for i in nearest:
            votes[train_y[i]] += np.exp(sims[i] / temperature)
        ranked = np.argsort(-votes)[:5]
        top1 += ranked[0] == y
        top5 += y in ranked
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    result = knn_classify(t(train_x).float(), t(train_y), t(test_x).float(), t(test_y), chunk=10)
    assert result.top1 == pytest.approx(top1 / 57) and result.top5 == pytest.approx(top5 / 57)


def test_folders_and_shards_give_the_same_features(tiny_run, images, tmp_path):
    results = {}
    for source in ("folder", "shards"):
        out = tmp_path / f"{source}.json"
        data = images / source
        run_evaluate("--checkpoint", tiny_run, "--train", data, "--val", data, "--probe", "knn", "--out", out)
        results[source] = json.loads(out.read_text())
    assert results["folder"]["train_images"] == results["shards"]["train_images"] == 24
    assert results["folder"]["knn"] == results["shards"]["knn"]  # same images, same crops, same features


def test_feature_kinds_and_few_shot(tiny_run, images, tmp_path):
    data = images / "folder"
    for feature, dim in (("cls", 64), ("cls2", 128), ("mean", 64)):
        backbone = load_run(tiny_run)[0].backbone
        encode, name = feature_fn(backbone, feature)
        assert encode(torch.randn(2, 3, 24, 24)).shape == (2, dim) and name == feature
    out = tmp_path / "few.json"
    run_evaluate("--checkpoint", tiny_run, "--train", data, "--val", data, "--shots", 2, "--feature", "cls2",
                 "--epochs", 5, "--out", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["train_images"] == 6 and result["shots"] == 2 and result["feature"] == "cls2"
    feats, labels = few_shot(torch.arange(30.0)[:, None], torch.arange(30) % 3, shots=4)
    assert torch.bincount(labels).tolist() == [4, 4, 4] and (feats[:, 0].long() % 3 == labels).all()


def test_extraction_split_over_two_ranks_matches_one_process(tiny_run, images, tmp_path):
    data = images / "shards"
    args = ["--checkpoint", tiny_run, "--train", data, "--val", data, "--probe", "knn"]
    run_evaluate(*args, "--out", tmp_path / "one.json")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lejepa_scale.evaluate",
    ]
    command = [*torchrun, *map(str, args), "--out", str(tmp_path / "two.json")]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["train_images"] == one["train_images"] == 24
    assert two["knn"] == one["knn"]
