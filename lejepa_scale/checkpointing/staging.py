"""How a background save copies the training state to host memory before it is written."""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions


def stager_for(device: torch.device) -> AsyncStager:
    """How a background save copies the state to host memory. On GPUs: DCP's stager with pinned
    buffers allocated on the first save and reused after, non-blocking copies on a side stream, in
    its own thread. On CPUs (where pinned memory and side streams do not exist): a plain copy in a
    background thread. Either way the loop waits for the copy only right before optimizer.step."""
    if device.type == "cuda":
        return ReusedStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                           use_async_staging=True, use_non_blocking_copy=True))  # fmt: skip
    return BackgroundStager()


@functools.cache
def default_stager_reusable() -> bool:
    """Whether one DCP DefaultStager can stage twice. torch 2.11's closes its copier at the end of
    each copy (pytorch#183413): the second save fails with `KeyError: <class 'type'>` (found on the
    first GPU run of gpu_check, torch 2.11.0+cu130)."""
    probe = DefaultStager(StagingOptions(False, False, False, False))
    try:
        probe.stage({"probe": [1]})
        probe.stage({"probe": [1]})
        return True
    except KeyError:
        return False
    finally:
        probe.close()


class ReusedStager(AsyncStager):
    """DCP's DefaultStager kept from save to save (and with it its pinned host buffers), or a new
    one for each save where torch cannot reuse it (`default_stager_reusable`)."""

    _synchronize_after_execute = False

    def __init__(self, options: StagingOptions, reusable: bool | None = None):
        self.options = options
        self.reusable = default_stager_reusable() if reusable is None else reusable
        self.stager, self.staged = DefaultStager(options), False

    def stage(self, state_dict):
        if self.staged and not self.reusable:  # the previous copy is done: the loop waited for it
            self.stager.close()
            self.stager = DefaultStager(self.options)
        self.staged = True
        return self.stager.stage(state_dict)

    def synchronize_staging(self) -> None:
        self.stager.synchronize_staging()

    def close(self) -> None:
        self.stager.close()


class BackgroundStager(ReusedStager):
    """DCP's own copy of the state to fresh CPU memory, run in a background thread, so the loop
    only waits for it right before it next mutates parameters or optimizer state (optimizer.step)."""

    def __init__(self, reusable: bool | None = None):
        super().__init__(StagingOptions(False, False, False, False), reusable)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-staging")

    def stage(self, state_dict) -> Future:
        return self.pool.submit(super().stage, state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        super().close()
