"""RMT's Manhattan decay (Fan et al., CVPR 2024), a fixed bias."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LocalityMask, grid_offsets, register_mask


@register_mask("rmt")
class ManhattanDecayMask(LocalityMask):
    """RMT's fixed Manhattan decay, a bias: log(gamma_h) * (|dx| + |dy|), gamma_h = 1 - 2^-(a + b h / H).

    attention = softmax(z + log(gamma_h) (|dx| + |dy|))        combine: add (fused SDPA path)
    parameters per layer: 0 (a = 2, b = 4)
    """

    combine = "add"

    def __init__(self, grid: int, num_heads: int, a: float = 2.0, b: float = 4.0) -> None:
        super().__init__(grid, num_heads)
        heads = torch.arange(num_heads, dtype=torch.float64)
        log_gamma = torch.log1p(-(2.0 ** -(a + b * heads / num_heads)))
        dy, dx = grid_offsets(grid)
        manhattan = (dy.abs() + dx.abs()).double()
        self.register_buffer("bias", (log_gamma[:, None, None] * manhattan).float(), persistent=False)

    def forward(self) -> Tensor:
        return self.bias
