"""Every process group the project creates, in one place, with what it is for:

* the default group (`init_distributed`): NCCL between GPUs, gloo on CPUs; the training collectives;
* the device mesh (`build_mesh`): FSDP's ("dp_shard",) or HSDP's ("dp_replicate", "dp_shard"), once
  per process, reused by the SWA copy and the checkpointer;
* the control group (`control_group`, gloo): host-side agreements (stop? save?) and rank 0's word on
  the file system, never waiting on the accelerator;
* a checkpoint group per checkpointer (`new_checkpoint_group`, gloo): DCP's background writes run
  their own collectives, kept off the training group;
* HSDP replica groups (`replica_groups`, gloo): replica 0's ranks, which read a checkpoint, and each
  rank's group across replicas, which shares what lives on the host.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT as torchrun and submitit's TorchDistributedEnvironment export them). Without
    WORLD_SIZE this is a single process and no group is created. NCCL on GPUs, gloo on CPUs; a
    collective that waits longer than `timeout_minutes` fails instead of waiting forever (it must
    cover what some ranks do while the others wait: a rank-0 model build, a checkpoint read)."""
    cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = (
        torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        if cuda
        else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            device_id=device if cuda else None,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank, world_size, local_rank, device)


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of a task among those it sees: LOCAL_RANK when every GPU of the node is visible to
    every task, 0 when SLURM binds one GPU per task (`--gpus-per-task=1`, CUDA_VISIBLE_DEVICES set
    per task): LOCAL_RANK modulo the visible devices covers both."""
    return local_rank % max(1, visible)


_MESH: tuple[Any, tuple, DeviceMesh] | None = None  # (process group, shape, mesh): one per process


def build_mesh(env: DistEnv, dp_replicate: int) -> DeviceMesh:
    """1-D ("dp_shard",) for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP: replicate across
    groups of ranks (nodes), shard within a group. Built once per process group: the SWA copy and
    the checkpointer's replica groups reuse its communicators (each NCCL one holds GPU memory)."""
    global _MESH
    if env.world_size % dp_replicate:
        raise ValueError(
            f"parallel.dp_replicate={dp_replicate} does not divide the world size {env.world_size}"
        )
    shape = (dp_replicate, env.world_size // dp_replicate) if dp_replicate > 1 else (env.world_size,)
    if _MESH is not None and _MESH[0] is dist.group.WORLD and _MESH[1] == (env.device.type, shape):
        return _MESH[2]
    names = ("dp_replicate", "dp_shard") if dp_replicate > 1 else ("dp_shard",)
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
    _MESH = (dist.group.WORLD, (env.device.type, shape), mesh)
    return mesh


_CONTROL_GROUP = None


def control_group() -> dist.ProcessGroup:
    """The CPU (gloo) group of host-side agreements, created at its first use (every rank reaches
    it together)."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def new_checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for one checkpointer's DCP writes and reads (None without a process
    group): background saves run collectives of their own beside training."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def replica_groups(replica: int, replicas: int) -> tuple[Any, Any]:
    """Two gloo groups (cheap, CPU only): replica 0's ranks, which read a checkpoint, and this rank's
    group across replicas, which shares what lives on the host. Every rank creates every group."""
    shards = dist.get_world_size() // replicas
    read_group = dist.new_group(list(range(shards)), backend="gloo")
    across = [[shard + r * shards for r in range(replicas)] for shard in range(shards)]
    host_group, _ = dist.new_subgroups_by_enumeration(across, backend="gloo")
    return read_group if replica == 0 else None, host_group
