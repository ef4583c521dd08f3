"""Shard sets: resolve a manifest, brace pattern or list to (path, sample count); read the samples of
one shard in order (plain `.tar` or `.tar.zst`) with webdataset's tar iterators, or one sample at a
time by its index (local plain `.tar`: the members' offsets come from the tar headers).

A shard is a local path, a `pipe:` command whose standard output is the tar (webdataset's gopen
runs it), or a URL fsspec opens (`https://`, `s3://` with s3fs, `gs://` with gcsfs). A remote shard
whose read breaks (a connection reset, a server restarted, a command that failed) is opened again
after a backoff and read on after the last sample it gave; only after RETRIES tries is it given up,
naming the shard (the loaders then count its missing samples as unreadable)."""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
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


RETRIES = 6  # reads of a remote shard before it is given up: 0.5, 1, 2, 4, 8, 16 s apart


def is_remote(spec: str) -> bool:
    """A `pipe:` command or a URL, not a local path."""
    return spec.startswith("pipe:") or "://" in spec


def _open(spec: str):
    if spec.startswith("pipe:"):  # webdataset's Pipe: raises at close when the command failed
        return wds.gopen(spec, "rb")
    if "://" in spec:
        import fsspec

        return fsspec.open(spec, "rb", block_size=0).open()  # streamed, not cached whole
    return open(spec, "rb")


def _read(spec: str) -> Iterator[dict]:
    with _open(spec) as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if spec.endswith(".zst") else raw
        files = wds.tariterators.tar_file_expander([{"url": spec, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


def iter_samples(spec: str | Path, on_retry: Callable[[], None] | None = None) -> Iterator[dict]:
    """Samples of one shard, grouped by key. A local tar that is truncated or corrupt raises at the
    point where it breaks, after yielding every complete sample before it. A remote one is read
    again after each break (`on_retry` counts them) from the sample after the last one yielded; it
    raises, naming the shard, when RETRIES tries all broke."""
    spec = str(spec)
    if not is_remote(spec):
        yield from _read(spec)
        return
    done = tries = 0
    while True:
        try:
            for index, sample in enumerate(_read(spec)):
                if index >= done:  # the samples before were yielded before the break
                    done += 1
                    yield sample
            return
        except (TypeError, AttributeError, NameError, ImportError):  # a bug, not a broken read
            raise
        except Exception as e:
            tries += 1
            if tries > RETRIES:
                raise OSError(f"shard {spec}: unreadable after {RETRIES} retries: {e}") from e
            wait = 0.5 * 2 ** (tries - 1)
            log.warning("shard %s: read broke after %d samples (%s: %s); again in %.1f s (%d/%d)", spec, done,
                        type(e).__name__, e, wait, tries, RETRIES)  # fmt: skip
            if on_retry is not None:
                on_retry()
            time.sleep(wait)


Members = dict[str, tuple[int, int]]  # extension -> (offset of its data, size)


def index_tar(path: str | Path) -> list[tuple[str, Members]]:
    """(key, members) of every complete sample of a plain tar shard, from its headers alone (tarfile
    seeks over the data). A truncated shard gives the samples before the break; a sample whose data
    runs past the end of the file is left out."""
    size = os.path.getsize(path)
    samples: list[tuple[str, Members]] = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for info in tar:
                key, ext = wds.tariterators.base_plus_ext(info.name)
                if not info.isfile() or key is None:
                    continue
                if info.offset_data + info.size > size:
                    break
                if samples and samples[-1][0] == key:
                    samples[-1][1][ext.lower()] = (info.offset_data, info.size)
                else:
                    samples.append((key, {ext.lower(): (info.offset_data, info.size)}))
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("%s: readable up to sample %d (%s)", path, len(samples), e)
    return samples


class ShardReader:
    """Samples of local plain-tar shards read by (shard, index): each shard's headers are indexed on
    its first read, and the `keep` shards read last stay open with their index."""

    def __init__(self, paths: list[str], keep: int = 64):
        self.paths, self.keep = paths, keep
        self.open: OrderedDict[int, tuple[int, list[tuple[str, Members]]]] = OrderedDict()

    def read(self, shard: int, index: int) -> dict | None:
        """The sample as webdataset groups it ({"__key__", ext: bytes}); None when the shard does not
        hold it (truncated or shorter than its manifest says)."""
        if shard not in self.open:
            if len(self.open) >= self.keep:
                os.close(self.open.popitem(last=False)[1][0])
            self.open[shard] = (os.open(self.paths[shard], os.O_RDONLY), index_tar(self.paths[shard]))
        self.open.move_to_end(shard)
        fd, samples = self.open[shard]
        if index >= len(samples):
            return None
        key, members = samples[index]
        return {
            "__key__": key,
            **{ext: os.pread(fd, size, offset) for ext, (offset, size) in members.items()},
        }

    def close(self) -> None:
        for fd, _ in self.open.values():
            os.close(fd)
        self.open.clear()


def _count_by_reading(path: str) -> int:
    return sum(1 for _ in iter_samples(path))


def manifest_name(prefix: str) -> str:
    """The manifest of one split (prefix) of a shard folder: several splits share a folder."""
    return f"manifest-{prefix}.json"


def split_manifests(folder: Path) -> dict[str, Path]:
    """The splits a shard folder holds, prefix -> manifest: `manifest-<prefix>.json`, and the single
    `manifest.json` that older conversions wrote (under the prefix it names)."""
    found = {}
    for path in sorted(folder.glob("manifest-*.json")):
        prefix = path.name.removeprefix("manifest-").removesuffix(".json")
        if not prefix.isdigit():  # not a sidecar of shards named "manifest-000000"
            found[prefix] = path
    legacy = folder / "manifest.json"
    if legacy.exists():
        found.setdefault(json.loads(legacy.read_text()).get("prefix", "data"), legacy)
    return found


def _read_text(location: str) -> str:
    """A small file (a manifest, a sidecar): local, or through fsspec for a URL."""
    if "://" in location:
        import fsspec

        with fsspec.open(location, "r") as f:
            return f.read()
    return Path(location).read_text()


def _remote_manifest(spec: str | list[str]) -> tuple[str, dict] | None:
    """(its base URL, its content) when `spec` is the URL of a manifest."""
    if isinstance(spec, str) and "://" in spec and spec.endswith(".json"):
        return spec.rsplit("/", 1)[0], json.loads(_read_text(spec))
    return None


def _manifest(spec: str | list[str]) -> Path | None:
    """The manifest `spec` names: the file itself, or the one split of a shard folder (a folder that
    holds several splits must be told which)."""
    if not isinstance(spec, str) or is_remote(spec):
        return None
    path = Path(spec)
    if path.is_dir():
        splits = split_manifests(path)
        if len(splits) > 1:
            names = ", ".join(f"{prefix} ({manifest})" for prefix, manifest in splits.items())
            raise ValueError(f"{path} holds several splits, name one of their manifests: {names}")
        if not splits:
            raise FileNotFoundError(
                f"{path} has no manifest-<split>.json: convert it with python -m data_pipeline.convert, "
                "or give its shards as a brace pattern (e.g. train-{000000..000099}.tar)"
            )
        return next(iter(splits.values()))
    return path if path.name.endswith(".json") and path.exists() else None


def shard_paths(spec: str | list[str]) -> list[str]:
    """The shard files `spec` names (a split's manifest or the folder holding it, brace pattern, or
    list), checked to exist; cheap enough to run before a job is submitted."""
    manifest, remote = _manifest(spec), _remote_manifest(spec)
    if manifest is not None:
        names = [s["name"] for s in json.loads(manifest.read_text())["shards"]]
        paths = [str(manifest.parent / name) for name in names]
    elif remote is not None:
        paths = [f"{remote[0]}/{s['name']}" for s in remote[1]["shards"]]
    else:
        paths = list(braceexpand.braceexpand(spec)) if isinstance(spec, str) else list(spec)
    missing = [p for p in paths if not is_remote(p) and not Path(p).exists()]  # remote: found when read
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]} (from {spec!r})")
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    return paths


def resolve_shards(spec: str | list[str]) -> list[Shard]:
    """Shards with their sample counts from a split's manifest (or its folder), a brace pattern
    (`train-{000000..000099}.tar`), or a list of paths. Counts come from the manifest, else from the
    converter's per-shard sidecar JSON, else by reading the shard once (logged)."""
    manifest, remote = _manifest(spec), _remote_manifest(spec)
    if manifest is not None:
        data = json.loads(manifest.read_text())
        return [Shard(str(manifest.parent / s["name"]), int(s["count"])) for s in data["shards"]]
    if remote is not None:
        return [Shard(f"{remote[0]}/{s['name']}", int(s["count"])) for s in remote[1]["shards"]]
    return [Shard(p, _count(p)) for p in shard_paths(spec)]


def _count(spec: str) -> int:
    """A shard's sample count: the converter's sidecar JSON beside it (for a URL too), else by reading
    the shard once (logged; a `pipe:` command always is)."""
    if not spec.startswith("pipe:"):
        sidecar = spec.removesuffix(".zst").removesuffix(".tar") + ".json"
        try:
            return int(json.loads(_read_text(sidecar))["count"])
        except (OSError, ValueError, KeyError):
            pass
    log.info("no manifest or sidecar for %s: counting its samples", spec)
    return _count_by_reading(spec)


def resolve_classes(spec: str | list[str]) -> list[str] | None:
    """Class names of a shard set (its manifest, or classes.json beside the shards), if known."""
    manifest, remote = _manifest(spec), _remote_manifest(spec)
    if manifest is not None:
        return json.loads(manifest.read_text())["classes"]
    if remote is not None:
        return remote[1].get("classes")
    if is_remote(spec if isinstance(spec, str) else spec[0]):
        return None
    first = Path(spec if isinstance(spec, str) else spec[0])
    classes = first.parent / "classes.json"
    return json.loads(classes.read_text()) if classes.exists() else None
