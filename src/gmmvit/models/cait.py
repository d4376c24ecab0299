"""CaiT for small datasets, written on timm layers: the official code's ``cait-tiny`` configuration.

gmmvit's ``cait`` is what the official code calls ``cait-tiny`` (dim 108, 5.1M parameters: the
model of the paper's table), not its ``cait`` (dim 192), which the paper does not report.

dim 108, 24 patch self-attention layers then 2 class-attention layers, 4 heads of 64 (inner width
256), MLP hidden 384, talking heads, LayerScale, no class token in the patch layers:
5,078,834 parameters at 32x32 / 10 classes, exactly the official count.

Structure of the official code (checked by the parameter count and the paper-convention MACs):
- patch embedding: a Linear on flattened patches (pixel order row, column, channel), then a learned
  position embedding added to the patch tokens;
- patch layers: pre-norm, talking-heads self-attention and MLP, each scaled by LayerScale;
- class layers: only the class token is updated; it is normalised and queries the raw (not
  normalised) patch tokens, which are the keys and values alone (the class token does not attend
  to itself); talking heads, LayerScale and an MLP on the class token;
- head: LayerNorm then Linear on the class token.
timm's Cait ties head_dim to dim / heads and normalises [class, patches] jointly, hence this file.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from ..attention import HeadMix, MaskedAttention
from . import register_model
from .common import official_init, resolve_patch_size


def layer_scale_value(index: int) -> float:
    """The official initial LayerScale of the block at 1-based ``index`` (CaiT paper, section 2)."""
    return 0.1 if index <= 18 else 1e-5 if index <= 24 else 1e-6


class LinearPatchEmbed(nn.Module):
    """Non-overlapping patches flattened as (p1 p2 c), projected by a Linear (official code).

    A Conv2d would compute the same function, but xavier-normal sees a different fan-out on a
    conv weight (out * p * p) and the paper-convention count charges its bias per position.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size * patch_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.proj(x.reshape(B, (H // p) * (W // p), p * p * C))


class TalkingHeadsBlock(nn.Module):
    """A patch self-attention layer: the locality mask multiplies the logits before the pre-softmax
    head mixing (MaskedAttention's order)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden_dim: int,
        init_value: float,
        drop_path: nn.Module,
        mask=None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            qkv_bias=False,
            talking_heads=True,
            mask=mask,
        )
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim)
        self.ls2 = LayerScale(dim, init_value)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class ClassAttention(nn.Module):
    """Talking-heads attention: only the class token queries, the patches are keys and values."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, self.inner_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * self.inner_dim, bias=False)
        self.mix_pre, self.mix_post = HeadMix(num_heads), HeadMix(num_heads)
        self.proj = nn.Linear(self.inner_dim, dim)

    def forward(self, cls: Tensor, context: Tensor) -> Tensor:
        B, N, _ = context.shape
        q = self.q(cls).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(B, N, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        logits = self.mix_pre((q * self.scale) @ k.transpose(-2, -1))  # (B, H, 1, N)
        attn = self.mix_post(logits.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, 1, self.inner_dim))


class ClassAttentionBlock(nn.Module):
    """Updates the class token only; the patch tokens enter un-normalised (official code)."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, mlp_hidden_dim: int, init_value: float,
        drop_path: nn.Module,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, head_dim)
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim)
        self.ls2 = LayerScale(dim, init_value)
        self.drop_path = drop_path

    def forward(self, cls: Tensor, patches: Tensor) -> Tensor:
        cls = cls + self.drop_path(self.ls1(self.attn(self.norm1(cls), patches)))
        return cls + self.drop_path(self.ls2(self.mlp(self.norm2(cls))))


class CaiT(nn.Module):
    def __init__(
        self,
        mask_factory,
        img_size: int,
        patch_size: int,
        num_classes: int,
        embed_dim: int,
        depth: int,
        cls_depth: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden_dim: int,
        drop_path_rate: float,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embed = LinearPatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # The official code's DropPath has a constant rate and no state: one module serves all.
        drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            TalkingHeadsBlock(
                embed_dim, num_heads, head_dim, mlp_hidden_dim, layer_scale_value(i + 1), drop_path,
                mask=mask_factory(self.grid, num_heads),
            )
            for i in range(depth)
        )
        # The class layers are their own stack in the official code: LayerScale restarts at block 1.
        self.cls_blocks = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim, num_heads, head_dim, mlp_hidden_dim, layer_scale_value(i + 1), drop_path
            )
            for i in range(cls_depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_official()

    def _init_official(self) -> None:
        official_init(self, [self.pos_embed, self.cls_token])
        # The official q and kv are two Linears: xavier's fans are those of each part, not of qkv.
        for block in self.blocks:
            w, inner = block.attn.qkv.weight, block.attn.inner_dim
            nn.init.xavier_normal_(w[:inner])
            nn.init.xavier_normal_(w[inner:])

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.cls_blocks:
            cls = block(cls, x)
        return self.head(self.norm(cls[:, 0]))


@register_model("cait")
def cait(
    mask_factory,
    img_size: int = 32,
    num_classes: int = 10,
    patch_size: int | None = None,
    embed_dim: int = 108,
    depth: int = 24,
    cls_depth: int = 2,
    num_heads: int = 4,
    head_dim: int = 64,
    mlp_hidden_dim: int = 384,
    drop_path_rate: float = 0.1,
    tokens_per_side: int = 8,
) -> nn.Module:
    """The official ``cait-tiny`` (not the official ``cait``, dim 192): dim 108, 5.1M parameters."""
    # The paper keeps an 8x8 token grid: patch 4 at 32 px, patch 8 at 64 px.
    patch_size = resolve_patch_size(img_size, patch_size, tokens_per_side)
    model = CaiT(
        mask_factory,
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        cls_depth=cls_depth,
        num_heads=num_heads,
        head_dim=head_dim,
        mlp_hidden_dim=mlp_hidden_dim,
        drop_path_rate=drop_path_rate,
    )
    model.paper_depth = depth + cls_depth
    return model
