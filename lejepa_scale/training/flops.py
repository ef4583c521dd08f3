"""The FLOPs model of a LeJEPA step for timm ViTs (the trainer's MFU and its hang-timeout check, the
planner): the model's shape read on the meta device, and model FLOPs of forward + backward (3 x
forward, recomputation excluded): per block 2 x tokens x (matmul parameters) + 4 x tokens² x D for
attention, plus patch embedding and projector."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lejepa_scale.config import Config


@dataclass(frozen=True)
class ModelShape:
    params: int
    block_params: int
    depth: int
    width: int
    mlp_hidden: int
    patch: int
    prefix_tokens: int
    proj_hidden: int
    proj_dim: int
    proj_embed: int
    block_shapes: tuple[tuple[int, ...], ...] = ()  # each parameter's shape in one block
    root_shapes: tuple[tuple[int, ...], ...] = ()  # each parameter outside the blocks (FSDP's root)

    @classmethod
    def of(cls, model: nn.Module, cfg: Config) -> ModelShape:
        """The shape of a LeJEPA model (on any device, meta included, sharded or not); ValueError if its
        backbone is not a timm ViT."""
        backbone = model.backbone
        if not hasattr(backbone, "blocks") or not hasattr(backbone.blocks[0], "mlp"):
            raise ValueError(
                f"the planner models ViT backbones (timm VisionTransformer); {cfg.model.name} is not one"
            )
        block = backbone.blocks[0]
        in_blocks = {id(p) for b in backbone.blocks for p in b.parameters()}
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            block_params=sum(p.numel() for p in block.parameters()),
            depth=len(backbone.blocks),
            width=backbone.embed_dim,
            mlp_hidden=block.mlp.fc1.out_features,
            patch=backbone.patch_embed.patch_size[0],
            prefix_tokens=backbone.num_prefix_tokens,
            proj_hidden=cfg.model.proj_hidden_dim,
            proj_dim=cfg.model.proj_dim,
            proj_embed=cfg.model.proj_embed_dim,
            block_shapes=tuple(tuple(p.shape) for p in block.parameters()),
            root_shapes=tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks),
        )


def view_tokens(shape: ModelShape, cfg: Config) -> list[tuple[int, int]]:
    """(views, tokens per view) for the global and the local crops."""
    out = [(cfg.views.n_global, (cfg.views.global_size // shape.patch) ** 2 + shape.prefix_tokens)]
    if cfg.views.n_local:
        out.append((cfg.views.n_local, (cfg.views.local_size // shape.patch) ** 2 + shape.prefix_tokens))
    return out


def flops_per_sample(shape: ModelShape, cfg: Config) -> float:
    """Model FLOPs of forward + backward for one image (all its views)."""
    d, h = shape.width, shape.mlp_hidden
    block_matmul = 4 * d * d + 2 * d * h  # qkv (3 d²), projection (d²), MLP (2 d h)
    total = 0.0
    for views, tokens in view_tokens(shape, cfg):
        patches = tokens - shape.prefix_tokens
        block = 2 * tokens * block_matmul + 4 * tokens * tokens * d
        embed = 2 * patches * 3 * shape.patch**2 * d
        into_mlp = (
            d * shape.proj_embed + shape.proj_embed * shape.proj_hidden
            if shape.proj_embed
            else d * shape.proj_hidden
        )
        projector = 2 * (into_mlp + shape.proj_hidden**2 + shape.proj_hidden * shape.proj_dim)
        total += views * (shape.depth * block + embed + projector)
    return 3 * total


def step_flops(model: nn.Module, cfg: Config, samples: int) -> float | None:
    """Model FLOPs of one training step of `samples` images on one rank (forward + backward); None for
    non-ViT models."""
    try:
        return flops_per_sample(ModelShape.of(model, cfg), cfg) * samples
    except ValueError:
        return None
