"""Real-JPEG test trees cut from the photos scikit-learn ships (china.jpg, flower.jpg)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

BAD_FILES = {  # name -> what the converter must do with it
    "corrupt_bytes.JPEG": "skip",
    "truncated.JPEG": "skip",
    "empty.JPEG": "skip",
    "notes.JPEG": "skip",
    "dangling.JPEG": "skip",
    "cmyk.JPEG": "reencode",
    "gray.JPEG": "reencode",
    "png_inside.JPEG": "reencode",
}


def photo_crops(n: int, seed: int, size_range=(48, 96)) -> list[Image.Image]:
    """`n` random crops of the bundled photos, resized to random sizes, as RGB PIL images."""
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
        x0, y0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        side = int(rng.integers(*size_range))
        crop = photo.resize(
            (side, int(side * rng.uniform(0.75, 1.33))), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
        )
        out.append(crop)
    return out


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_class_tree(
    root: Path, classes: int = 4, per_class: int = 6, seed: int = 0, first_index: int = 0
) -> list[Path]:
    """root/<wnid>/<wnid>_<i>.JPEG, all valid RGB JPEGs; returns the file paths."""
    paths = []
    for c, image in enumerate(photo_crops(classes * per_class, seed)):
        wnid = f"n{1000 + c // per_class:08d}"
        path = root / wnid / f"{wnid}_{first_index + c % per_class}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(image))
        paths.append(path)
    return paths


def add_bad_files(class_dir: Path, elsewhere: Path) -> None:
    """Every kind of bad input in BAD_FILES, a file without an image suffix, and a valid symlink to a
    file outside the tree."""
    good = photo_crops(1, seed=99)[0]
    data = jpeg_bytes(good)
    (class_dir / "corrupt_bytes.JPEG").write_bytes(np.random.default_rng(0).bytes(5000))
    (class_dir / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (class_dir / "empty.JPEG").write_bytes(b"")
    (class_dir / "notes.JPEG").write_text("not an image at all\n")
    os.symlink(class_dir / "does_not_exist.JPEG", class_dir / "dangling.JPEG")
    good.convert("CMYK").save(class_dir / "cmyk.JPEG", format="JPEG")
    good.convert("L").save(class_dir / "gray.JPEG", format="JPEG")
    good.save(class_dir / "png_inside.JPEG", format="PNG")
    (class_dir / "notes.txt").write_text("not an image by its name: listed as ignored\n")
    elsewhere.mkdir(parents=True, exist_ok=True)
    (elsewhere / "outside.JPEG").write_bytes(data)
    os.symlink(elsewhere / "outside.JPEG", class_dir / "linked.JPEG")


def class_tree_and_shards(root: Path, classes: int, per_class: int, shard_size: int) -> tuple[Path, Path]:
    """Real JPEGs in class folders under root/folder, and the same images converted to root/shards."""
    from data_pipeline import convert

    make_class_tree(root / "folder", classes=classes, per_class=per_class)
    args = ["folder", "--src", str(root / "folder"), "--out", str(root / "shards"), "--workers", "1"]
    assert convert.main([*args, "--shard-size", str(shard_size)]) == 0
    return root / "folder", root / "shards"


def convert_plain_and_zstd(root: Path) -> tuple[Path, Path]:
    """A small tree converted twice, to root/plain (.tar) and root/zstd (.tar.zst)."""
    from data_pipeline import convert

    make_class_tree(root / "src", classes=2, per_class=6)
    for name, extra in (("plain", []), ("zstd", ["--zstd"])):
        args = ["folder", "--src", str(root / "src"), "--out", str(root / name), "--workers", "1"]
        assert convert.main([*args, "--shard-size", "5", *extra]) == 0
    return root / "plain", root / "zstd"
