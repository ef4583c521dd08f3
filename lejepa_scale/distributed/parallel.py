"""Data parallelism applied to a LeJEPA model from outside: FSDP2 per transformer block then the
root (HSDP when the mesh has replicas), a bf16 mixed-precision policy, activation checkpointing,
optional per-block compile and float8, and initialisation that equals single-process
initialisation with the same seed on any world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lejepa_scale.distributed.float8 import apply_float8, plain_tensor
from lejepa_scale.distributed.process_groups import DistEnv

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
            from torchtitan.distributed.activation_checkpoint import SelectiveAC  # 0.5 s: only when used

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
    load: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Build the model and apply float8 (a recipe name, or None), AC, compile and FSDP. Without a
    mesh (single process) the model is built directly on the device. With one, every rank builds it
    on the meta device (no memory), shards it, allocates only its shards, and rank 0 broadcasts a
    full seeded initialisation: the result equals single-process init whatever the world size
    (sharded random init would repeat the same numbers on every rank of a CPU mesh). Without
    `initialize` (a resume: a checkpoint overwrites every parameter and persistent buffer) the shards
    are only allocated: no full build on rank 0, no broadcast. `load` puts weights from elsewhere
    over the seeded initialisation (in the one process, or into rank 0's model before the broadcast)."""

    def transform(model: nn.Module) -> None:  # float8, then AC, then compile, on any device
        if float8:
            apply_float8(model, float8, env.device, float8_all_gather)
        apply_activation_checkpointing(model, activation_checkpointing, ac_every)
        if compile:
            apply_compile(model)

    if mesh is None:
        model = build()
        if load is not None and initialize:
            load(model)
        model = model.to(env.device)
        transform(model)
        return model
    with torch.device("meta"):
        model = build()
    transform(model)
    apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    model.to_empty(device=env.device)
    if not initialize and not any(m._non_persistent_buffers_set for m in model.modules()):
        return model
    reference = build() if env.is_main else None
    if reference is not None and load is not None:
        load(reference)
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


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its shard under FSDP), any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, wrapper-free state dict on rank 0 (empty elsewhere), on CPU."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: plain_tensor(value) for name, value in full.items()}
