"""Which samples form each global batch, as a function of the seed, the data and the global batch
size alone: not of the world size, the rank or the loader's workers.

* One source (a dataset: in-memory images, or shards with known sample counts) is read epoch after
  epoch. An epoch's order is the source's shards in a seeded permutation, cut into blocks of
  `block_shards` consecutive shards, and the samples of each block in a seeded permutation (a
  function of seed, source and epoch; in-memory images are one shard, so one permutation). Blocks
  keep reads local (a batch touches the shards of one or two blocks) and memory bounded.
* Global positions count the samples a run has consumed: position p of a source is sample
  p % N of its epoch p // N, so a global batch may straddle two epochs, and every sample is used
  exactly once per epoch whatever the batch size.
* Several sources mix by weight: each next position goes to the source with the largest
  weight / (samples taken + 1/2) (Webster's rule; ties to the first source), so every source's
  share of any prefix is within one sample of its weight, and the choice depends only on how many
  samples each source has given: the position is the per-source counts.
* Global step s is the next `global_batch` positions; rank r of W takes the r-th of W equal
  slices of it, in micro-batches. Every sample carries the key of its own random stream (seed,
  source, epoch, offset): its crops and augmentation are the same at any world size.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SampleRef:
    """One sample of one source, where its epoch order put it."""

    source: int
    epoch: int
    offset: int  # its position in the epoch order of its source
    shard: int
    index: int  # within the shard

    def seed(self, seed: int) -> int:
        """The seed of this sample's own random stream (crops, flips, photometric parameters)."""
        return hash((seed, self.source, self.epoch, self.offset)) % 2**63


@dataclass
class Position:
    """How many samples a run has consumed, from each source: the loader's whole state."""

    per_source: list[int] = field(default_factory=lambda: [0])

    @property
    def samples(self) -> int:
        return sum(self.per_source)

    def state_dict(self) -> dict:
        return {"samples": self.samples, "per_source": list(self.per_source)}

    @classmethod
    def from_state(cls, state: dict) -> Position:
        return cls([int(n) for n in state["per_source"]])


class EpochOrder:
    """The sample order of one source in one epoch (see the module docstring)."""

    def __init__(self, counts: list[int], seed: int, source: int, epoch: int, block_shards: int):
        self.counts, self.key = counts, (seed, source, epoch)
        shards = np.random.default_rng([seed, source, epoch, 0]).permutation(len(counts))
        self.blocks = [shards[i : i + block_shards] for i in range(0, len(shards), block_shards)]
        sizes = [sum(counts[s] for s in block) for block in self.blocks]
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._cached: tuple[int, np.ndarray, list[int]] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, list[int]]:
        """Block b's sample permutation and where each of its shards starts within the block."""
        if self._cached is None or self._cached[0] != b:
            size = self.block_starts[b + 1] - self.block_starts[b]
            order = np.random.default_rng([*self.key, b + 1]).permutation(size)
            starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in self.blocks[b]])]).tolist()
            self._cached = (b, order, starts)
        return self._cached[1], self._cached[2]

    def locate(self, offset: int) -> tuple[int, int]:
        """(shard, index in the shard) of the sample at `offset` in this epoch's order."""
        b = bisect.bisect_right(self.block_starts, offset) - 1
        order, starts = self._block(b)
        j = int(order[offset - self.block_starts[b]])
        k = bisect.bisect_right(starts, j) - 1
        return int(self.blocks[b][k]), j - starts[k]


class GlobalOrder:
    """The global sample stream over one or more sources (shard counts per source, weights)."""

    def __init__(
        self,
        counts: list[list[int]],
        weights: list[float] | None = None,
        seed: int = 0,
        block_shards: int = 64,
    ):
        if any(sum(c) == 0 for c in counts):
            raise ValueError("a data source holds no samples")
        self.counts, self.seed, self.block_shards = counts, seed, block_shards
        self.sizes = [sum(c) for c in counts]
        self.weights = weights if weights is not None else [1.0] * len(counts)
        self._orders: dict[tuple[int, int], EpochOrder] = {}

    def _order(self, source: int, epoch: int) -> EpochOrder:
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}  # keep the last ones
            self._orders[key] = EpochOrder(self.counts[source], self.seed, source, epoch, self.block_shards)
        return self._orders[key]

    def sources(self, position: Position, n: int) -> list[int]:
        """The source of each of the next `n` positions (Webster's rule on the per-source counts)."""
        if len(self.weights) == 1:
            return [0] * n
        taken = list(position.per_source)
        heap = [(-w / (t + 0.5), i) for i, (w, t) in enumerate(zip(self.weights, taken, strict=True))]
        heapq.heapify(heap)
        out = []
        for _ in range(n):
            _, i = heapq.heappop(heap)
            out.append(i)
            taken[i] += 1
            heapq.heappush(heap, (-self.weights[i] / (taken[i] + 0.5), i))
        return out

    def step(
        self, position: Position, global_batch: int, rank: int, world_size: int
    ) -> tuple[list[SampleRef], Position]:
        """This rank's samples of the global batch at `position`, and the position after it."""
        share = global_batch // world_size
        sources = self.sources(position, global_batch)
        taken = list(position.per_source)
        mine = []
        for i, source in enumerate(sources):
            q = taken[source]
            taken[source] += 1
            if rank * share <= i < (rank + 1) * share:
                epoch, offset = divmod(q, self.sizes[source])
                shard, index = self._order(source, epoch).locate(offset)
                mine.append(SampleRef(source, epoch, offset, shard, index))
        return mine, Position(taken)

    def stored(self, source: int, j: int) -> tuple[int, int]:
        """(shard, index) of the j-th sample of a source in storage order (for replacements)."""
        starts = np.concatenate([[0], np.cumsum(self.counts[source])]).tolist()
        k = bisect.bisect_right(starts, j) - 1
        return k, j - starts[k]
