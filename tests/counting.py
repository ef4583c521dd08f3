"""Count, from outside the code under test, what a training process spends outside compute: the
collectives it issues (as the profiler sees them at the backend: every c10d and functional
collective, also those DTensor issues internally) and the host reads of tensor values made by the
project's own code that would make a GPU and its host wait for each other (reads of values, Python
numbers written into tensors, tensors made from host data, blocking copies)."""

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


def _from_project() -> bool:
    return sys._getframe(2).f_code.co_filename.startswith(PROJECT)


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a `.to(...)` call moves to, if it names one (not a dtype-only cast)."""
    target = kwargs.get("device", next((a for a in args if isinstance(a, str | torch.device)), None))
    if target is None and args and isinstance(args[0], torch.Tensor):
        target = args[0].device
    return torch.device(target) if target is not None else None


class HostSyncs:
    """Counts what the project's own code does that makes a GPU wait for the host or the host for the
    GPU, each kind apart: reads of tensor values (Tensor.item/tolist/__bool__/__int__/__float__),
    writes of Python numbers into tensor elements (`w[0] = 1.0`: a blocking host-to-device copy),
    `torch.tensor(..., device=...)` (a copy from pageable memory) and `.to(device)` without
    `non_blocking=True`. On CPU none of them waits; counting them makes the GPU's rule fail here."""

    KINDS = ("host_reads", "scalar_writes", "host_tensors", "blocking_copies")

    def __init__(self):
        self.counts = dict.fromkeys(self.KINDS, 0)
        self._originals: list[tuple[object, str, object]] = []

    def _wrap(self, owner, name: str, kind_of) -> None:
        original = getattr(owner, name)
        self._originals.append((owner, name, original))

        def counted(*args, **kwargs):
            kind = kind_of(args, kwargs)
            if kind and _from_project():
                self.counts[kind] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def __enter__(self) -> HostSyncs:
        for name in READS:
            self._wrap(torch.Tensor, name, lambda args, kwargs: "host_reads")
        self._wrap(
            torch.Tensor,
            "__setitem__",
            lambda args, kwargs: "scalar_writes" if isinstance(args[2], int | float | bool) else None,
        )
        self._wrap(torch, "tensor", lambda args, kwargs: "host_tensors" if "device" in kwargs else None)
        self._wrap(
            torch.Tensor,
            "to",
            lambda args, kwargs: (
                "blocking_copies"
                if _device_of(args[1:], kwargs) is not None and not kwargs.get("non_blocking", False)
                else None
            ),
        )
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()


class StepCounts:
    """Collectives by kind (`c10d::allreduce_` -> `all_reduce`) and host reads, for each interval
    between two `mark()` calls (the trainer calls one at the start of every step)."""

    def __init__(self):
        self.syncs = HostSyncs()
        self.intervals: list[Counter] = []
        self._profiler = None
        self._syncs_at_mark = dict(self.syncs.counts)

    def __enter__(self) -> StepCounts:
        self.syncs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._close_interval()
        self.syncs.__exit__(*exc)

    def mark(self) -> None:
        self._close_interval()
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()
        self._syncs_at_mark = dict(self.syncs.counts)

    def _close_interval(self) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        events = self._profiler.events()
        counts = Counter(KINDS.get(e.name, e.name) for e in events if e.name.startswith("c10d::"))
        for kind, count in self.syncs.counts.items():
            counts[kind] = count - self._syncs_at_mark[kind]
        self.intervals.append(counts)
        self._profiler = None

    def per_step(self, first: int, last: int) -> dict[str, float]:
        """Average per step over the steps `first` .. `last` - 1 (from the start of one step to the
        start of the next: the data, the step, and whatever the loop does after it)."""
        chosen = self.intervals[first:last]
        kinds = set().union(*chosen)
        return {kind: sum(c[kind] for c in chosen) / len(chosen) for kind in kinds}
