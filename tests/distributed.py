"""Run a function on N real gloo ranks (torch.multiprocessing spawn) and collect what each returns."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    # the rendezvous through a file, not a TCP port: a port picked free can be taken by another
    # test's processes before rank 0 listens on it (EADDRINUSE, seen with two test workers)
    store = f"file://{out_dir}/rendezvous"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The result is written: skip the interpreter's teardown, where a gloo thread still being torn
    # down once aborted a finished rank ("terminate called without an active exception", SIGABRT).
    os._exit(0)


def run_ranks(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on `world_size` processes in one gloo group; returns their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry,
            args=(world_size, out_dir, fn, args),
            nprocs=world_size,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
