"""ALiBi in two dimensions: a fixed per-head slope times the Euclidean patch distance."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import LocalityMask, grid_offsets, register_mask


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's head slopes (Press et al., ICLR 2022; PAPER.md names them only).

    For H a power of two: the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^-8. Otherwise, as the
    paper's code does: the slopes of n = the largest power of two below H, then every other slope of
    the 2n sequence for the remaining H - n heads (so they interleave with the first n).
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    n = 2 ** int(math.log2(num_heads))
    if n == num_heads:
        return geometric(n)
    return geometric(n) + geometric(2 * n)[0::2][: num_heads - n]


@register_mask("alibi2d")
class Alibi2dMask(LocalityMask):
    """2-D ALiBi: attention = softmax(z - m_h * sqrt(dx^2 + dy^2))   combine: add (fused SDPA path)

    m_h: ALiBi's slopes (:func:`alibi_slopes`); parameters per layer: 0. A single-head layer (T2T's
    token transformer) gets m = 2^-8, as ALiBi gives one head.
    """

    combine = "add"

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
        dy, dx = grid_offsets(grid)
        distance = (dy.double() ** 2 + dx.double() ** 2).sqrt()
        self.register_buffer("bias", (-slopes[:, None, None] * distance).float(), persistent=False)

    def forward(self) -> Tensor:
        return self.bias
