"""Multi-crop batches from a uint8 image tensor held in memory (the demo's path; no workers needed)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from data_pipeline.views import CropSpec, MultiCrop, ViewBatch

log = logging.getLogger(__name__)


class InMemoryViews:
    """Endless epochs over in-memory images, split across data-parallel ranks.

    Each epoch is a seeded permutation; rank r takes every world_size-th image, and the tail that
    does not fill a batch on every rank is dropped, so all ranks take the same number of steps.
    Crops come from a generator seeded by (seed, epoch, batch), so the stream is a pure function of
    the position, which `state_dict` records.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        batch_size: int,
        crops: list[CropSpec],
        flip_p: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.batch_size, self.crops, self.seed = batch_size, MultiCrop(crops, flip_p), seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.batches_per_epoch = len(images) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(images)} images cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def load_from_other_world(self, saved: dict[str, int], world_size: int, step: int) -> None:
        """Resume from a position saved by `world_size` ranks: the position within an epoch does not
        map to another rank count, so the saved epoch starts again from its first batch."""
        self.epoch, self.batch = int(saved["epoch"]), 0
        if self.rank == 0:
            log.warning(
                "the data position of step %d was saved by %d ranks and this job has %d: epoch %d restarts "
                "from its first batch, and the %d samples it had already used (%d batches x %d ranks of %d) "
                "are seen again", step, world_size, self.world_size, self.epoch,
                int(saved["batch"]) * world_size * self.batch_size, int(saved["batch"]), world_size,
                self.batch_size,
            )  # fmt: skip

    def __iter__(self) -> Iterator[ViewBatch]:
        while True:
            order = torch.randperm(
                len(self.images), generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
            mine = order[self.rank :: self.world_size]
            while self.batch < self.batches_per_epoch:
                idx = mine[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
                gen = torch.Generator().manual_seed(
                    hash((self.seed, self.epoch, self.batch, self.rank)) % 2**63
                )
                self.batch += 1
                views = [v.expand(-1, -1, 3, -1, -1) for v in self.crops(self.images[idx], gen)]
                batch = ViewBatch(views=views, labels=None if self.labels is None else self.labels[idx])
                yield batch.pin_memory() if self.pin_memory else batch  # the copy to the GPU: asynchronous
            self.epoch, self.batch = self.epoch + 1, 0
