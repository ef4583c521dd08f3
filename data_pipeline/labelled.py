"""Labelled images for evaluation and conversion: built-in sets, labelled shards, and
class-per-subfolder image trees (the one place that decides which files count as images)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from data_pipeline.builtin import BUILTIN, load_builtin
from data_pipeline.shards import iter_samples, shard_paths, split_manifests

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
BATCH = 256


@dataclass
class ImageFiles:
    """Image files found under a folder, and the other files there (kept for reporting)."""

    images: list[Path]
    ignored: list[Path]


def image_files(folder: Path) -> ImageFiles:
    """Files under `folder`, sorted, split by suffix. Symlinks count, dangling ones too: whoever reads
    them reports the failure instead of the listing hiding it."""
    images, ignored = [], []
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else ignored).append(path)
    return ImageFiles(images, ignored)


@dataclass
class ClassFolder:
    """A class-per-subfolder tree: class index = position in the sorted subfolder names."""

    classes: list[str]
    samples: list[tuple[Path, int]]
    ignored: list[Path]


def class_folder(root: Path) -> ClassFolder:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    samples, ignored = [], []
    for label, name in enumerate(classes):
        found = image_files(root / name)
        samples += [(path, label) for path in found.images]
        ignored += found.ignored
    return ClassFolder(classes, samples, ignored)


def labelled_images(
    spec: str, split: str, size: int, rank: int = 0, world: int = 1, limit: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, 3, size, size), int64 labels (B,)) batches of this rank's share of `spec`: a
    built-in dataset (`split` train or val), labelled shards (manifest, its folder, brace pattern) or
    a class-per-subfolder folder. `limit` > 0 keeps a seeded subset of that many images (built-in
    datasets and folders; shards are subsampled by the caller after extraction). Files or samples
    that cannot be read or decoded are skipped, counted and named in one warning at the end."""
    if isinstance(spec, str) and spec in BUILTIN:
        yield from _builtin_batches(spec, split, size, rank, world, limit)
        return
    if isinstance(spec, str) and Path(spec).is_dir() and not split_manifests(Path(spec)):
        samples = class_folder(Path(spec)).samples
        if 0 < limit < len(samples):
            samples = [samples[i] for i in seeded_subset(len(samples), limit)]
        mine = ((str(path), path.read_bytes, label) for path, label in samples[rank::world])
    else:
        paths = shard_paths(spec)[rank::world]
        mine = (
            (f"{p}:{s['__key__']}", lambda s=s: s["jpg"], int(s["cls"]))
            for p in paths
            for s in iter_samples(p)
            if "cls" in s
        )
    batch: list[tuple[torch.Tensor, int]] = []
    unreadable: list[str] = []
    for name, read, label in mine:
        try:
            batch.append((centre_crop(read(), size), label))
        except (OSError, UnidentifiedImageError, KeyError) as e:  # dangling link, not an image, no jpg
            unreadable.append(f"{name} ({type(e).__name__})")
            continue
        if len(batch) == BATCH:
            yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
            batch = []
    if batch:
        yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
    if unreadable:
        log.warning("skipped %d unreadable image(s) of %s: %s%s", len(unreadable), spec,
                    ", ".join(unreadable[:10]), ", ..." if len(unreadable) > 10 else "")  # fmt: skip


def _builtin_batches(spec: str, split: str, size: int, rank: int, world: int, limit: int):
    data = load_builtin(spec)
    train = split == "train"
    images, labels = (data.train_images, data.train_labels) if train else (data.test_images, data.test_labels)
    if 0 < limit < len(images):
        keep = seeded_subset(len(images), limit)
        images, labels = images[keep], labels[keep]
    for start in range(rank * BATCH, len(images), world * BATCH):
        x = images[start : start + BATCH].expand(-1, 3, -1, -1)
        if x.shape[-1] != size:
            x = TF.resize(x, [size, size], antialias=True)
        yield x, labels[start : start + BATCH]


def seeded_subset(total: int, limit: int) -> torch.Tensor:
    """`limit` sorted indices out of `total`, the same on every call."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:limit].sort().values


def centre_crop(encoded: bytes, size: int) -> torch.Tensor:
    """The standard evaluation view: shorter side to size / 0.875, centre crop `size`."""
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    x = TF.pil_to_tensor(image)
    x = TF.resize(x, int(round(size / 0.875)), antialias=True)
    return TF.center_crop(x, [size, size])
