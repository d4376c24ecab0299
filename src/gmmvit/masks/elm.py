"""ELM, the paper's element-wise learnable mask (multiplies the scaled logits)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LocalityMask, register_mask


@register_mask("elm")
class ElementwiseMask(LocalityMask):
    """One learnable N x N matrix per layer, shared by the heads (the paper's ELM).

    attention = softmax(z * W)                                  combine: mul
    parameters per layer: N^2 (ViT's 8x8 grid: 4,096)

    Initialised to 0 and multiplying the logits, as the official code does: attention starts uniform.
    """

    combine = "mul"

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        self.weight = nn.Parameter(torch.zeros(grid * grid, grid * grid))

    def forward(self) -> Tensor:
        return self.weight[None]
