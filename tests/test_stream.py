"""The shard stream: exactly-once coverage over ranks x workers, resume position, corrupt data, zstd."""

import json

import pytest
import torch
import webdataset as wds

from data_pipeline import convert
from data_pipeline.shards import Shard, resolve_shards
from data_pipeline.stream import ShardViews, plan_epoch
from data_pipeline.views import CropSpec
from tests.image_tree import convert_plain_and_zstd, jpeg_bytes, make_class_tree, photo_crops

SPECS = [CropSpec(2, 24, (0.3, 1.0)), CropSpec(2, 12, (0.05, 0.3))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """47 samples in shards of 5 (the last has 2): shards do not divide evenly over ranks."""
    root = tmp_path_factory.mktemp("stream")
    make_class_tree(root / "src", classes=5, per_class=9, seed=1)
    make_class_tree(root / "src", classes=1, per_class=2, seed=2, first_index=100)  # 2 more in class 0
    convert.main(
        [
            "folder",
            "--src",
            str(root / "src"),
            "--out",
            str(root / "out"),
            "--workers",
            "1",
            "--shard-size",
            "5",
        ]
    )
    return resolve_shards(str(root / "out"))


def epoch_keys(shards, rank, world_size, num_workers, batch_size=4, epoch_batches=None):
    views = ShardViews(
        shards,
        batch_size=batch_size,
        crops=SPECS,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=6,
    )
    it = iter(views)
    batches = [next(it) for _ in range(epoch_batches or views.steps_per_epoch)]
    return views, batches


def test_exactly_once_over_two_ranks_and_two_workers(shards):
    total = sum(s.count for s in shards)
    assert total == 47
    keys_per_rank, steps = [], set()
    for rank in range(2):
        views, batches = epoch_keys(shards, rank, 2, num_workers=2)
        steps.add(views.steps_per_epoch)
        assert all(
            b.views[0].shape == (2, 4, 3, 24, 24) and b.views[1].shape == (2, 4, 3, 12, 12) for b in batches
        )
        assert all(b.views[0].dtype == torch.uint8 for b in batches)
        keys_per_rank.append([k for b in batches for k in b.keys])
    assert steps == {47 // (2 * 4)}  # every rank takes the same number of steps
    all_keys = keys_per_rank[0] + keys_per_rank[1]
    assert len(all_keys) == len(set(all_keys)) == 5 * 2 * 4  # no sample twice
    assert total - len(all_keys) < 2 * 4  # only the tail that cannot fill a batch on every rank is left out


def test_exactly_once_in_each_of_three_epochs_with_workers_that_persist(shards):
    """One iterator (one DataLoader, its 2 workers living on) per rank over 3 epochs, world 2."""
    per_epoch = [[] for _ in range(3)]
    for rank in range(2):
        views, batches = epoch_keys(shards, rank, 2, num_workers=2, epoch_batches=3 * 5)
        assert views.steps_per_epoch == 5 and views.state_dict()["epoch"] == 3
        for epoch in range(3):
            per_epoch[epoch] += [k for b in batches[5 * epoch : 5 * (epoch + 1)] for k in b.keys]
    for keys in per_epoch:
        assert len(keys) == len(set(keys)) == 40  # every sample at most once, 2 ranks x 5 x 4
    assert per_epoch[0] != per_epoch[1]  # reshuffled


def test_left_out_tail_changes_between_epochs(shards):
    views = ShardViews(shards, batch_size=4, crops=SPECS, rank=0, world_size=2, num_workers=0)
    it = iter(views)
    epochs = [{k for _ in range(views.steps_per_epoch) for k in next(it).keys} for _ in range(2)]
    assert epochs[0] != epochs[1]
    assert plan_epoch(shards, 3, 0, 4, 2).shards == plan_epoch(shards, 3, 0, 4, 2).shards
    assert plan_epoch(shards, 3, 0, 4, 2).shards != plan_epoch(shards, 4, 0, 4, 2).shards


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_exactly_the_next_samples(shards, num_workers):
    _, uninterrupted = epoch_keys(shards, 1, 2, num_workers, epoch_batches=8)  # crosses an epoch boundary
    first = ShardViews(
        shards, batch_size=4, crops=SPECS, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=6
    )
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = ShardViews(
        shards, batch_size=4, crops=SPECS, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=6
    )
    resumed.load_state_dict(state)
    it = iter(resumed)
    for expected in uninterrupted[3:]:
        got = next(it)
        assert got.keys == expected.keys
        assert all(torch.equal(a, b) for a, b in zip(got.views, expected.views, strict=True))
        assert torch.equal(got.labels, expected.labels)


def test_resume_at_another_world_size_is_refused(shards):
    views = ShardViews(shards, batch_size=4, crops=SPECS, world_size=2)
    with pytest.raises(ValueError, match="world size"):
        views.load_state_dict({"epoch": 0, "batch": 1, "world_size": 1, "num_workers": 0})


def write_shard(path, payloads):
    with wds.TarWriter(str(path), mtime=0) as tar:
        for i, jpg in enumerate(payloads):
            tar.write({"__key__": f"{path.stem}-{i:03d}", "jpg": jpg, "cls": "0"})


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(tmp_path):
    good = [jpeg_bytes(im) for im in photo_crops(24, seed=5)]
    write_shard(tmp_path / "a.tar", good[:8])
    write_shard(tmp_path / "b.tar", good[8:12] + [b"\xff\xd8 not really a jpeg", b""] + good[12:14])
    write_shard(tmp_path / "c.tar", good[14:24])
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 2])  # cut mid-shard
    shards = [Shard(str(tmp_path / n), c) for n, c in (("a.tar", 8), ("b.tar", 8), ("c.tar", 10))]
    views = ShardViews(shards, batch_size=4, crops=SPECS, num_workers=0, shuffle_buffer=1)
    it = iter(views)
    batches = [next(it) for _ in range(views.steps_per_epoch)]
    assert views.steps_per_epoch == 26 // 4 and all(len(b.keys) == 4 for b in batches)
    keys = [k for b in batches for k in b.keys]
    read = [k for k in keys if not k.endswith("#repeat")]
    assert len(read) == len(set(read))
    assert not any(k in read for k in ("b-004", "b-005"))  # the two bad payloads
    assert sum(1 for k in read if k.startswith("c-")) < 10  # the truncated shard lost samples
    assert views.corrupt_total == sum(b.corrupt for b in batches) == len(keys) - len(read) >= 3


def test_zstd_shards_stream_like_plain_ones(tmp_path):
    plain_dir, zstd_dir = convert_plain_and_zstd(tmp_path)
    a, b = (epoch_keys(resolve_shards(str(d)), 0, 1, 0)[1] for d in (plain_dir, zstd_dir))
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.views[0], y.views[0]) for x, y in zip(a, b, strict=True))


def test_brace_pattern_without_manifest(shards, tmp_path):
    folder = shards[0].path.rsplit("/", 1)[0]
    found = resolve_shards(f"{folder}/data-{{000000..000009}}.tar")
    assert [s.count for s in found] == [s.count for s in sorted(shards, key=lambda s: s.path)]
    with pytest.raises(FileNotFoundError, match="data-000010.tar"):
        resolve_shards(f"{folder}/data-{{000000..000010}}.tar")
