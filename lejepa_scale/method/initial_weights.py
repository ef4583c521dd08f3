"""Where a fresh run's weights start when not from its seed: `model.init_from` (public or exported
weights for the backbone) and `checkpoint.load_from` (another run's whole model). Tensors whose
shape differs only by the patch grid, the position embeddings, are resampled to the model's grid
(timm's `resample_abs_pos_embed`): a run at a new `views.global_size` continues from one at
another, as a high-resolution phase does. One line says what loaded and what did not."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from lejepa_scale.checkpointing.checkpoint import resolve_checkpoint
from lejepa_scale.checkpointing.safe_loading import read_model_tensors
from lejepa_scale.config import ConfigError

log = logging.getLogger(__name__)


def backbone_weights(source: str) -> dict[str, torch.Tensor]:
    """The backbone state `model.init_from` names: a file (safetensors, or a torch save of a state
    dict: timm's, this project's export, a run's model.pt), a run or step directory (its checkpoint),
    or `timm:NAME` (timm's pretrained weights for that model, from its cache or the hub)."""
    if source.startswith("timm:"):
        return timm.create_model(source.removeprefix("timm:"), pretrained=True, num_classes=0).state_dict()
    path = Path(source)
    if path.is_dir():
        state = read_model_tensors(resolve_checkpoint(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))  # timm training checkpoints nest it
    else:
        raise ConfigError(f"model.init_from {source}: not a weights file, a run directory or timm:NAME")
    if any(key.startswith("backbone.") for key in state):  # a whole LeJEPA model: its backbone
        state = {
            key.removeprefix("backbone."): value
            for key, value in state.items()
            if key.startswith("backbone.")
        }
    return state


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`state` into `module` as far as it fits, position embeddings resampled to `module`'s grid;
    logs what loaded, what was resampled, what did not fit and what stayed as initialised."""
    target, loaded, resampled, mismatched = module.state_dict(), {}, [], []
    for name, tensor in state.items():
        if name not in target:
            continue
        want = target[name]
        if tensor.shape == want.shape:
            loaded[name] = tensor
        elif (
            name.endswith("pos_embed")
            and tensor.dim() == want.dim() == 3
            and tensor.shape[-1] == want.shape[-1]
        ):
            loaded[name] = resample_grid(tensor, want.shape[1], prefix_tokens(module, name))
            resampled.append(f"{name} {tuple(tensor.shape)} -> {tuple(want.shape)}")
        else:
            mismatched.append(f"{name} {tuple(tensor.shape)} vs {tuple(want.shape)}")
    module.load_state_dict(loaded, strict=False)
    unused = [name for name in state if name not in target]
    kept = [name for name in target if name not in loaded]
    log.info("%s: loaded %d of the model's %d tensors%s%s; not in the model: %s; as initialised: %s", what,
             len(loaded), len(target), f"; resampled {', '.join(resampled)}" if resampled else "",
             f"; shapes differ: {', '.join(mismatched)}" if mismatched else "", summary(unused),
             summary(kept))  # fmt: skip


def prefix_tokens(module: nn.Module, name: str) -> int:
    """The class and register tokens a position embedding covers (none when timm adds them apart)."""
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return 0 if getattr(owner, "no_embed_class", False) else getattr(owner, "num_prefix_tokens", 0)


def resample_grid(pos_embed: torch.Tensor, tokens: int, prefix: int) -> torch.Tensor:
    """(1, prefix + h*w, D) position embeddings on a square grid resampled to `tokens` in all."""
    old, new = math.isqrt(pos_embed.shape[1] - prefix), math.isqrt(tokens - prefix)
    return resample_abs_pos_embed(
        pos_embed, new_size=[new, new], old_size=[old, old], num_prefix_tokens=prefix
    )


def summary(names: list[str]) -> str:
    return (
        "none"
        if not names
        else ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    )
