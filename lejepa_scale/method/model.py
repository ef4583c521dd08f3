"""A timm backbone plus LeJEPA's MLP projector. In a timm ViT every block runs once per pass on the
tokens of every crop size (global and local crops have different resolutions and cannot share a
tensor), so FSDP2 gathers each block's parameters once per pass, not once per crop size."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lejepa_scale.distributed.collectives import all_reduce_sum, default_group


@dataclass
class ModelOutput:
    """Backbone features (what probes use) and projector embeddings (what the loss sees), view-major."""

    features_global: torch.Tensor  # (Vg, B, D)
    z_global: torch.Tensor  # (Vg, B, K)
    z_local: torch.Tensor | None  # (Vl, B, K)


def create_backbone(name: str, *, img_size: int, drop_path: float = 0.0, **kwargs) -> nn.Module:
    """Any timm model without its classifier. ViT-like models get dynamic image size so that global
    and local crops of different resolutions share position embeddings (interpolated per forward).
    The keyword arguments timm took (besides the classifier and drop path) stay on the module as
    `timm_kwargs`: what `timm.create_model` needs to rebuild it elsewhere (an export)."""
    sized = {**kwargs, "img_size": img_size, "dynamic_img_size": True}
    try:
        backbone = timm.create_model(name, num_classes=0, drop_path_rate=drop_path, **sized)
        backbone.timm_kwargs = sized
    except TypeError:  # CNNs and other models that take any input size and no such arguments
        backbone = timm.create_model(name, num_classes=0, drop_path_rate=drop_path, **kwargs)
        backbone.timm_kwargs = dict(kwargs)
    return backbone


class EachInput:
    """Mixin for a transformer block: called with a list of token tensors (one per crop size), the
    block runs on each in turn within one module call. FSDP2's hooks fire per module call, so the
    block's parameters are gathered once for all crop sizes in forward and once in backward."""

    def forward(self, x, *args, **kwargs):
        forward = super().forward
        if isinstance(x, list | tuple):
            return [forward(tokens, *args, **kwargs) for tokens in x]
        return forward(x, *args, **kwargs)


@cache
def _each_input(cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"EachInput{cls.__name__}", (EachInput, cls), {})


def takes_token_lists(backbone: nn.Module) -> bool:
    """Whether `backbone` is a timm ViT whose feature path this module can run block by block: then
    its blocks learn to take lists of token tensors (the class of each block instance changes, as
    FSDP2's own fully_shard does; parameter names and checkpoints stay the same)."""
    if not isinstance(backbone, VisionTransformer) or (
        type(backbone).forward_features is not VisionTransformer.forward_features
    ):
        return False
    for block in backbone.blocks:
        block.__class__ = _each_input(type(block))
    return True


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch across data-parallel
    ranks (torch's SyncBatchNorm refuses CPU tensors), through the autograd-aware all-reduce; a
    plain BatchNorm1d in a single process or in eval mode. Statistics are computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = default_group()
        if group is None or not self.training:
            return super().forward(x)
        x32 = x.float()
        local = torch.cat([x32.sum(0), x32.square().sum(0), x32.new_full((1,), x.shape[0])])
        total = all_reduce_sum(local, group)
        n = total[-1]
        mean = total[: self.num_features] / n
        var = (total[self.num_features : 2 * self.num_features] / n - mean.square()).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.float() + self.bias.float() if self.affine else y


def mlp_projector(in_dim: int, hidden_dim: int, out_dim: int, embed_dim: int = 0) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear (the reference code's projector), BN over the global
    batch. The Linears before a BN have no bias: BN removes it, so it would only collect noise.
    With `embed_dim`, a Linear from the backbone width to that "embedding" comes first, as in the
    official code (timm's head Linear, then the MLP; no norm or activation between)."""
    embed = [nn.Linear(in_dim, embed_dim)] if embed_dim else []
    return nn.Sequential(
        *embed,
        nn.Linear(embed_dim or in_dim, hidden_dim, bias=False),
        GlobalBatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        GlobalBatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class LeJEPAModel(nn.Module):
    """Backbone + projector. A timm ViT runs each block once on the tokens of every crop size; other
    backbones (CNNs, ...) take one pass per crop size. The projector then sees all views' features
    at once, so its BatchNorm statistics span every view."""

    def __init__(
        self,
        name: str,
        *,
        img_size: int = 224,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_embed_dim: int = 0,
        drop_path: float = 0.0,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        self.backbone = create_backbone(
            name, img_size=img_size, drop_path=drop_path, **(backbone_kwargs or {})
        )
        self.projector = mlp_projector(self.backbone.num_features, proj_hidden_dim, proj_dim, proj_embed_dim)
        self.blocks_take_lists = takes_token_lists(self.backbone)

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone feature for probes (CLS token, or mean of patch tokens without CLS)."""
        return self.backbone(images)

    def encode(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pooled backbone features of each batch of same-size crops, in one pass through the blocks
        when the backbone allows it (timm's own ViT feature path, block by block)."""
        b = self.backbone
        if not self.blocks_take_lists:
            return [b(x) for x in crops]
        tokens = [b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x)))) for x in crops]
        for block in b.blocks:
            tokens = block(tokens)
        return [b.forward_head(b.norm(x)) for x in tokens]

    def forward(
        self,
        global_views: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        *,
        features: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        encode_only: bool = False,
    ) -> ModelOutput | tuple[torch.Tensor, torch.Tensor | None]:
        """global_views: (Vg, B, C, H, W); local_views: (Vl, B, C, h, w) or None. With `encode_only`,
        the backbone features (Vg, B, D) and (Vl, B, D) (or None); given `features`, the projector on
        them. Each is one call of the model, so a sharded model gathers its root for it (gradient
        accumulation calls the two halves apart)."""
        if features is None:
            n_global, batch = global_views.shape[:2]
            crops = [global_views.flatten(0, 1)] + (
                [local_views.flatten(0, 1)] if local_views is not None else []
            )
            feats = self.encode(crops)
            features = (feats[0].unflatten(0, (n_global, batch)),
                        feats[1].unflatten(0, (-1, batch)) if len(feats) > 1 else None)  # fmt: skip
            if encode_only:
                return features
        features_global, features_local = features
        n_global, batch = features_global.shape[:2]
        z = self.projector(torch.cat([f.flatten(0, 1) for f in features if f is not None]))
        # clones, not views: FSDP's backward hooks must not be bypassed by a later in-place op
        z_global, z_local = z[: n_global * batch], z[n_global * batch :]
        return ModelOutput(
            features_global=features_global.clone(),
            z_global=z_global.unflatten(0, (n_global, batch)).clone(),
            z_local=z_local.unflatten(0, (-1, batch)).clone() if features_local is not None else None,
        )
