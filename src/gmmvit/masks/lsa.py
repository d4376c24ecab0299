"""SPT/LSA's locality self-attention (Lee, Lee, Song 2021): no attention to oneself, and a learnable
per-head temperature."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import register_mask
from .temperature import TemperatureMask


@register_mask("lsa")
class LocalitySelfAttentionMask(TemperatureMask):
    """LSA: the temperature control, plus each patch token's own logit blocked.

    attention = softmax(q.k * tau_h, with z_ii = -inf)           combine: mul, and the diagonal
                                                                 blocked
    parameters per layer: H (tau_h, initialised to the layer's scale 1/sqrt(d), as the SPT/LSA code)

    Blocked means -inf exactly (not the SPT/LSA code's -987654321): scaled_dot_product_attention
    takes -inf in a float mask, forward and backward, and no row is fully blocked. It is applied to
    the logits that enter the softmax, i.e. after CaiT's pre-softmax talking heads (a -inf mixed
    across heads would give inf - inf; the SPT/LSA CaiT writes -1e-9 before the mixing, which masks
    nothing). Special tokens are not blocked (the SPT/LSA ViT blocks its class token's own logit too).
    """

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        if grid * grid < 2:
            raise ValueError("lsa blocks each token's own logit: a 1x1 token grid would leave nothing "
                             "to attend to")
        self.register_buffer("diagonal", torch.eye(grid * grid, dtype=torch.bool)[None], persistent=False)

    def blocked(self) -> Tensor:
        return self.diagonal
