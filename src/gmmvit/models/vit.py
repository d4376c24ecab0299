"""ViT for small datasets: timm's VisionTransformer with our attention passed in.

dim 192, depth 9, 12 heads of 16, MLP x2, qkv without bias, no class token, global average pooling
followed by LayerNorm and the linear head (timm's fc_norm): 2,692,042 parameters at 32x32 / 10 classes.
"""

from __future__ import annotations

from functools import partial

from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..attention import MaskedAttention
from . import register_model
from .common import init_as_linear_patch_embed, official_init, resolve_patch_size, share_drop_path


class MaskedBlock(Block):
    """timm's ViT block whose attention gets its own mask (timm passes no layer-specific arguments)."""

    def __init__(self, dim: int, num_heads: int, *args, mask_factory=None, grid: int = 0, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.attn = MaskedAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=self.attn.qkv.bias is not None,
            mask=mask_factory(grid, num_heads),
        )


@register_model("vit")
def vit(
    mask_factory,
    img_size: int = 32,
    num_classes: int = 10,
    patch_size: int | None = None,
    embed_dim: int = 192,
    depth: int = 9,
    num_heads: int = 12,
    mlp_ratio: float = 2.0,
    drop_path_rate: float = 0.1,
    tokens_per_side: int = 8,
):
    # The paper keeps an 8x8 token grid: patch 4 at 32 px, patch 8 at 64 px.
    patch_size = resolve_patch_size(img_size, patch_size, tokens_per_side)
    grid = img_size // patch_size
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=False,
        class_token=False,
        global_pool="avg",
        norm_layer=partial(nn.LayerNorm, eps=1e-5),  # the official eps (timm's default: 1e-6)
        block_fn=partial(MaskedBlock, mask_factory=mask_factory, grid=grid),
    )
    official_init(model, [model.pos_embed])
    init_as_linear_patch_embed(model.patch_embed.proj)  # the official embedding is a Linear
    share_drop_path(model, drop_path_rate)
    model.paper_depth = depth
    return model
