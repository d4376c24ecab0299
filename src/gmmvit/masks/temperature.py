"""A learnable per-head temperature alone: the control that tells locality from rescaling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LocalityMask, register_mask


@register_mask("temperature")
class TemperatureMask(LocalityMask):
    """A learnable per-head temperature tau_h in place of the layer's logit scale s (1/sqrt(d)):

    attention = softmax(q.k * tau_h) = softmax(z * tau_h / s)   combine: mul, an (H, 1, 1) factor
    parameters per layer: H; tau_h starts at s, so the attention starts as the unmasked one.

    The control PAPER.md asks for: GMM at initialisation is close to a random per-head rescaling of
    the logits, and this family is that rescaling without any distance. tau is kept in q.k units,
    as the SPT/LSA code keeps its temperature (so Adam's steps and weight decay act on the same
    number as there); the attention folds the factor into q, so the fused path stays in use where
    the layer has no special tokens. As every mask, it leaves special tokens' rows and columns
    alone (the SPT/LSA code scales the class token's logits too).
    """

    combine = "mul"

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        self.logit_scale = 1.0  # until the attention module says its own
        self.temperature = nn.Parameter(torch.ones(num_heads))

    def set_logit_scale(self, scale: float) -> None:
        self.logit_scale = float(scale)
        with torch.no_grad():
            self.temperature.fill_(scale)

    def forward(self) -> Tensor:
        return (self.temperature / self.logit_scale)[:, None, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", logit_scale={self.logit_scale:.4g}"
