"""How long the shard stream stalls at an epoch boundary: the wait for the first batch of an epoch
after the last batch of the previous one, next to the median wait between two batches.

PYTHONPATH=. python benchmarks/epoch_boundary.py [--images 480] [--epochs 3]

Real JPEGs (crops of scikit-learn's sample photos, 320-640 px) in shards of 60, one rank, 2
DataLoader workers, batch 16, the default views (2 x 224 + 6 x 96) and shuffle buffer (1000), on
CPU. The consumer takes each batch and asks for the next at once (a training step would give the
workers time to prefetch, which hides some of the stall). Run from an older checkout with this file
copied in to compare versions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from data_pipeline import convert
from data_pipeline.shards import resolve_shards
from data_pipeline.stream import ShardViews
from data_pipeline.views import CropSpec
from tests.image_tree import jpeg_bytes, photo_crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "class0"
        src.mkdir(parents=True)
        for i, image in enumerate(photo_crops(args.images, seed=0, size_range=(320, 640))):
            (src / f"{i:05d}.jpg").write_bytes(jpeg_bytes(image))
        convert.main(["folder", "--src", str(src.parent), "--out", f"{tmp}/shards", "--shard-size", "60",
                      "--workers", "1"])  # fmt: skip
        views = ShardViews(
            resolve_shards(f"{tmp}/shards"),
            batch_size=16,
            crops=[CropSpec(2, 224, (0.3, 1.0)), CropSpec(6, 96, (0.05, 0.3))],
            num_workers=2,
        )
        steps = views.steps_per_epoch
        batches = iter(views)
        waits = []
        for _ in range(args.epochs * steps):
            start = time.perf_counter()
            next(batches)
            waits.append(time.perf_counter() - start)
    boundaries = [waits[e * steps] for e in range(1, args.epochs)]
    inside = [w for i, w in enumerate(waits) if i % steps and i > steps]
    print(f"{steps} batches per epoch; first batch of the run: {waits[0]:.2f} s")
    print("| epoch boundary wait (median) | wait between batches inside an epoch (median) |")
    print("|---|---|")
    print(f"| {statistics.median(boundaries):.3f} s | {statistics.median(inside):.3f} s |")


if __name__ == "__main__":
    main()
