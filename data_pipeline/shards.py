"""Shard sets on disk: resolve a manifest, brace pattern or list to (path, sample count), and read
the samples of one shard (plain `.tar` or `.tar.zst`) with webdataset's tar iterators."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import webdataset as wds
import zstandard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    path: str
    count: int


def iter_samples(path: str | Path) -> Iterator[dict]:
    """Samples of one shard, grouped by key. A truncated or corrupt tar raises at the point where it
    breaks, after yielding every complete sample before it."""
    path = str(path)
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.endswith(".zst") else raw
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def _count_by_reading(path: str) -> int:
    return sum(1 for _ in iter_samples(path))


def _manifest(spec: str | list[str]) -> Path | None:
    if not isinstance(spec, str):
        return None
    candidate = Path(spec)
    manifest = candidate / "manifest.json" if candidate.is_dir() else candidate
    return manifest if manifest.name.endswith(".json") and manifest.exists() else None


def shard_paths(spec: str | list[str]) -> list[str]:
    """The shard files `spec` names (manifest.json or its folder, brace pattern, or list), checked to
    exist; cheap enough to run before a job is submitted."""
    manifest = _manifest(spec)
    if manifest is not None:
        names = [s["name"] for s in json.loads(manifest.read_text())["shards"]]
        paths = [str(manifest.parent / name) for name in names]
    else:
        paths = list(braceexpand.braceexpand(spec)) if isinstance(spec, str) else list(spec)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]} (from {spec!r})")
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    return paths


def resolve_shards(spec: str | list[str]) -> list[Shard]:
    """Shards with their sample counts from a manifest.json (or its folder), a brace pattern
    (`train-{000000..000099}.tar`), or a list of paths. Counts come from the manifest, else from the
    converter's per-shard sidecar JSON, else by reading the shard once (logged)."""
    manifest = _manifest(spec)
    if manifest is not None:
        data = json.loads(manifest.read_text())
        return [Shard(str(manifest.parent / s["name"]), int(s["count"])) for s in data["shards"]]
    shards = []
    for p in shard_paths(spec):
        sidecar = Path(p.removesuffix(".zst").removesuffix(".tar") + ".json")
        if sidecar.exists():
            count = int(json.loads(sidecar.read_text())["count"])
        else:
            log.info("no manifest or sidecar for %s: counting its samples", p)
            count = _count_by_reading(p)
        shards.append(Shard(p, count))
    return shards


def resolve_classes(spec: str | list[str]) -> list[str] | None:
    """Class names of a shard set (manifest.json or classes.json beside the shards), if known."""
    first = Path(spec if isinstance(spec, str) else spec[0])
    folder = first if first.is_dir() else first.parent
    for name in ("manifest.json", "classes.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            return data["classes"] if isinstance(data, dict) else data
    return None
