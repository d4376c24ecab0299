"""ConViT's gated positional self-attention (d'Ascoli et al., ICML 2021) as a mask family.

Not a logit mask: a second, purely positional attention mixed with the content attention.
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from .base import LocalityMask, grid_offsets, register_mask


def relative_offsets(grid: int) -> tuple[Tensor, Tensor]:
    """Every key-minus-query offset of a grid x grid token grid, once: ``table`` (U, 3) float32 rows
    (dx, dy, dx^2 + dy^2), U = (2 grid - 1)^2, and ``index`` (N, N) int64, each token pair's row.

    The positional logit w_h . r_ij depends on (dx, dy) alone: it is evaluated on the U offsets and
    gathered (an 8x8 grid: 225 offsets for 4,096 pairs). The softmax is over a query's keys, so it
    needs the gathered (H, N, N) logits."""
    span = torch.arange(-(grid - 1), grid)
    dy, dx = torch.meshgrid(span, span, indexing="ij")  # dy slow, dx fast: row (dy + g - 1) * (2g - 1) + ...
    table = torch.stack([dx, dy, dx**2 + dy**2], dim=-1).reshape(-1, 3).float()
    pair_dy, pair_dx = grid_offsets(grid)
    index = (pair_dy + grid - 1) * (2 * grid - 1) + (pair_dx + grid - 1)
    return table, index


@register_mask("gpsa")
class GatedPositionalMask(LocalityMask):
    """ConViT's GPSA: per head h, a positional attention mixed into the content attention by a gate.

        r_ij = (dx, dy, dx^2 + dy^2)      key minus query, in patches (dx first, as ConViT)
        P_h  = softmax_j(w_h . r_ij + b_h)
        A_h  = (1 - g_h) softmax(q.k / sqrt(d)) + g_h P_h,   g_h = sigmoid(lambda_h)
                                                            combine: mix
    parameters per layer: 5 H (w_h: 3, b_h: 1, lambda_h: 1). b_h cancels in the softmax (its
    gradient is zero up to rounding), but it is a parameter of the official code and counts.

    ``forward()`` returns P (H, N, N); ``positional_logits()`` the logits it is the softmax of, for
    a host that adds its own blocking first (Swin's shifted windows); ``gate()`` g (H,).
    :class:`gmmvit.attention.MaskedAttention` computes the mixture without forming A:
    out = (1 - g) SDPA(q, k, v) + g (P @ v), so the content part stays on the fused kernel, and P is
    one (H, N, N) tensor per forward pass, shared by the batch (the official code expands it over
    the batch). The official code divides A by its row sum, which changes nothing but rounding.

    Initialisation (``local_init``, the official default; ``locality_strength`` alpha = 1):
    lambda_h = 1 (g = 0.73); w and b as ConViT's default (trunc-normal 0.02, zero bias), then with
    k = floor(sqrt(H)), c = (k - 1) / 2 for even k else floor(k / 2), head p = h1 + k h2
    (h1, h2 < k) gets w_p = (2 (h2 - c), 2 (h1 - c), -1): a Gaussian centred on one offset of a
    k x k kernel (9 heads: the offsets {-1, 0, 1}^2, peak probability 0.318 each). Heads beyond
    k^2 keep the default draw; then all of w is multiplied by alpha (as the official code). The
    attention's v projection starts as the identity (:meth:`init_attention`): with the local P,
    each head starts as one tap of a convolution. Where v is not square (CaiT's inner width 256 on
    dim 108, T2T's token layers) it is the rectangular identity ``torch.eye(inner, dim)``: v's
    first min(inner, dim) channels copy the input's and the rest start at zero (CaiT: heads 3 and
    4 start with v = 0 and the upper part of head 2 too, until training moves them).

    Where this differs from ConViT, on purpose:
    - Placement: wherever the benchmark puts every family (every masked layer of the five models,
      PAPER.md), not ConViT's first 10 of 12 layers, so that the families are compared on equal
      footing.
    - Special tokens: ConViT appends its class token after the GPSA layers; here, as for every
      family, special tokens' rows take the content attention alone (g = 0) and P covers patch
      keys only (zero weight on special-token keys).
    - Attention dropout falls on the content attention only (the official code drops the mixed
      map). ConViT's recipes, and ours, use no attention dropout, so it changes nothing there.
    - CaiT's talking heads mix the content attention only; P enters after them (attention.py).
    """

    combine = "mix"

    def __init__(self, grid: int, num_heads: int, local_init: bool = True,
                 locality_strength: float = 1.0) -> None:
        super().__init__(grid, num_heads)
        self.local_init, self.locality_strength = local_init, float(locality_strength)
        table, index = relative_offsets(grid)
        self.register_buffer("offsets", table, persistent=False)
        self.register_buffer("offset_index", index, persistent=False)
        # nn.Linear(3, H)'s weight and bias in the official code; plain parameters here, so that the
        # host models' Linear initialisation leaves them alone and no MAC counter takes them for a layer.
        self.pos_weight = nn.Parameter(torch.empty(num_heads, 3))
        self.pos_bias = nn.Parameter(torch.empty(num_heads))
        self.gating = nn.Parameter(torch.empty(num_heads))  # lambda_h
        self.reset_parameters()

    @staticmethod
    def kernel_offsets(num_heads: int) -> list[tuple[int, float, float]]:
        """(head, dx, dy) of each locally initialised head: the centre of its Gaussian."""
        k = math.isqrt(num_heads)
        c = (k - 1) / 2 if k % 2 == 0 else k // 2
        return [(h1 + k * h2, h2 - c, h1 - c) for h1 in range(k) for h2 in range(k)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        trunc_normal_(self.pos_weight, std=0.02)
        self.pos_bias.zero_()
        self.gating.fill_(1.0)
        if self.local_init:
            # -(dx - ox)^2 - (dy - oy)^2 = 2 ox dx + 2 oy dy - d^2 + const: a Gaussian around (ox, oy)
            for head, ox, oy in self.kernel_offsets(self.num_heads):
                self.pos_weight[head] = torch.tensor([2 * ox, 2 * oy, -1.0])
            self.pos_weight.mul_(self.locality_strength)

    @torch.no_grad()
    def init_attention(self, attention: nn.Module) -> None:
        """The local init's other half: v = the (rectangular) identity, its bias zero. v is the last
        third of the attention's fused qkv Linear."""
        if not self.local_init:
            return
        qkv, inner = attention.qkv, attention.inner_dim
        qkv.weight[2 * inner:].copy_(torch.eye(inner, qkv.in_features))
        if qkv.bias is not None:
            qkv.bias[2 * inner:].zero_()

    def positional_logits(self) -> Tensor:
        """w_h . r_ij + b_h, (H, N, N): evaluated per distinct offset, then gathered."""
        per_offset = (self.pos_weight[:, None, :] * self.offsets).sum(-1) + self.pos_bias[:, None]
        return per_offset[:, self.offset_index]

    def gate(self) -> Tensor:
        """g_h = sigmoid(lambda_h), (H,): the weight of the positional attention."""
        return torch.sigmoid(self.gating)

    def forward(self) -> Tensor:
        """P, (H, N, N): each patch query's positional attention over the patch keys."""
        return self.positional_logits().softmax(dim=-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", local_init={self.local_init}, "
                                       f"locality_strength={self.locality_strength:g}")
