"""Streaming multi-crop batches from WebDataset shards, split exactly across ranks and workers.

How an epoch is split (world size W, per-rank batch B, shards with known sample counts):

* The epoch's sample order is the shards in a seeded permutation (a function of seed and epoch),
  concatenated. Every rank takes `steps = total // (W * B)` batches, so all ranks step together (no
  collective waits on a rank that ran dry). Rank r owns the contiguous range [r*L, (r+1)*L) of that
  order with L = steps * B, and reads only the shards that overlap it.
* The remainder, total - W * L < W * B samples at the end of the order, is not used this epoch.
  Because the shard order is reshuffled every epoch, a different tail is left out each time.
* Within a rank, the epoch's batches are cut into num_workers contiguous runs (earlier runs take one
  more when they do not divide evenly), and batch j of the epoch comes from run j % num_workers.
  The DataLoader's workers live for the whole run and go on to the next epoch's run when theirs
  ends (the round robin tells each which run is its own in every epoch), so an epoch boundary is
  just another batch. Each run goes through a seeded shuffle buffer that yields from its first
  tenth on, growing to full size as it goes.
* Every sample's crops come from a generator seeded by (seed, epoch, position in the epoch order),
  so they do not depend on the worker split.
* A sample that cannot be read (corrupt image, truncated shard) is replaced by a second decode, with
  fresh crops, of a recent good sample of the same worker, so batch counts never change; the
  replacements are counted in `ViewBatch.corrupt`.
* The position (epoch, batches taken) is the loader's state. Resuming with the same world size and
  worker count continues with exactly the next samples: workers replay their runs up to the
  position without decoding.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import Shard, iter_samples
from data_pipeline.views import CropSpec, Photometric, ViewBatch, decode_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """Where each rank's samples lie in one epoch's order."""

    shards: list[Shard]  # in this epoch's order
    steps: int  # batches per rank
    batch_size: int
    on_retry: Callable[[], None] | None = None  # counts the reads of remote shards done again

    def rank_range(self, rank: int) -> tuple[int, int]:
        length = self.steps * self.batch_size
        return rank * length, (rank + 1) * length

    def worker_batches(self, num_workers: int, worker: int) -> tuple[int, int]:
        """[first, last) batch indices of the rank that this worker produces."""
        base, extra = divmod(self.steps, num_workers)
        first = worker * base + min(worker, extra)
        return first, first + base + (1 if worker < extra else 0)

    def samples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """(position in the epoch order, raw sample) for positions in [start, stop). Raises whatever
        reading a broken shard raises, after the samples before the break."""
        offset = 0
        for shard in self.shards:
            if offset + shard.count > start and offset < stop:
                for index, sample in enumerate(iter_samples(shard.path, self.on_retry)):
                    position = offset + index
                    if position >= stop:
                        break
                    if position >= start:
                        yield position, sample
            offset += shard.count
            if offset >= stop:
                return


def plan_epoch(
    shards: list[Shard], epoch: int, seed: int, batch_size: int, world_size: int, on_retry=None
) -> EpochPlan:
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    total = sum(s.count for s in shards)
    steps = total // (world_size * batch_size)
    if steps == 0:
        raise ValueError(
            f"{total} samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
        )
    return EpochPlan(order, steps, batch_size, on_retry)


class _Stream(IterableDataset):
    """One rank's batches, epoch after epoch, from (`epoch`, `skip` batches taken) on, split across
    DataLoader workers that live for the whole run: the next epoch's plan is known in advance, so a
    worker moves on to it without the DataLoader being rebuilt (and its shuffle buffer being refilled
    from nothing by every worker at once)."""

    def __init__(
        self,
        shards,
        *,
        rank,
        world_size,
        batch_size,
        epoch,
        skip,
        specs,
        flip_p,
        photometric,
        seed,
        shuffle_buffer,
    ):
        self.shards, self.rank, self.world_size, self.batch_size = shards, rank, world_size, batch_size
        self.epoch, self.skip = epoch, skip
        self.specs, self.flip_p, self.seed, self.shuffle_buffer = specs, flip_p, seed, shuffle_buffer
        self.photometric = photometric
        self.retries = 0  # this worker's reads of remote shards done again, since its last batch

    def _retried(self) -> None:
        self.retries += 1

    def __iter__(self) -> Iterator[ViewBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader's round robin hands its k-th batch to worker k % num_workers, and an
        # epoch's batch j comes from run j % num_workers: with `first` the round-robin index of the
        # epoch's batch 0, worker i serves run (i - first) % num_workers of that epoch.
        epoch, first, skip = self.epoch, -self.skip, self.skip
        while True:
            plan = plan_epoch(self.shards, epoch, self.seed, self.batch_size, self.world_size, self._retried)
            run = (worker - first) % num_workers
            already = max(0, (skip - run + num_workers - 1) // num_workers)  # this run's batches taken
            yield from self._run(plan, epoch, run, num_workers, already)
            epoch, first, skip = epoch + 1, first + plan.steps, 0

    def _run(
        self, plan: EpochPlan, epoch: int, run: int, num_workers: int, already: int
    ) -> Iterator[ViewBatch]:
        first, last = plan.worker_batches(num_workers, run)
        rank_start, _ = plan.rank_range(self.rank)
        batch = plan.batch_size
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{run}")
        raw = self._shuffled(plan, rank_start + first * batch, rank_start + last * batch, rng)
        # One slot per raw sample, so batch boundaries (and the replay on resume) never shift.
        pending, recent, corrupt, owed = [], deque(maxlen=batch), 0, 0
        for index, (position, sample) in enumerate(raw):
            if index < already * batch:
                continue  # replay up to the resume position without decoding
            decoded = self._decode(epoch, position, sample)
            if decoded is None:
                corrupt += 1
                owed += 1
            else:
                recent.append((position, sample))
                pending.append(decoded)
            while owed and recent:
                pending.append(self._replacement(epoch, recent, owed))
                owed -= 1
            while len(pending) >= batch:
                collated = self._collate(pending[:batch], corrupt)
                collated.read_retries, self.retries = self.retries, 0
                yield collated
                pending, corrupt = pending[batch:], 0
        if owed or pending:
            raise RuntimeError(f"rank {self.rank} run {run}: no readable sample in its whole run")

    def _shuffled(
        self, plan: EpochPlan, start: int, stop: int, rng: random.Random
    ) -> Iterator[tuple[int, dict]]:
        """Samples of [start, stop) through a seeded shuffle buffer that starts yielding once it
        holds a tenth of its size and grows by one sample per yield until full (webdataset's
        `initial`); a read error ends the run early (the caller fills the missing samples) instead
        of crashing the job."""
        initial = max(1, self.shuffle_buffer // 10)
        buffer: list[tuple[int, dict]] = []
        seen = 0
        source = plan.samples(start, stop)
        try:
            for item in source:
                buffer.append(item)
                seen += 1
                if len(buffer) < self.shuffle_buffer:  # grow: take one more sample per yield
                    extra = next(source, None)
                    if extra is not None:
                        buffer.append(extra)
                        seen += 1
                if len(buffer) >= initial:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        except Exception as e:  # truncated or corrupt shard
            log.warning("reading samples %d..%d stopped after %d: %s", start, stop, seen, e)
        rng.shuffle(buffer)
        yield from buffer
        for missing in range(stop - start - seen):
            yield -1, {"__key__": f"missing-{missing}"}

    def _decode(self, epoch: int, position: int, sample: dict) -> tuple | None:
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, position)) % 2**63)
        return decode_sample(sample, self.specs, self.flip_p, self.photometric, gen)

    def _replacement(self, epoch: int, recent: deque, salt: int) -> tuple:
        """The latest good sample decoded again, with differently seeded crops."""
        position, sample = recent[-1]
        views, params, label, key = self._decode(epoch, position * 7919 + salt * 104729 + 1, sample)
        return views, params, label, key + "#repeat"

    @staticmethod
    def _collate(items: list[tuple], corrupt: int) -> ViewBatch:
        return ViewBatch.collate(items, corrupt)


class ShardViews:
    """Endless multi-crop batches for one rank from WebDataset shards (see the module docstring).

    Iterating yields ViewBatch objects; `state_dict()` is the position to checkpoint."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        crops: list[CropSpec],
        flip_p: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        photometric: Photometric | None = None,
    ):
        self.shards, self.batch_size, self.crops, self.flip_p = shards, batch_size, crops, flip_p
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.pin_memory = num_workers, shuffle_buffer, pin_memory
        self.photometric = photometric if photometric is not None else Photometric()
        self.steps_per_epoch = plan_epoch(shards, 0, seed, batch_size, world_size).steps
        self.epoch, self.batch, self.corrupt_total, self.read_retries = 0, 0, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "corrupt_total": self.corrupt_total,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "per_source" in state:  # a position of the indexed order (data.order changed since)
            self.epoch, self.batch = int(state["samples"]) // sum(s.count for s in self.shards), 0
            self.corrupt_total = int(state.get("corrupt_total", 0))
            if self.rank == 0:
                log.warning(
                    "the checkpoint's data position is of the indexed order: epoch %d starts again from its "
                    "first batch, streamed", self.epoch,
                )  # fmt: skip
            return
        if state["world_size"] != self.world_size or state["num_workers"] != self.num_workers:
            raise ValueError(
                f"loader position was saved at world size {state['world_size']} with {state['num_workers']} "
                f"workers, not {self.world_size}/{self.num_workers}: an exact resume needs the same split"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.batch == self.steps_per_epoch:  # saved after an epoch's last batch by an earlier version
            self.epoch, self.batch = self.epoch + 1, 0
        self.corrupt_total = int(state.get("corrupt_total", 0))

    def counters(self) -> dict[str, float]:
        """What the metrics report of the data: samples replaced as unreadable, remote reads redone."""
        return {"corrupt_samples": self.corrupt_total, "read_retries": self.read_retries}

    def load_from_other_world(self, saved: dict[str, int], world_size: int, step: int) -> None:
        """Resume from a position saved by `world_size` ranks: the position within an epoch does not
        map to another rank count, so the saved epoch starts again from its first batch."""
        if "per_source" in saved:  # a position of the indexed order: it says so itself
            self.load_state_dict(saved)
            return
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
        stream = _Stream(
            self.shards,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            epoch=self.epoch,
            skip=self.batch,
            specs=self.crops,
            flip_p=self.flip_p,
            photometric=self.photometric,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.seed),  # not the trainer's torch stream
        )
        for batch in loader:  # endless: the workers carry on into the next epoch
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            self.corrupt_total += batch.corrupt
            self.read_retries += batch.read_retries
            yield batch
