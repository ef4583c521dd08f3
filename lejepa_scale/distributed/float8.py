"""Float8 training of the blocks' Linear layers with torchao, and the plain tensors checkpoints and
exports hold instead of its weight subclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def apply_float8(model: nn.Module, recipe: str, device: torch.device, all_gather: bool | None = None) -> None:
    """Float8 training for the blocks' Linear layers (torchao): `tensorwise` scales (and, with
    `all_gather` (default: on GPUs), FSDP2 all-gathers the weights in float8, which makes each block
    weight a torchao tensor subclass) or `rowwise` scales. Needs a GPU of compute capability 8.9+
    (H100, L40S, B200); on CPU torchao emulates it, which tests the wiring, not the speed."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"parallel.float8 needs a GPU of compute capability 8.9 or more (H100, L40S, B200); {name} has "
            "no float8 matmul units: set parallel.float8=false"
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
