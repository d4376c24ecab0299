"""PiT for small datasets: timm's PoolingVisionTransformer with our attention, adapted to the
official code.

base 96 channels, heads (2, 4, 8), depth (2, 6, 4), head dim 48 (widths 96, 192, 384), MLP x2, a
class token; a 16x16 token grid (patch 2 at 32 px, patch 4 at 64 px, non-overlapping) pooled to 8x8
and 4x4: 6,972,586 parameters at 32x32 / 10 classes. Where timm's PiT differs from the official
code, it is adapted here: qkv without bias, a pointwise 1x1 conv after the depthwise pooling conv,
a position embedding for the class token too, LayerNorm eps 1e-5. The mask is in every layer of
every stage, on that stage's grid, patch-patch block only (the last layer's mask gets no gradient:
only the class token leaves that layer, and its row is unmasked; as in the official code).
"""

from __future__ import annotations

import torch
from timm.models.pit import PoolingVisionTransformer
from torch import Tensor, nn

from ..attention import MaskedAttention
from . import register_model
from .common import official_init, resolve_patch_size, share_drop_path


class OfficialPiT(PoolingVisionTransformer):
    """timm's PiT plus the official code's position embedding for the class token (timm adds its
    position embedding to the patch map only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cls_pos_embed = nn.Parameter(torch.zeros_like(self.cls_token))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        cls_tokens = (self.cls_token + self.cls_pos_embed).expand(x.shape[0], -1, -1)
        _, cls_tokens = self.transformers((x, cls_tokens))
        return self.norm(cls_tokens)

    def forward_intermediates(self, *args, **kwargs):
        # timm's version would silently skip the class-token position embedding.
        raise NotImplementedError("forward_intermediates is not adapted to OfficialPiT")


def pooled_side(side: int) -> int:
    """Token grid side after PiT's pooling conv (kernel 3, stride 2, padding 1)."""
    return (side + 2 - 3) // 2 + 1


@register_model("pit")
def pit(
    mask_factory,
    img_size: int = 32,
    num_classes: int = 10,
    patch_size: int | None = None,
    base_dim: int = 48,
    depth: tuple[int, ...] = (2, 6, 4),
    heads: tuple[int, ...] = (2, 4, 8),
    mlp_ratio: float = 2.0,
    drop_path_rate: float = 0.1,
    tokens_per_side: int = 16,
) -> OfficialPiT:
    # The paper keeps a 16x16 token grid: patch 2 at 32 px, patch 4 at 64 px.
    patch_size = resolve_patch_size(img_size, patch_size, tokens_per_side)

    model = OfficialPiT(
        img_size=img_size,
        patch_size=patch_size,
        stride=patch_size,  # the official embedding is non-overlapping (timm's default overlaps)
        base_dims=[base_dim] * len(depth),
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
    )
    grid = img_size // patch_size
    for index, (stage, num_heads) in enumerate(zip(model.transformers, heads)):
        if index > 0:
            grid = pooled_side(grid)
            # The official pooling is depthwise conv then pointwise 1x1 conv; timm's has no 1x1.
            width = stage.pool.conv.out_channels
            stage.pool.conv = nn.Sequential(stage.pool.conv, nn.Conv2d(width, width, kernel_size=1))
        dim = base_dim * num_heads
        for block in stage.blocks:
            block.attn = MaskedAttention(
                dim,
                num_heads=num_heads,
                qkv_bias=False,  # official: no qkv bias (timm's PiT has one)
                mask=mask_factory(grid, num_heads),
                num_prefix_tokens=1,  # the class token's row and column stay unmasked
            )
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-5  # official nn.LayerNorm default (timm's PiT blocks use 1e-6)
    official_init(model, [model.pos_embed, model.cls_token, model.cls_pos_embed])
    share_drop_path(model, drop_path_rate)
    model.paper_depth = sum(depth)
    return model
