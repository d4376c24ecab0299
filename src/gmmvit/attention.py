"""One multi-head self-attention module that applies any locality mask inside any of the five models.

The order of operations follows the official code:

    logits = (q k^T) / sqrt(d_head)
    logits = logits * M            (multiplicative mask, patch-patch block only)
    logits = logits + B            (additive mask, then the host's bias: Swin's relative positions
                                    and shifted-window mask)
    logits = mix_heads(logits)     (CaiT's talking heads, pre-softmax)
    logits[blocked] = -inf         (pairs a mask blocks: LSA's own-token logits)
    attn   = mix_heads(softmax(logits))
    out    = attn v
    out    = (1 - g) out + g (P v) (a mixture mask, ConViT's GPSA: positional attention P, gate g)
    out    = proj(out)

Without talking heads, and with no multiplicative mask or only a per-head factor (H, 1, 1) on a
layer without special tokens (a temperature: folded into q, PAPER.md), everything else is folded
into one ``attn_mask`` of :func:`torch.nn.functional.scaled_dot_product_attention` (the fused
path). The explicit path computes the same thing step by step; ``fused=False`` forces it, and the
tests hold the two equal. A mixture changes neither: its positional part is added to either path's
output, so both count the same products (q.k^T, attn.v and P.v).

Special tokens (``num_prefix_tokens``, e.g. a class token), for every family: their rows and columns
are never masked. A factor is 1 there, a bias 0, nothing is blocked; a mixture gives their rows
g = 0 (the content attention alone) and its P covers the patch keys only (zero on special keys).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import LocalityMask

MaskFactory = Callable[[int, int], "LocalityMask | None"]  # (grid, num_heads) -> one layer's mask


def init_masked_attention(model: nn.Module) -> nn.Module:
    """Let every layer's mask initialise its attention's weights (:meth:`LocalityMask.init_attention`,
    e.g. GPSA's identity v). Run it after the model's own initialisation: every model here redraws
    all its Linears once its layers exist (official_init, timm's init_weights, T2T's apply), which
    would undo what the attention set up when it was built. ``build_model`` does."""
    for module in model.modules():
        if isinstance(module, MaskedAttention) and module.mask is not None:
            module.mask.init_attention(module)
    return model


def _blocking_bias(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """-inf where ``blocked``, 0 elsewhere: blocked pairs as an additive attn_mask."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, float("-inf"))


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
        if mask is not None:
            if mask.num_heads != num_heads:
                raise ValueError(f"mask has {mask.num_heads} heads, attention has {num_heads}")
            mask.set_logit_scale(self.scale)
            mask.init_attention(self)  # again after a host model's own init: init_masked_attention
        self.talking_heads = talking_heads
        if talking_heads:
            self.mix_pre, self.mix_post = HeadMix(num_heads), HeadMix(num_heads)

    def _mask_terms(self, n_tokens: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The mask's (factor, bias, blocked) over all tokens, each None when the mask has no such
        term; special tokens' rows and columns get the neutral value (1, 0, not blocked). A mixture
        has none of the three: :meth:`_mix_positional` applies it to the output."""
        if self.mask is None:
            return None, None, None
        p, n_patches = self.num_prefix_tokens, self.mask.num_tokens
        if n_patches + p != n_tokens:
            raise ValueError(
                f"mask covers {n_patches} patch tokens + {p} special tokens, "
                f"but the layer sees {n_tokens} tokens"
            )
        if self.mask.combine == "mix":
            return None, None, None
        m = self.mask()
        factor, bias = (m, None) if self.mask.combine == "mul" else (None, m)
        blocked = self.mask.blocked()
        if p:
            pad = (p, 0, p, 0)
            if factor is not None:  # a per-head (H, 1, 1) factor too: special tokens stay unscaled
                factor = F.pad(factor.expand(-1, n_patches, n_patches), pad, value=1.0)
            if bias is not None:
                bias = F.pad(bias, pad, value=0.0)
            if blocked is not None:
                blocked = F.pad(blocked, pad, value=False)
        return factor, bias, blocked

    def _mix_positional(self, content: Tensor, v: Tensor, window_mask: Tensor | None) -> Tensor:
        """(1 - g) content + g (P @ v) on the patch rows; special-token rows keep the content alone.

        content, v: (B, H, N, head_dim). P is (H, n, n) over the n patch tokens, zero-padded for the
        special tokens' rows and columns, one tensor for the whole batch; with ``window_mask``
        (G, n, n) it is (G, H, n, n), one per window, the batch being batch-major (b * G + w)."""
        B, H, N, d = v.shape
        p, n = self.num_prefix_tokens, self.mask.num_tokens
        logits = self.mask.positional_logits()[None]  # (1, H, n, n)
        if window_mask is not None:
            logits = logits + window_mask[:, None].to(logits.dtype)  # pairs the host blocks
        positional = logits.softmax(dim=-1)
        gate = self.mask.gate()[:, None, None].expand(H, n, 1)  # per query row
        if p:  # special tokens: no positional weight on their keys, g = 0 on their rows
            positional = F.pad(positional, (p, 0, p, 0))
            gate = F.pad(gate, (0, 0, p, 0))
        groups = positional.shape[0]
        if B % groups:
            raise ValueError(f"window mask has {groups} windows, the batch {B} rows")
        # g P @ v without expanding P over the batch: each group's images side by side as columns
        # of one (G, H, N, images * d) matrix, one product per (group, head). The gate goes on the
        # small P, and the mixture is one fused multiply-add over the output: on the fused path the
        # full-size work is a copy of v, a batched product and an addcmul.
        images = B // groups
        columns = v.reshape(images, groups, H, N, d).permute(1, 2, 3, 0, 4).reshape(groups, H, N, images * d)
        positional_out = ((gate * positional).to(v.dtype) @ columns).reshape(groups, H, N, images, d)
        positional_out = positional_out.permute(3, 0, 1, 2, 4).reshape(B, H, N, d)  # a view when G = 1
        return torch.addcmul(positional_out, content, (1 - gate).to(content.dtype))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                window_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim). attn_mask: an additive bias broadcastable to (B, H, N, N), or None.
        window_mask: for a mixture mask, the host's blocking (G, n, n) over the patch tokens of G
        windows, batch-major (b * G + w; Swin's shifted windows: 0 or -100), which the positional
        attention must respect too; ``attn_mask`` already carries it to the content attention, but
        mixed with biases (Swin's relative positions) that the positional attention must not see.
        Other masks ignore it."""
        if is_causal:
            raise ValueError("MaskedAttention is bidirectional: is_causal is not supported")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        factor, bias, blocked = self._mask_terms(N)
        dropout_p = self.attn_drop.p if self.training else 0.0
        per_head_factor = factor is not None and factor.shape[-2:] == (1, 1)

        if self.fused and (factor is None or per_head_factor) and not self.talking_heads:
            if factor is not None:
                q = q * factor  # (z * t_h) = (q t_h) . k * scale: the factor folds into q
            total = attn_mask
            for term in (bias, None if blocked is None else _blocking_bias(blocked, q.dtype)):
                if term is not None:
                    total = term if total is None else total + term
            if total is not None:
                total = total.to(q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=total, dropout_p=dropout_p, scale=self.scale
            )
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if factor is not None:
                logits = logits * factor
            if bias is not None:
                logits = logits + bias
            if attn_mask is not None:
                logits = logits + attn_mask
            if self.talking_heads:
                logits = self.mix_pre(logits)
            if blocked is not None:  # after the head mixing: a -inf must not be mixed across heads
                logits = logits.masked_fill(blocked, float("-inf"))
            attn = logits.softmax(dim=-1)
            if self.talking_heads:
                attn = self.mix_post(attn)
            out = self.attn_drop(attn) @ v

        if self.mask is not None and self.mask.combine == "mix":
            # After the talking heads: CaiT's post-softmax mixing (N(0, 1) weights) would scramble
            # each head's positional kernel across heads and leave P unnormalised; mixed in here,
            # every head keeps its own P, as in ConViT. Dropout falls on the content part only.
            out = self._mix_positional(out, v, window_mask)

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
