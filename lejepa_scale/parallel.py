"""Data parallelism applied to a LeJEPA model from outside: process group and device mesh from the
environment (torchrun or SLURM), FSDP2 per transformer block then the root (HSDP when replicas are
configured), a bf16 mixed-precision policy, activation checkpointing, optional per-block compile,
and initialisation that equals single-process initialisation with the same seed on any world size.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.distributed.activation_checkpoint import SelectiveAC

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


@contextmanager
def host_syncs_fail(enabled: bool, device: torch.device) -> Iterator[None]:
    """`train.sync_debug`: inside, any host sync on a CUDA device raises (torch's sync debug mode);
    outside (logging, control steps, saves, barriers: the loop's planned syncs) it is off. The
    mode is process-wide: the checkpointer's staging thread is waited for outside."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


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


def repeated_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, block) for the backbone's repeated blocks: the units to wrap for
    checkpointing and FSDP (ViT `blocks`, CNN `stages`/`layers`)."""
    backbone = getattr(model, "backbone", model)
    for name in ("blocks", "stages", "layers"):
        container = getattr(backbone, name, None)
        if isinstance(container, nn.Sequential | nn.ModuleList):
            return [(container, str(i), block) for i, block in enumerate(container)]
    return []


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    """Recompute block activations in backward: `full` wraps every block, `selective` every
    `every`-th block (a memory/compute trade-off between none and full), `op` every block with
    torchtitan's op-level selective checkpointing (matmul and attention outputs are kept, the cheap
    elementwise ops, norms and activations are recomputed; timm's Linears run as aten.addmm, which
    its save list holds)."""
    if mode == "none":
        return
    if mode == "op":
        units = repeated_blocks(model)
        if units:  # torchtitan wraps the children of a `.layers` attribute: hand it the block container
            holder = nn.Module()
            holder.layers = units[0][0]
            SelectiveAC(SelectiveAC.Config(force_recompute_mm_shapes_by_fqns=[])).apply(holder)
        return
    for i, (parent, name, block) in enumerate(repeated_blocks(model)):
        if mode == "full" or i % every == 0:
            setattr(parent, name, checkpoint_wrapper(block, preserve_rng_state=True))


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (its state-dict keys stay as they are). Every block has
    the same graph, and each runs once per pass on all crop sizes at their fixed shapes, so one
    static graph is compiled and reused."""
    for _, _, block in repeated_blocks(model):
        block.compile()


def apply_float8(model: nn.Module, recipe: str, device: torch.device, all_gather: bool | None = None) -> None:
    """Float8 training for the blocks' Linear layers (torchao): `tensorwise` scales (and, with
    `all_gather` (default: on GPUs), FSDP2 all-gathers the weights in float8, which makes each block
    weight a torchao tensor subclass) or `rowwise` scales. Needs a GPU of compute capability 8.9+
    (H100, L40S, B200); on CPU torchao emulates it, which tests the wiring, not the speed."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"train.float8 needs a GPU of compute capability 8.9 or more (H100, L40S, B200); {name} has "
            "no float8 matmul units: set train.float8=false"
        )
    config = Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(
        config,
        emulate=device.type != "cuda",
        enable_fsdp_float8_all_gather=recipe == "tensorwise"
        and (device.type == "cuda" if all_gather is None else all_gather),
    )

    def blocks_only(module: nn.Module, fqn: str) -> bool:  # float8 matmuls want dimensions divisible by 16
        in_dims_ok = isinstance(module, nn.Linear) and module.in_features % 16 == 0
        return in_dims_ok and module.out_features % 16 == 0 and ".blocks." in f".{fqn}"

    convert_to_float8_training(model, config=config, module_filter_fn=blocks_only)


def float8_scale_update(model: nn.Module) -> Callable[[], None] | None:
    """With float8 all-gathers: after each update, the scales of every float8 weight in one amax
    all-reduce (torchao's precompute), instead of one all-reduce per weight at each all-gather."""
    if not any(is_float8_weight(p) for p in model.parameters()):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    return lambda: precompute_float8_dynamic_scale_for_fsdp(model)


def is_float8_weight(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (or a DTensor's shard) is torchao's float8-gathered weight subclass."""
    local = tensor._local_tensor if isinstance(tensor, DTensor) else tensor
    return type(local).__module__.startswith("torchao.float8")


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The high-precision tensor inside a float8 weight subclass (sharing its storage), a DTensor
    kept a DTensor; any other tensor as it is. Checkpoints and exports hold plain tensors: loadable
    without torchao, and DCP's stager copies them (it cannot copy the subclass)."""
    if not is_float8_weight(tensor):
        return tensor
    if isinstance(tensor, DTensor):
        return DTensor.from_local(plain_tensor(tensor._local_tensor), tensor.device_mesh, tensor.placements,
                                  run_check=False, shape=tensor.shape, stride=tensor.stride())  # fmt: skip
    return tensor._tensor


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, param_dtype: str, reduce_dtype: str, reshard: bool
) -> None:
    """fully_shard each block, then the root (which holds embeddings, norms and the projector). The
    root keeps its parameters gathered from forward to backward: backward starts with it, so
    resharding would only gather them again at once."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for _, _, block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def parallelize(
    build: Callable[[], nn.Module],
    env: DistEnv,
    mesh: DeviceMesh | None,
    *,
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    activation_checkpointing: str = "none",
    ac_every: int = 1,
    compile: bool = False,
    reshard_after_forward: bool = True,
    float8: str | None = None,
    float8_all_gather: bool | None = None,
    initialize: bool = True,
) -> nn.Module:
    """Build the model and apply float8 (a recipe name, or None), AC, compile and FSDP. Without a
    mesh (single process) the model is built directly on the device. With one, every rank builds it
    on the meta device (no memory), shards it, allocates only its shards, and rank 0 broadcasts a
    full seeded initialisation: the result equals single-process init whatever the world size
    (sharded random init would repeat the same numbers on every rank of a CPU mesh). Without
    `initialize` (a resume: a checkpoint overwrites every parameter and persistent buffer) the shards
    are only allocated: no full build on rank 0, no broadcast."""
    if mesh is None:
        model = build().to(env.device)
        if float8:
            apply_float8(model, float8, env.device, float8_all_gather)
        apply_activation_checkpointing(model, activation_checkpointing, ac_every)
        if compile:
            apply_compile(model)
        return model
    with torch.device("meta"):
        model = build()
    if float8:
        apply_float8(model, float8, env.device, float8_all_gather)
    apply_activation_checkpointing(model, activation_checkpointing, ac_every)
    if compile:
        apply_compile(model)
    apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    model.to_empty(device=env.device)
    if not initialize and not any(m._non_persistent_buffers_set for m in model.modules()):
        return model
    reference = build() if env.is_main else None
    full = reference.state_dict() if env.is_main else {}
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    _broadcast_buffers(model, reference)
    return model


def _broadcast_buffers(model: nn.Module, reference: nn.Module | None) -> None:
    """Buffers (persistent or not) are plain replicated tensors under FSDP: rank 0 copies them from
    its freshly built reference model, then broadcasts."""
    wrapped = "_checkpoint_wrapped_module."
    source = dict(reference.named_buffers()) if reference is not None else {}
    for name, buffer in model.named_buffers():
        if reference is not None:
            buffer.copy_(source[name.replace(wrapped, "")])
        dist.broadcast(buffer, src=0)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, wrapper-free state dict on rank 0 (empty elsewhere), on CPU."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: plain_tensor(value) for name, value in full.items()}
