"""One multi-head self-attention module that applies any locality mask inside any of the five models.

The order of operations follows the official code:

    logits = (q k^T) / sqrt(d_head)
    logits = logits * M            (multiplicative mask, patch-patch block only)
    logits = logits + B            (additive mask, then the host's bias: Swin's relative positions
                                    and shifted-window mask)
    logits = mix_heads(logits)     (CaiT's talking heads, pre-softmax)
    attn   = mix_heads(softmax(logits))
    out    = proj(attn v)

Without a multiplicative mask and without talking heads, everything additive is folded into one
``attn_mask`` of :func:`torch.nn.functional.scaled_dot_product_attention` (the fused path). The
explicit path computes the same thing step by step; ``fused=False`` forces it, and the tests hold
the two equal.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import LocalityMask

MaskFactory = Callable[[int, int], "LocalityMask | None"]  # (grid, num_heads) -> one layer's mask


class HeadMix(nn.Module):
    """Talking-heads mixing across heads: (B, H, I, J) -> (B, H, I, J), a bias-free H x H matrix
    drawn from N(0, 1), as the official CaiT (an nn.Linear would add a bias and count as MACs)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_heads, num_heads))

    def forward(self, x: Tensor) -> Tensor:
        return (x.permute(0, 2, 3, 1) @ self.weight).permute(0, 3, 1, 2)


class MaskedAttention(nn.Module):
    """Self-attention over ``num_prefix_tokens`` special tokens followed by a grid of patch tokens.

    Args:
        dim: token width.
        num_heads: heads.
        head_dim: per-head width; defaults to dim // num_heads (CaiT and T2T set it apart).
        dim_out: output width; defaults to dim.
        qkv_bias: bias on the q, k, v projection.
        mask: the layer's :class:`LocalityMask` (or None for the plain attention).
        num_prefix_tokens: leading special tokens whose rows and columns the mask leaves untouched.
        talking_heads: CaiT's pre- and post-softmax linear mixing across heads.
        fused: use scaled_dot_product_attention when the mask allows it.
        v_residual: T2T's token transformer adds v (single head) to the output, because its
            output width differs from its input width.
        qk_scale: logit scale; defaults to head_dim ** -0.5.
        **timm_kwargs: accepted for timm's ``attn_layer`` protocol; qk_norm / scale_norm must be off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mask: LocalityMask | None = None,
        num_prefix_tokens: int = 0,
        talking_heads: bool = False,
        fused: bool = True,
        v_residual: bool = False,
        qk_scale: float | None = None,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        norm_layer: object = None,
        **unused: object,
    ) -> None:
        super().__init__()
        if qk_norm or scale_norm:
            raise ValueError("MaskedAttention does not implement qk_norm / scale_norm")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.scale = qk_scale if qk_scale is not None else head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused = fused
        self.v_residual = v_residual
        if v_residual and num_heads != 1:
            raise ValueError("v_residual (T2T's token attention) needs a single head")

        self.qkv = nn.Linear(dim, self.inner_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.inner_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask = mask
        if mask is not None and mask.num_heads != num_heads:
            raise ValueError(f"mask has {mask.num_heads} heads, attention has {num_heads}")
        self.talking_heads = talking_heads
        if talking_heads:
            self.mix_pre, self.mix_post = HeadMix(num_heads), HeadMix(num_heads)

    def _padded_mask(self, n_tokens: int) -> tuple[Tensor | None, str | None]:
        """The mask over all tokens: neutral (1 or 0) on the special tokens' rows and columns."""
        if self.mask is None:
            return None, None
        m = self.mask()
        p = self.num_prefix_tokens
        if m.shape[-1] + p != n_tokens:
            raise ValueError(
                f"mask covers {m.shape[-1]} patch tokens + {p} special tokens, "
                f"but the layer sees {n_tokens} tokens"
            )
        combine = self.mask.combine
        if p:
            m = F.pad(m, (p, 0, p, 0), value=1.0 if combine == "mul" else 0.0)
        return m, combine

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, N, dim). attn_mask: an additive bias broadcastable to (B, H, N, N), or None."""
        if is_causal:
            raise ValueError("MaskedAttention is bidirectional: is_causal is not supported")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask, combine = self._padded_mask(N)
        dropout_p = self.attn_drop.p if self.training else 0.0

        if self.fused and combine != "mul" and not self.talking_heads:
            bias = attn_mask
            if mask is not None:
                bias = mask if bias is None else bias + mask
            if bias is not None:
                bias = bias.to(q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale
            )
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if combine == "mul":
                logits = logits * mask
            elif combine == "add":
                logits = logits + mask
            if attn_mask is not None:
                logits = logits + attn_mask
            if self.talking_heads:
                logits = self.mix_pre(logits)
            attn = logits.softmax(dim=-1)
            if self.talking_heads:
                attn = self.mix_post(attn)
            out = self.attn_drop(attn) @ v

        out = out.transpose(1, 2).reshape(B, N, self.inner_dim)
        if self.v_residual:
            # T2T token attention: the skip connection goes through v (its width is the output's).
            return v.squeeze(1) + self.proj_drop(self.proj(out))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, prefix={self.num_prefix_tokens}, "
            f"talking_heads={self.talking_heads}, fused={self.fused}"
        )
