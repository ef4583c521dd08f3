"""How a background save copies the training state to host memory before it is written."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions


def stager_for(device: torch.device) -> AsyncStager:
    """How a background save copies the state to host memory. On GPUs: DCP's stager with pinned
    buffers allocated on the first save and reused after, non-blocking copies on a side stream, in
    its own thread. On CPUs (where pinned memory and side streams do not exist): a plain copy in a
    background thread. Either way the loop waits for the copy only right before optimizer.step."""
    if device.type == "cuda":
        return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                            use_async_staging=True, use_non_blocking_copy=True))  # fmt: skip
    return BackgroundStager()


class BackgroundStager(AsyncStager):
    """DCP's own copy of the state to fresh CPU memory, run in a background thread, so the loop
    only waits for it right before it next mutates parameters or optimizer state (optimizer.step)."""

    _synchronize_after_execute = False

    def __init__(self):
        self._copy = DefaultStager(StagingOptions(False, False, False, False))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-staging")

    def stage(self, state_dict):
        return self._pool.submit(self._copy.stage, state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._copy.close()
