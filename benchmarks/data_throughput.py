"""Data path throughput, all in one run: multi-crop samples/s per core (reference vs fast path), the
batched photometric stage per batch, converter images/s per core, end-to-end loader samples/s.

python benchmarks/data_throughput.py [--images 240] [--workdir /tmp/lejepa_data_bench]
python benchmarks/data_throughput.py --loader SHARDS --workers 14 [--batch 32] [--batches 40]
    (one loader alone, as benchmarks/gpu_check.py measures it: prints THROUGHPUT {json})

Images are 500x375 q90 JPEG crops of the photos scikit-learn ships (about 60 KB each). Per-core
numbers are CPU time of one thread (time.thread_time) with torch.set_num_threads(1), so other load
on the machine does not count against them; each is the median of 3 passes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline import convert  # noqa: E402
from data_pipeline.indexed import IndexedViews, ShardSource  # noqa: E402
from data_pipeline.shards import resolve_shards  # noqa: E402
from data_pipeline.stream import ShardViews  # noqa: E402
from data_pipeline.views import CropSpec, Photometric, blur_kernel_size, decode_crops  # noqa: E402

SPECS = [CropSpec(2, 224, (0.3, 1.0)), CropSpec(6, 96, (0.05, 0.3))]


def make_jpegs(folder: Path, n: int) -> list[Path]:
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        image = photo.resize(size, Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        path = folder / f"n{i % 10:08d}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


def reference_pipeline():
    """The paper's minimal example: PIL decode, then torchvision v2 per view on PIL images."""

    def view(size, scale):
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
                v2.RandomSolarize(threshold=128, p=0.2),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            ]
        )

    views = [view(s.size, s.scale) for s in SPECS for _ in range(s.count)]

    def run(jpeg: bytes):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        return [t(image) for t in views]

    return run


def kornia_stage_ms(views: list[torch.Tensor]) -> float:
    """The same photometric stack with kornia's augmentation module (the well-kept alternative)."""
    import kornia.augmentation as K

    def stack(size):
        k = blur_kernel_size(size)
        return K.AugmentationSequential(
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2),
            K.Normalize(mean=torch.tensor((0.485, 0.456, 0.406)), std=torch.tensor((0.229, 0.224, 0.225))),
        ).to(views[0].device)

    stacks = [stack(v.shape[-1]) for v in views]

    def run():
        for v, aug in zip(views, stacks, strict=True):
            aug(v.flatten(0, 1).float().div(255))
        if views[0].is_cuda:
            torch.cuda.synchronize()

    return median_ms(run)


def median_ms(fn, repeats: int = 3) -> float:
    """Median wall time of `fn` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def per_core_rate(fn, payloads: list[bytes], passes: int = 3) -> float:
    rates = []
    for _ in range(passes):
        start = time.thread_time()
        for p in payloads:
            fn(p)
        rates.append(len(payloads) / (time.thread_time() - start))
    return statistics.median(rates)


def make_shards(folder: Path, images: int, shard_size: int = 256) -> Path:
    """`images` 500x375 JPEGs converted to shards under folder/shards; returns that folder."""
    make_jpegs(folder / "src", images)
    convert.convert(convert.list_class_folders(folder / "src"), folder / "shards", prefix="bench",
                    shard_size=shard_size, workers=1)  # fmt: skip
    return folder / "shards"


def loader_rate(shards: Path, workers: int, batch: int, batches: int) -> float:
    """Samples/s of ShardViews alone (2x224 + 6x96 crops), after its workers' first batch."""
    loader = ShardViews(resolve_shards(str(shards)), batch_size=batch, crops=SPECS, num_workers=workers)
    it = iter(loader)
    for _ in range(workers):  # every worker has started and delivered once
        next(it)
    start = time.perf_counter()
    n = sum(len(next(it).keys) for _ in range(batches))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lejepa_data_bench"))
    parser.add_argument("--photometric-batch", type=int, default=64)
    parser.add_argument(
        "--loader", type=Path, metavar="SHARDS", help="only measure ShardViews on these shards"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    if args.loader:
        rate = loader_rate(args.loader, args.workers, args.batch, args.batches)
        print("THROUGHPUT " + json.dumps({"img_per_s": round(rate, 1), "workers": args.workers}), flush=True)
        return
    torch.set_num_threads(1)
    shutil.rmtree(args.workdir, ignore_errors=True)
    paths = make_jpegs(args.workdir / "src", args.images)
    payloads = [p.read_bytes() for p in paths]
    print(
        f"{len(paths)} JPEGs, mean {np.mean([len(p) for p in payloads]) / 1024:.0f} KB, "
        f"torch {torch.__version__}, {os.cpu_count()} cores"
    )

    ref = per_core_rate(reference_pipeline(), payloads[:60])
    gen = torch.Generator().manual_seed(0)
    fast = per_core_rate(lambda p: decode_crops(p, SPECS, 0.5, gen), payloads)
    print(f"| (a) reference: PIL + torchvision v2 per sample, 2x224 + 6x96 | {ref:.1f} samples/s/core |")
    print(
        f"| (b) fast path, worker part: decode (+draft) + 8 crops as uint8 | {fast:.1f} samples/s/core "
        f"| **{fast / ref:.1f}x** the reference |"
    )

    b = args.photometric_batch
    photometric = Photometric()
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        views = [
            torch.randint(0, 256, (s.count, b, 3, s.size, s.size), dtype=torch.uint8, device=device)
            for s in SPECS
        ]
        g = torch.Generator(device=device).manual_seed(0)

        def stage(views=views, g=g, device=device):
            for v in views:
                photometric(v, g)
            if device == "cuda":
                torch.cuda.synchronize()

        ms = median_ms(stage)
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU, 1 thread"
        print(
            f"| (c) batched photometric stage, batch {b} (128x224² + 384x96² views), {name} | "
            f"{ms:.0f} ms/batch | {ms / b:.2f} ms/sample |"
        )
        kornia_ms = kornia_stage_ms(views)
        print(
            f"| (c') the same stage with kornia.augmentation, {name} | {kornia_ms:.0f} ms/batch | "
            f"ours / kornia = **{ms / kornia_ms:.2f}x** |"
        )

    out = args.workdir / "shards"
    start = time.process_time()
    listing = convert.list_class_folders(args.workdir / "src")
    convert.convert(listing, out, prefix="bench", shard_size=60, workers=1)
    rate = len(listing.items) / (time.process_time() - start)
    print(f"| converter, no re-encoding, 1 process | {rate:.0f} images/s/core |")

    shards = resolve_shards(str(out))
    loaders = {
        "stream (ShardViews)": lambda: ShardViews(
            shards, batch_size=16, crops=SPECS, num_workers=1, shuffle_buffer=100
        ),
        "indexed (IndexedViews)": lambda: IndexedViews(
            [ShardSource("bench", shards)],
            global_batch=16,
            micro_batch=16,
            crops=SPECS,
            photometric=Photometric(),
            num_workers=1,
        ),
    }
    for name, make in loaders.items():
        rates = []
        for _ in range(3):
            it = iter(make())
            next(it)  # worker start-up
            start, n = time.perf_counter(), 0
            for _ in range(len(paths) // 16 - 2):
                n += len(next(it).keys)
            rates.append(n / (time.perf_counter() - start))
        print(f"| end-to-end {name}, 1 worker, batch 16 | {statistics.median(rates):.1f} samples/s |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
