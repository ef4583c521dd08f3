"""The converter on real JPEG trees with every kind of bad input; manifest, verify, resume, zstd."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline import convert
from data_pipeline.shards import iter_samples
from tests.image_tree import BAD_FILES, add_bad_files, convert_plain_and_zstd, make_class_tree, photo_crops


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_class_tree(root / "train", classes=4, per_class=6)
    add_bad_files(root / "train" / "n00001001", tmp_path_factory.mktemp("elsewhere"))
    return root


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar*"))}


def test_imagenet_train_with_bad_inputs(imagenet, tmp_path):
    assert (
        convert.main(
            [
                "imagenet",
                "--src",
                str(imagenet),
                "--out",
                str(tmp_path),
                "--shard-size",
                "7",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "manifest-train.json").read_text())
    wnids = [f"n{1000 + c:08d}" for c in range(4)]
    assert json.loads((tmp_path / "classes.json").read_text()) == wnids == manifest["classes"]
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    reencoded = {Path(s["path"]).name: s["reason"] for s in manifest["reencoded"]}
    assert set(skipped) == {n for n, what in BAD_FILES.items() if what == "skip"}
    assert set(reencoded) == {n for n, what in BAD_FILES.items() if what == "reencode"}
    assert skipped["dangling.JPEG"] == "dangling symlink" and skipped["empty.JPEG"] == "zero-byte file"
    ignored = manifest["ignored"]
    assert ignored["count"] == 1 and ignored["paths"][0].endswith("n00001001/notes.txt")
    # 24 good + 3 re-encoded + 1 symlink to a file outside the tree
    assert manifest["num_samples"] == 28 == sum(s["count"] for s in manifest["shards"])
    assert manifest["class_counts"] == {wnids[0]: 6, wnids[1]: 10, wnids[2]: 6, wnids[3]: 6}
    labels_seen = []
    for shard in manifest["shards"]:
        samples = list(iter_samples(tmp_path / shard["name"]))
        assert len(samples) == shard["count"] <= 7
        for sample in samples:
            meta = json.loads(sample["json"])
            assert wnids[int(sample["cls"])] == meta["class"] == Path(meta["src"]).parent.name
            image = Image.open(__import__("io").BytesIO(sample["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            labels_seen.append(int(sample["cls"]))
    first_shard = [int(s["cls"]) for s in iter_samples(tmp_path / manifest["shards"][0]["name"])]
    assert len(set(first_shard)) > 1  # the global shuffle mixes classes within a shard
    assert convert.verify(tmp_path) == []


def test_val_flat_layout_with_solution_csv(imagenet, tmp_path):
    val = imagenet / "val"
    val.mkdir(exist_ok=True)
    rows = []
    for i, image in enumerate(photo_crops(5, seed=7)):
        name = f"ILSVRC2012_val_{i:08d}"
        image.save(val / f"{name}.JPEG", quality=90)
        rows.append({"ImageId": name, "PredictionString": f"n{1000 + i % 4:08d} 1 2 3 4"})
    with open(imagenet / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    assert (
        convert.main(
            ["imagenet", "--src", str(imagenet), "--out", str(tmp_path), "--split", "val", "--workers", "1"]
        )
        == 0
    )
    samples = list(iter_samples(tmp_path / "val-000000.tar"))
    by_name = {Path(json.loads(s["json"])["src"]).stem: int(s["cls"]) for s in samples}
    assert by_name == {f"ILSVRC2012_val_{i:08d}": i % 4 for i in range(5)}


def test_verify_catches_a_flipped_byte(tmp_path):
    make_class_tree(tmp_path / "src", classes=2, per_class=5)
    convert.main(
        [
            "folder",
            "--src",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--shard-size",
            "4",
        ]
    )
    assert convert.verify(tmp_path / "out") == []
    shard = tmp_path / "out" / "data-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = convert.verify(tmp_path / "out")
    assert any("data-000001.tar" in p and "sha256" in p for p in problems)
    assert convert.main(["verify", "--out", str(tmp_path / "out")]) == 1


def test_killed_conversion_reruns_to_identical_shards(tmp_path):
    make_class_tree(tmp_path / "src", classes=3, per_class=40, seed=3)
    # 60 shards, every image re-encoded smaller: the conversion takes long enough to be killed midway
    args = ["folder", "--src", str(tmp_path / "src"), "--workers", "1", "--shard-size", "2"]
    args += ["--max-side", "32"]
    convert.main([*args, "--out", str(tmp_path / "clean")])
    cmd = [sys.executable, "-m", "data_pipeline.convert", *args, "--out", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("data-*.json")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((tmp_path / "killed").glob("data-*.json")))
    assert 0 < finished < 60 and not (tmp_path / "killed" / "manifest-data.json").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert not list((tmp_path / "killed").glob("*.tmp"))
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "killed" / "manifest-data.json").read_text()) == json.loads(
        (tmp_path / "clean" / "manifest-data.json").read_text()
    )


def test_zstd_round_trip(tmp_path):
    plain_dir, zstd_dir = convert_plain_and_zstd(tmp_path)
    manifest = json.loads((zstd_dir / "manifest-data.json").read_text())
    assert manifest["compression"] == "zstd" and all(
        s["name"].endswith(".tar.zst") for s in manifest["shards"]
    )
    for plain, packed in zip(
        sorted(plain_dir.glob("*.tar")), sorted(zstd_dir.glob("*.tar.zst")), strict=True
    ):
        a, b = list(iter_samples(plain)), list(iter_samples(packed))
        assert [(s["__key__"], s["jpg"], s["cls"]) for s in a] == [
            (s["__key__"], s["jpg"], s["cls"]) for s in b
        ]
    assert convert.verify(zstd_dir) == []


def test_slurm_array_tasks_split_the_shards(tmp_path, monkeypatch):
    make_class_tree(tmp_path / "src", classes=2, per_class=9)
    args = ["folder", "--src", str(tmp_path / "src"), "--workers", "1", "--shard-size", "4"]
    convert.main([*args, "--out", str(tmp_path / "single")])
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    convert.main([*args, "--out", str(tmp_path / "array")])
    assert sorted(p.name for p in (tmp_path / "array").glob("*.tar")) == [
        "data-000001.tar",
        "data-000003.tar",
    ]
    assert not (tmp_path / "array" / "manifest-data.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    convert.main([*args, "--out", str(tmp_path / "array")])
    assert shard_bytes(tmp_path / "array") == shard_bytes(tmp_path / "single")
    assert (tmp_path / "array" / "manifest-data.json").exists()


def test_tree_without_classes_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit, match="no class subfolders"):
        convert.main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
