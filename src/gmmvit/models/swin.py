"""Swin for small datasets: timm's SwinTransformer with our attention in every window.

embed 96, depths (2, 6, 4), heads (3, 6, 12), window 4, MLP x2, qkv bias; a 16x16 token grid
(patch 2 at 32 px, patch 4 at 64 px) merged to 8x8 and 4x4. As in the official code, a learned
absolute position embedding is added after the patch embedding (timm's Swin has none): 7,073,188
parameters at 32x32 / 10 classes. The mask sits in every window attention, on the 4x4 window grid.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import SwinTransformer, get_relative_position_index
from torch import Tensor, nn

from ..attention import MaskedAttention
from ..masks import LocalityMask
from . import register_model
from .common import check_divides, resolve_patch_size


class MaskedWindowAttention(MaskedAttention):
    """MaskedAttention inside one Swin window, owning Swin's relative position bias.

    The locality mask multiplies the logits first; the relative position bias and the
    shifted-window mask are then added, as in the official code. A mixture mask's positional
    attention (GPSA) gets the shifted-window mask too: it must not reach across the cyclic shift's
    seam either.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        mask: LocalityMask | None = None,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, mask=mask)
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index",
            get_relative_position_index(window_size, window_size),
            persistent=False,
        )

    def relative_position_bias(self) -> Tensor:
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B * windows, N, dim). mask: the shifted-window mask (windows, N, N) of 0 / -100 that
        timm's block passes by this name."""
        bias = self.relative_position_bias()[None]
        if mask is not None:
            # Windows are batch-major (b * windows + w): tile the per-window bias over the batch.
            num_windows = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(x.shape[0] // num_windows, 1, 1, 1)
        return super().forward(x, attn_mask=bias, window_mask=mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window_size}"


class PatchEmbedWithPosition(PatchEmbed):
    """timm's patch embedding (conv, LayerNorm, NHWC out) plus the official learned absolute
    position embedding; inside the embedding, every timm forward path (features, intermediates)
    gets it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.output_fmt.value != "NHWC":
            raise ValueError("PatchEmbedWithPosition expects Swin's NHWC output format")
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, self.proj.out_channels))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.pos_embed


@register_model("swin")
def swin(
    mask_factory,
    img_size: int = 32,
    num_classes: int = 10,
    patch_size: int | None = None,
    embed_dim: int = 96,
    depths: tuple[int, ...] = (2, 6, 4),
    num_heads: tuple[int, ...] = (3, 6, 12),
    window_size: int = 4,
    mlp_ratio: float = 2.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.1,
    tokens_per_side: int = 16,
) -> SwinTransformer:
    # The paper keeps a 16x16 token grid: patch 2 at 32 px, patch 4 at 64 px.
    patch_size = resolve_patch_size(img_size, patch_size, tokens_per_side)
    grid = img_size // patch_size
    # Each patch merging halves the grid; a stage wider than the window must tile into whole windows
    # (timm would pad silently). A stage narrower than the window gets one window of its own size.
    check_divides("token grid", grid, 2 ** (len(depths) - 1), "total patch-merging factor")
    for stage in range(len(depths)):
        side = grid // 2**stage
        if side > window_size:
            check_divides(f"stage {stage} token grid", side, window_size, "window size")

    model = SwinTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,  # timm's linear ramp 0 -> rate over the blocks, as official
        embed_layer=PatchEmbedWithPosition,
    )
    for stage, heads in zip(model.layers, num_heads):
        for block in stage.blocks:
            # timm shrinks the window to a stage narrower than it, and then stops shifting (as
            # official): at 32 px the 4x4 stage is one unshifted window.
            win_h, win_w = block.window_size
            if win_h != win_w:
                raise ValueError(f"square windows only, got {block.window_size}")
            block.attn = MaskedWindowAttention(
                block.dim, heads, win_h, qkv_bias=qkv_bias, mask=mask_factory(win_h, heads)
            )
    # timm's init again, for the new attention: trunc-normal(0.02) Linear weights, zero biases.
    model.init_weights(needs_reset=False)
    model.paper_depth = sum(depths)
    return model
