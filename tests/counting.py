"""Count, from outside the code under test, what a training process spends outside compute: the
collectives it issues (as the profiler sees them at the backend: every c10d and functional
collective, also those DTensor issues internally) and the host reads of tensor values made by the
project's own code (each one a device sync on a GPU)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

PROJECT = tuple(
    str(Path(__file__).resolve().parent.parent / name) + "/" for name in ("lejepa_scale", "data_pipeline")
)
READS = ("item", "tolist", "__bool__", "__int__", "__float__")
KINDS = {  # c10d's ops, as the profiler names them (what the backend does with them varies: gloo
    # reduce-scatters with an all-reduce of its own)
    "c10d::allreduce_": "all_reduce",
    "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather",
    "c10d::_reduce_scatter_base_": "reduce_scatter",
    "c10d::reduce_scatter_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d::broadcast_": "broadcast",
}


class HostReads:
    """Counts Tensor.item/tolist/__bool__/__int__/__float__ calls whose caller is project code."""

    def __init__(self):
        self.count = 0
        self._originals = {}

    def __enter__(self) -> HostReads:
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename.startswith(PROJECT):
                    self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


class StepCounts:
    """Collectives by kind (`c10d::allreduce_` -> `all_reduce`) and host reads, for each interval
    between two `mark()` calls (the trainer calls one at the start of every step)."""

    def __init__(self):
        self.reads = HostReads()
        self.intervals: list[Counter] = []
        self._profiler = None
        self._reads_at_mark = 0

    def __enter__(self) -> StepCounts:
        self.reads.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._close_interval()
        self.reads.__exit__(*exc)

    def mark(self) -> None:
        self._close_interval()
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()
        self._reads_at_mark = self.reads.count

    def _close_interval(self) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        events = self._profiler.events()
        counts = Counter(KINDS.get(e.name, e.name) for e in events if e.name.startswith("c10d::"))
        counts["host_reads"] = self.reads.count - self._reads_at_mark
        self.intervals.append(counts)
        self._profiler = None

    def per_step(self, first: int, last: int) -> dict[str, float]:
        """Average per step over the steps `first` .. `last` - 1 (from the start of one step to the
        start of the next: the data, the step, and whatever the loop does after it)."""
        chosen = self.intervals[first:last]
        kinds = set().union(*chosen)
        return {kind: sum(c[kind] for c in chosen) / len(chosen) for kind in kinds}
