"""Multi-crop batches read sample by sample in the world-size-free global order (`order.py`), from
in-memory images or local plain-tar shards.

Every step takes the next `global_batch` positions of the order; each rank reads its slice of them,
in micro-batches, through DataLoader workers (each worker makes whole micro-batches, in order).
Every sample's crops, flips and photometric parameters come from its own generator, keyed by its
place in the order, so the views of a sample do not depend on the world size, the rank, the
workers or how a step is cut into micro-batches. The loader's state is the per-source count of
samples consumed: a resume at any world size continues with exactly the next samples.

A sample that cannot be read (an undecodable image, a shard cut short) is replaced by another
sample of the same source drawn from its own generator, decoded with fresh crops, and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.order import GlobalOrder, Position, SampleRef
from data_pipeline.shards import Shard, ShardReader
from data_pipeline.views import (
    CROP_UNIFORMS,
    CropSpec,
    Photometric,
    ViewBatch,
    crop_boxes,
    crop_resize,
    decode_sample,
)

log = logging.getLogger(__name__)

REPLACEMENT_TRIES = 10


@dataclass
class MemorySource:
    """uint8 images (N, C, H, W) held in memory, with labels if any: one 'shard' of N samples."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"expected uint8 images (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )

    @property
    def counts(self) -> list[int]:
        return [len(self.images)]


@dataclass
class ShardSource:
    """Local plain-tar shards with known sample counts (`resolve_shards`)."""

    name: str
    shards: list[Shard]

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.shards]


class _MicroBatches(Dataset):
    """Turns one micro-batch's sample references into a ViewBatch (in a DataLoader worker)."""

    def __init__(self, sources, order: GlobalOrder, specs, flip_p, photometric, seed, labelled):
        self.sources, self.order, self.specs, self.flip_p = sources, order, specs, flip_p
        self.photometric, self.seed, self.labelled = photometric, seed, labelled
        self.readers: dict[int, ShardReader] = {}  # per worker process, made on first use

    def __getitem__(self, job: tuple[list[SampleRef], dict]) -> ViewBatch:
        refs, position = job
        if len({ref.source for ref in refs}) == 1 and isinstance(self.sources[refs[0].source], MemorySource):
            batch = self._crop(refs, position)  # the common case, cut in one go
        else:  # shards, or a mixture: each sample on its own, in-memory ones cut per source
            items, corrupt = [None] * len(refs), 0
            for source in {ref.source for ref in refs}:
                mine = [i for i, ref in enumerate(refs) if ref.source == source]
                if isinstance(self.sources[source], MemorySource):
                    cut = self._crop([refs[i] for i in mine], position)
                    for j, i in enumerate(mine):
                        items[i] = ([v[:, j] for v in cut.views], [p[:, j] for p in cut.photometric],
                                    int(cut.labels[j]), cut.keys[j])  # fmt: skip
                    continue
                for i in mine:
                    items[i], replaced = self._sample(refs[i])
                    corrupt += replaced
            batch = ViewBatch.collate(items, corrupt, position)
        if not self.labelled:
            batch.labels = None
        return batch

    def _sample(self, ref: SampleRef) -> tuple[tuple, int]:
        gen = torch.Generator().manual_seed(ref.seed(self.seed))
        source = self.sources[ref.source]
        item = self._decode(ref.source, ref.shard, ref.index, gen)
        for attempt in range(1, REPLACEMENT_TRIES + 1):
            if item is not None:
                return item, attempt - 1
            replacement = torch.Generator().manual_seed(hash((ref.seed(self.seed), attempt)) % 2**63)
            j = int(torch.randint(self.order.sizes[ref.source], (1,), generator=replacement))
            item = self._decode(ref.source, *self.order.stored(ref.source, j), replacement)
            if item is not None:
                item = (*item[:3], item[3] + "#repeat")
        raise RuntimeError(
            f"source {source.name}: no readable sample in {REPLACEMENT_TRIES} tries around {ref}"
        )

    def _decode(self, source: int, shard: int, index: int, gen: torch.Generator):
        if source not in self.readers:
            self.readers[source] = ShardReader([s.path for s in self.sources[source].shards])
        sample = self.readers[source].read(shard, index)
        if sample is None:
            return None
        return decode_sample(sample, self.specs, self.flip_p, self.photometric, gen)

    def _crop(self, refs: list[SampleRef], position: dict) -> ViewBatch:
        """In-memory images: every random number of a sample (its crops' boxes and flips, its views'
        photometric parameters) in one draw from its own generator, then each spec's crops of the
        whole batch in one call."""
        sources = [self.sources[ref.source] for ref in refs]
        images = torch.stack([src.images[ref.index] for src, ref in zip(sources, refs, strict=True)])
        height, width = images.shape[-2:]
        per_view = CROP_UNIFORMS + 1 + Photometric.PARAMETERS  # box, flip, photometric
        total = sum(spec.count for spec in self.specs) * per_view
        u = torch.stack([torch.rand(total, generator=torch.Generator().manual_seed(ref.seed(self.seed)))
                         for ref in refs])  # fmt: skip
        views, photometric, start = [], [], 0
        for spec in self.specs:  # view-major: view v of sample i at row v * B + i
            draws = (
                u[:, start : start + spec.count * per_view]
                .unflatten(1, (spec.count, per_view))
                .transpose(0, 1)
            )
            start += spec.count * per_view
            draws = draws.flatten(0, 1)
            boxes = crop_boxes(draws[:, :CROP_UNIFORMS], height, width, spec.scale, spec.ratio)
            flips = draws[:, CROP_UNIFORMS] < self.flip_p
            crops = crop_resize(images.repeat(spec.count, 1, 1, 1), boxes, spec.size)
            crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
            views.append(crops.unflatten(0, (spec.count, len(refs))).expand(-1, -1, 3, -1, -1))
            params = self.photometric.from_uniforms(draws[:, CROP_UNIFORMS + 1 :])
            photometric.append(params.unflatten(0, (spec.count, len(refs))))
        none = torch.tensor(-1)
        labels = torch.stack(
            [none if s.labels is None else s.labels[r.index] for s, r in zip(sources, refs, strict=True)]
        )
        keys = [f"{s.name}/{r.index}" for s, r in zip(sources, refs, strict=True)]
        return ViewBatch(views, labels, keys, 0, photometric, position)


class IndexedViews:
    """Endless multi-crop micro-batches of one rank in the global order (see the module docstring).

    Iterating yields ViewBatch objects, `steps x accumulation` of them per step; `state_dict()` is
    the position to checkpoint, the same on every rank and valid at any world size."""

    def __init__(
        self,
        sources: list[MemorySource | ShardSource],
        *,
        global_batch: int,
        micro_batch: int,
        crops: list[CropSpec],
        photometric: Photometric,
        flip_p: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: list[float] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        block_shards: int = 64,
    ):
        share = global_batch // world_size
        if global_batch % world_size or share % micro_batch:
            raise ValueError(
                f"a global batch of {global_batch} does not split into micro-batches of {micro_batch} on "
                f"{world_size} ranks"
            )
        self.sources, self.global_batch, self.micro_batch = sources, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.order = GlobalOrder([s.counts for s in sources], weights, seed, block_shards)
        labelled = len(sources) == 1 and not (
            isinstance(sources[0], MemorySource) and sources[0].labels is None
        )
        self.dataset = _MicroBatches(sources, self.order, crops, flip_p, photometric, seed, labelled)
        self.position, self.corrupt_total = Position([0] * len(sources)), 0

    @property
    def steps_per_epoch(self) -> float:
        """Steps in one pass over the data (of the first source)."""
        return self.order.sizes[0] / self.global_batch

    def state_dict(self) -> dict:
        return {**self.position.state_dict(), "corrupt_total": self.corrupt_total}

    def counters(self) -> dict[str, float]:
        """What the metrics report of the data: samples replaced as unreadable, and with several
        sources the samples each gave so far (the same on every rank)."""
        counts = {"corrupt_samples": self.corrupt_total}
        if len(self.sources) > 1:
            counts.update(
                {f"samples/{s.name}": n for s, n in zip(self.sources, self.position.per_source, strict=True)}
            )
        return counts

    def load_state_dict(self, state: dict) -> None:
        self.corrupt_total = int(state.get("corrupt_total", 0))
        if "per_source" in state:
            self.position = Position.from_state(state)
            return
        epoch = int(state.get("epoch", 0))  # the rank-split position of data.order=stream or an older loader
        self.position = Position([epoch * size for size in self.order.sizes])
        if self.rank == 0:
            log.warning(
                "the checkpoint's data position (epoch %d, batch %s) is of a rank-split order: epoch %d "
                "starts again from its first sample, in the indexed order", epoch, state.get("batch"), epoch,
            )  # fmt: skip

    def load_from_other_world(self, saved: dict, world_size: int, step: int) -> None:
        """The position is world-size-free: the run continues with exactly the next samples."""
        self.load_state_dict(saved)
        if self.rank == 0 and "per_source" in saved:
            log.info("the data position of step %d (saved by %d ranks, %d samples consumed) continues on %d",
                     step, world_size, self.position.samples, self.world_size)  # fmt: skip

    def _jobs(self) -> Iterator[tuple[list[SampleRef], dict]]:
        position = self.position
        while True:
            mine, position = self.order.step(position, self.global_batch, self.rank, self.world_size)
            after = position.state_dict()
            for start in range(0, len(mine), self.micro_batch):
                yield mine[start : start + self.micro_batch], after

    def __iter__(self) -> Iterator[ViewBatch]:
        loader = DataLoader(
            self.dataset,
            sampler=self._jobs(),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.seed),  # not the trainer's torch stream
        )
        for batch in loader:  # endless
            self.position = Position.from_state(batch.position)
            self.corrupt_total += batch.corrupt
            yield batch
