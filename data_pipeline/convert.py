"""`python -m data_pipeline.convert {imagenet,folder,verify}`: image trees to WebDataset shards.

    python -m data_pipeline.convert imagenet --src /datasets/imagenet --out shards --split train
    python -m data_pipeline.convert imagenet --src /datasets/imagenet --out shards --split val
    python -m data_pipeline.convert folder --src my_images/ --out shards/mine --workers 16
    python -m data_pipeline.convert verify --out shards      # every split in the folder

The file list is shuffled once with a seed before it is cut into shards, so every shard mixes
classes. Shard i is a pure function of (file list, seed, i): it is written as `<name>.tmp`, renamed
when complete, and its sidecar `<prefix>-<i>.json` (count, bytes, sha256, skipped files) is renamed
last, so a rerun skips finished shards and rewrites a half-written one byte for byte. As a SLURM
array job, task t of T converts the shards i with i % T == t; whichever process sees every shard
finished writes the split's `manifest-<prefix>.json` (splits converted into one folder keep one
each).

Bad inputs never stop a run. Zero-byte files, dangling symlinks, files that are not images and
JPEGs cut short (no end-of-image marker) are skipped; CMYK, grayscale and palette images, and
non-JPEG files named .JPEG (e.g. PNGs), are re-encoded as RGB JPEG (quality 95); images larger than
--max-side are re-encoded smaller (quality 90). All of it is recorded in the manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
import zstandard
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline.labelled import class_folder, image_files
from data_pipeline.shards import iter_samples, manifest_name, split_manifests

REENCODE_QUALITY = 95
RESIZE_QUALITY = 90
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Item:
    path: str
    label: int


# ---------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------


@dataclass
class Listing:
    """What a source tree holds: class names, the images to convert, and files that are not images
    by their suffix (recorded in the manifest, not converted)."""

    classes: list[str]
    items: list[Item]
    ignored: list[str]


def list_class_folders(src: Path) -> Listing:
    """A class-per-subfolder tree: class index = position in the sorted subfolder names."""
    tree = class_folder(src)
    return Listing(
        tree.classes, [Item(str(p), label) for p, label in tree.samples], list(map(str, tree.ignored))
    )


def list_imagenet(src: Path, split: str) -> Listing:
    """ImageNet `train/<wnid>/*.JPEG`; val as `val/<wnid>/*.JPEG` or flat `val/*.JPEG` labelled by
    LOC_val_solution.csv. Class indices always come from the sorted training wnids when present."""
    split_dir = src / split
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir} does not exist (expected {src}/{{train,val}}/)")
    train_dir = src / "train"
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if any(p.is_dir() for p in split_dir.iterdir()):
        found = list_class_folders(split_dir)
        if wnids and found.classes != wnids:
            index = {w: i for i, w in enumerate(wnids)}
            unknown = sorted(set(found.classes) - set(index))
            if unknown:
                raise ValueError(f"{split_dir} has classes not in {train_dir}: {unknown[:5]}")
            found.items = [Item(it.path, index[found.classes[it.label]]) for it in found.items]
        found.classes = wnids or found.classes
        return found
    solution = next(
        (p for p in (src / "LOC_val_solution.csv", src.parent / "LOC_val_solution.csv") if p.exists()), None
    )
    if solution is None:
        raise ValueError(f"{split_dir} is flat but LOC_val_solution.csv is not in {src} or its parent")
    with open(solution, newline="") as f:
        labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    wnids = wnids or sorted(set(labels.values()))
    index = {w: i for i, w in enumerate(wnids)}
    files = image_files(split_dir)
    items = []
    for path in files.images:
        wnid = labels.get(path.stem)
        if wnid is None:
            raise ValueError(f"{path} has no row in {solution}")
        items.append(Item(str(path), index[wnid]))
    return Listing(wnids, items, list(map(str, files.ignored)))


def plan_shards(items: list[Item], shard_size: int, seed: int) -> list[list[Item]]:
    """Seeded global shuffle (mixes classes within shards), then consecutive cuts."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


# ---------------------------------------------------------------------------------------------------
# One image, one shard
# ---------------------------------------------------------------------------------------------------


def encode_image(path: str, max_side: int | None) -> tuple[bytes, int, int, str | None]:
    """(JPEG bytes, width, height, why it was re-encoded or None). Raises ValueError(reason) to skip."""
    if not os.path.exists(path):
        raise ValueError("dangling symlink" if os.path.islink(path) else "file vanished")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not an image ({type(e).__name__})") from None
    width, height = image.size
    reason = None
    if image.format != "JPEG":  # shards hold JPEG: re-encoded, and a misnamed file is named as such
        named = Image.registered_extensions().get(Path(path).suffix.lower())
        reason = (
            f"{image.format} to JPEG"
            if named == image.format
            else f"{image.format} named {Path(path).suffix}"
        )
    elif image.mode != "RGB":
        reason = f"{image.mode} JPEG"
    elif not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # cut short, or trailing bytes after the image
        try:
            image.load()
        except OSError:
            raise ValueError("truncated JPEG") from None
    if max_side and max(width, height) > max_side:
        reason = f"larger than {max_side} px" + (f", {reason}" if reason else "")
    if reason is None:
        return data, width, height, None
    try:
        if max_side and max(width, height) > max_side:
            image.draft("RGB", (max_side, max_side))  # decode at reduced scale when JPEG allows
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side), Image.BICUBIC)
            quality = RESIZE_QUALITY
        else:
            image = image.convert("RGB")
            quality = REENCODE_QUALITY
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    except OSError as e:
        raise ValueError(f"undecodable image ({e})") from None
    return out.getvalue(), image.width, image.height, reason


def shard_name(prefix: str, index: int, zstd: bool) -> str:
    return f"{prefix}-{index:06d}.tar" + (".zst" if zstd else "")


def sidecar_path(out: Path, prefix: str, index: int) -> Path:
    return out / f"{prefix}-{index:06d}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(out: Path, prefix: str, index: int, items: list[Item], first_key: int, opts: dict) -> dict:
    """Write one shard atomically and return its record (also stored as the sidecar JSON)."""
    name = shard_name(prefix, index, opts["zstd"])
    tmp = out / (name + ".tmp")
    skipped, reencoded, class_counts = [], [], Counter()
    with open(tmp, "wb") as raw:
        stream = (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False)
            if opts["zstd"]
            else raw
        )
        with wds.TarWriter(stream, mtime=0) as tar:
            for offset, item in enumerate(items):
                try:
                    jpg, width, height, reason = encode_image(item.path, opts["max_side"])
                except ValueError as e:
                    skipped.append({"path": item.path, "reason": str(e)})
                    continue
                if reason:
                    reencoded.append({"path": item.path, "reason": reason})
                meta = {
                    "src": item.path,
                    "width": width,
                    "height": height,
                    "class": opts["classes"][item.label],
                }
                key = f"{first_key + offset:09d}"
                tar.write({"__key__": key, "jpg": jpg, "cls": str(item.label), "json": json.dumps(meta)})
                class_counts[item.label] += 1
        if opts["zstd"]:
            stream.close()  # flush the zstd frame; TarWriter does not close streams it did not open
    record = {
        "name": name,
        "count": sum(class_counts.values()),
        "bytes": tmp.stat().st_size,
        "sha256": _sha256(tmp),
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "skipped": skipped,
        "reencoded": reencoded,
    }
    os.replace(tmp, out / name)
    _atomic_write_text(sidecar_path(out, prefix, index), json.dumps(record))
    return record


# ---------------------------------------------------------------------------------------------------
# Whole conversion, manifest, verification
# ---------------------------------------------------------------------------------------------------


def array_task() -> tuple[int, int]:
    """(task, tasks) from a SLURM array, else (0, 1)."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))


def convert(
    listing: Listing,
    out: Path,
    *,
    prefix: str,
    shard_size: int = 1000,
    workers: int = 1,
    max_side: int | None = None,
    zstd: bool = False,
    seed: int = 0,
    task: tuple[int, int] = (0, 1),
) -> dict | None:
    """Convert this task's shards (skipping finished ones); write the manifest if all are finished."""
    if not listing.items:
        raise ValueError("no image files found")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "classes.json", json.dumps(listing.classes))
    shards = plan_shards(listing.items, shard_size, seed)
    opts = {"zstd": zstd, "max_side": max_side, "classes": listing.classes}
    mine = [i for i in range(len(shards)) if i % task[1] == task[0]]
    todo = [i for i in mine if not sidecar_path(out, prefix, i).exists()]
    done = len(mine) - len(todo)
    bar = tqdm(
        total=sum(len(shards[i]) for i in mine), unit="img", desc=f"{prefix} shards", dynamic_ncols=True
    )
    bar.update(sum(len(shards[i]) for i in set(mine) - set(todo)))
    if done:
        bar.write(f"{done} of {len(mine)} shards already finished; converting the other {len(todo)}")
    if workers <= 1:
        for i in todo:
            write_shard(out, prefix, i, shards[i], i * shard_size, opts)
            bar.update(len(shards[i]))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {
                pool.submit(write_shard, out, prefix, i, shards[i], i * shard_size, opts): i for i in todo
            }
            for future in as_completed(futures):
                future.result()
                bar.update(len(shards[futures[future]]))
    bar.close()
    return write_manifest(out, prefix, len(shards), listing, zstd)


IGNORED_LISTED = 1000  # ignored files named in the manifest; the count covers all of them


def write_manifest(out: Path, prefix: str, num_shards: int, listing: Listing, zstd: bool) -> dict | None:
    """Assemble the split's manifest (`manifest-<prefix>.json`) from the sidecars once every shard is
    finished (else return None). Splits converted into one folder keep a manifest each."""
    sidecars = [sidecar_path(out, prefix, i) for i in range(num_shards)]
    if not all(p.exists() for p in sidecars):
        return None
    records = [json.loads(p.read_text()) for p in sidecars]
    classes = listing.classes
    class_counts = Counter()
    for r in records:
        class_counts.update({int(k): v for k, v in r["class_counts"].items()})
    manifest = {
        "format": "lejepa_scale.shards/1",
        "prefix": prefix,
        "compression": "zstd" if zstd else None,
        "classes": classes,
        "num_samples": sum(r["count"] for r in records),
        "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in records],
        "class_counts": {classes[k]: v for k, v in sorted(class_counts.items())},
        "skipped": [s for r in records for s in r["skipped"]],
        "reencoded": [s for r in records for s in r["reencoded"]],
        "ignored": {
            "reason": "no image suffix",
            "count": len(listing.ignored),
            "paths": listing.ignored[:IGNORED_LISTED],
        },
    }
    _atomic_write_text(out / manifest_name(prefix), json.dumps(manifest, indent=1))
    legacy = out / "manifest.json"  # what older versions wrote for one split: superseded by this one
    if legacy.exists() and json.loads(legacy.read_text()).get("prefix") == prefix:
        legacy.unlink()
    return manifest


def verify(out: Path) -> list[str]:
    """Re-read every shard of every split in `out`; return the problems found (empty: all good)."""
    splits = split_manifests(out)
    if not splits:
        raise ValueError(f"{out} holds no manifest-<split>.json: is it the --out of a finished conversion?")
    problems = []
    for manifest in splits.values():
        problems += verify_split(out, json.loads(manifest.read_text()))
    return problems


def verify_split(out: Path, manifest: dict) -> list[str]:
    """Re-read every shard one split's manifest lists, checking size, sha256, count and fields."""
    problems = []
    for shard in tqdm(
        manifest["shards"], unit="shard", desc=f"verify {manifest['prefix']}", dynamic_ncols=True
    ):
        path = out / shard["name"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if _sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        try:
            samples = list(iter_samples(path))
        except Exception as e:  # any read failure is a finding, not a crash
            problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
            continue
        if len(samples) != shard["count"]:
            problems.append(f"{path}: {len(samples)} samples, manifest says {shard['count']}")
        incomplete = [s["__key__"] for s in samples if not {"jpg", "cls"} <= s.keys()]
        if incomplete:
            problems.append(f"{path}: samples without jpg/cls: {incomplete[:5]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.convert", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("imagenet", "folder"):
        p = sub.add_parser(
            name, help=f"convert {'ImageNet' if name == 'imagenet' else 'a class-per-subfolder tree'}"
        )
        p.add_argument("--src", type=Path, required=True, help="the image tree")
        p.add_argument("--out", type=Path, required=True, help="the shard folder (splits may share one)")
        if name == "imagenet":
            p.add_argument(
                "--split", choices=("train", "val"), default="train", help="(default: %(default)s)"
            )
        p.add_argument("--prefix", help="shard and manifest name prefix (default: the split, or 'data')")
        p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: %(default)s)")
        p.add_argument(
            "--workers",
            type=int,
            default=os.cpu_count() or 1,
            help="processes (default: %(default)s, the cores)",
        )
        p.add_argument(
            "--max-side", type=int, help="re-encode images whose longer side exceeds this (default: none)"
        )
        p.add_argument("--zstd", action="store_true", help="write .tar.zst (JPEG tars shrink only ~1.07x)")
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of the global shuffle before sharding (default: %(default)s)",
        )
    v = sub.add_parser("verify", help="re-read every shard of every split, check counts and sha256")
    v.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    task = array_task()
    try:
        if args.command == "verify":
            if not args.out.is_dir():
                raise ValueError(f"--out {args.out} is not a directory")
            problems = verify(args.out)
            for p in problems:
                print(p, file=sys.stderr)
            splits = ", ".join(split_manifests(args.out))
            print(f"{args.out} ({splits}): {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        if not args.src.is_dir():
            raise ValueError(f"--src {args.src} is not a directory")
        if args.command == "imagenet":
            listing, prefix = list_imagenet(args.src, args.split), args.prefix or args.split
        else:
            listing, prefix = list_class_folders(args.src), args.prefix or "data"
        manifest = convert(
            listing,
            args.out,
            prefix=prefix,
            shard_size=args.shard_size,
            workers=args.workers,
            max_side=args.max_side,
            zstd=args.zstd,
            seed=args.seed,
            task=task,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if manifest is None:
        print(f"task {task[0]} of {task[1]} done; the manifest is written by the task that finishes last")
    else:
        print(
            f"{args.out / manifest_name(prefix)}: {manifest['num_samples']} samples in "
            f"{len(manifest['shards'])} shards, "
            f"{len(manifest['skipped'])} skipped, {len(manifest['reencoded'])} re-encoded, "
            f"{manifest['ignored']['count']} ignored (no image suffix)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
