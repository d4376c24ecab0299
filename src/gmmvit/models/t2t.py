"""T2T-ViT for small datasets (the SPT/LSA code's configuration), written on timm layers.

Tokens-to-token module: soft split (3x3 unfold, stride 2, padding 1) of the image, then per token
transformer (one at 32 px, two at 64 px: the backbone grid stays 8x8) a single-head attention layer
whose skip goes through v, a re-shape to the grid and another soft split; a Linear projects the
576-dim tokens to 256. Backbone: 12 blocks, 4 heads of 64, MLP x2, a fixed sinusoid position
table, LayerNorm, global average pooling (no class token), linear head.
6,484,672 parameters at 32x32 / 10 classes; the official count, 6,486,080, also holds two tensors
its forward never uses (a LayerNorm(576) in the T2T module: 1,152; the class token: 256).

Two quirks of the official code, kept because they produced the published numbers:
- the token transformer's logit scale is (input width) ** -0.5 (27 ** -0.5, 576 ** -0.5), not
  head_dim ** -0.5;
- the backbone blocks run the token attention class too (a name clash in the official file), whose
  multi-head branch adds its input to its output: x + DropPath(attn(LN(x)) + LN(x)).
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from ..attention import MaskedAttention
from . import register_model
from .common import check_divides
from .vit import MaskedBlock


def sinusoid_table(n_position: int, dim: int) -> Tensor:
    """T2T-ViT's fixed (1, n_position, dim) position table: sin on even, cos on odd channels."""
    # All in float64 as the official numpy table (a float32 exponent leaves it 2e-6 off), then cast.
    position = torch.arange(n_position, dtype=torch.float64)[:, None]
    channel = torch.arange(dim, dtype=torch.float64)
    angle = position / 10000.0 ** (2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    table = torch.where(channel % 2 == 0, angle.sin(), angle.cos())
    return table.float()[None]


class TokenTransformer(nn.Module):
    """One single-head layer of the T2T module: in_dim -> token_dim, the skip goes through v."""

    def __init__(self, in_dim: int, token_dim: int, mlp_ratio: float = 1.0, mask=None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = MaskedAttention(
            in_dim,
            num_heads=1,
            head_dim=token_dim,
            dim_out=token_dim,
            qkv_bias=False,
            v_residual=True,
            qk_scale=in_dim**-0.5,  # official: scaled by the input width, not the head width
            mask=mask,
        )
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, int(token_dim * mlp_ratio), token_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))  # no outer skip: the widths differ, v carries it
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """Soft split, (token transformer, re-structure, soft split) x n, projection to embed_dim."""

    def __init__(
        self, mask_factory, img_size: int, num_token_layers: int, in_chans: int, token_dim: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.soft_split = nn.Unfold(kernel_size=3, stride=2, padding=1)  # stateless: one serves all
        self.grids: list[int] = []
        layers, in_dim, grid = [], in_chans * 9, img_size // 2
        for _ in range(num_token_layers):
            layers.append(TokenTransformer(in_dim, token_dim, mask=mask_factory(grid, 1)))
            self.grids.append(grid)
            in_dim, grid = token_dim * 9, grid // 2
        self.token_layers = nn.ModuleList(layers)
        self.project = nn.Linear(token_dim * 9, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.soft_split(x).transpose(1, 2)
        for layer, grid in zip(self.token_layers, self.grids):
            x = layer(x)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)
            x = self.soft_split(x).transpose(1, 2)
        return self.project(x)


class T2TBlock(MaskedBlock):
    """timm's block with the official T2T backbone's extra skip: the attention branch carries its
    normalised input too (set attn_adds_input=False for the textbook block)."""

    def __init__(self, *args, attn_adds_input: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn_adds_input = attn_adds_input

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, **unused: object) -> Tensor:
        h = self.norm1(x)
        branch = self.attn(h, attn_mask=attn_mask)
        if self.attn_adds_input:
            branch = branch + h
        x = x + self.drop_path1(self.ls1(branch))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class T2TViT(nn.Module):
    def __init__(
        self,
        mask_factory,
        img_size: int,
        num_classes: int,
        num_token_layers: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        token_dim: int,
        drop_path_rate: float,
        attn_adds_input: bool,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.tokens_to_token = T2TModule(
            mask_factory, img_size, num_token_layers, in_chans, token_dim, embed_dim
        )
        self.grid = img_size // 2 ** (num_token_layers + 1)
        num_patches = self.grid * self.grid
        # Fixed, not learned (a frozen Parameter in the official code): derived, so not saved.
        self.register_buffer("pos_embed", sinusoid_table(num_patches, embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # timm's linear ramp
        self.blocks = nn.ModuleList(
            T2TBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=False,
                drop_path=rate,
                norm_layer=nn.LayerNorm,
                mask_factory=mask_factory,
                grid=self.grid,
                attn_adds_input=attn_adds_input,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # timm-style, as the official T2T: mask parameters keep their own initialisation.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.tokens_to_token(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


@register_model("t2t")
def t2t(
    mask_factory,
    img_size: int = 32,
    num_classes: int = 10,
    embed_dim: int = 256,
    depth: int = 12,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    token_dim: int = 64,
    drop_path_rate: float = 0.1,
    tokens_per_side: int = 8,
    attn_adds_input: bool = True,
) -> nn.Module:
    # Each soft split halves the grid; as many token transformers as it takes to reach 8x8
    # (one at 32 px, two at 64 px), so img_size must be tokens_per_side * 2^(n + 1), n >= 1.
    check_divides("image size", img_size, 4 * tokens_per_side, "smallest T2T input side")
    ratio = img_size // tokens_per_side
    if ratio & (ratio - 1):
        raise ValueError(
            f"image size {img_size} must be {tokens_per_side} times a power of two "
            f"(each soft split halves the grid down to {tokens_per_side}x{tokens_per_side})"
        )
    num_token_layers = int(math.log2(ratio)) - 1
    model = T2TViT(
        mask_factory,
        img_size=img_size,
        num_classes=num_classes,
        num_token_layers=num_token_layers,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        token_dim=token_dim,
        drop_path_rate=drop_path_rate,
        attn_adds_input=attn_adds_input,
    )
    model.paper_depth = depth + num_token_layers
    return model
