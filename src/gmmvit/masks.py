"""Locality masks for attention: one small class per family, one registry.

A mask belongs to one attention layer. Called with no arguments it returns a per-head tensor of
shape (H, N, N) (or (1, N, N) when shared by all heads) over that layer's N = grid * grid patch
tokens, in the patch embedding's row-major order. Its ``combine`` attribute says how
:class:`gmmvit.attention.MaskedAttention` applies it:

- ``"mul"`` multiplies the scaled logits before the softmax (the official GMM and ELM);
- ``"add"`` is a bias added to the scaled logits; it goes through ``scaled_dot_product_attention``'s
  ``attn_mask`` so that the fused kernels stay in use.

Special tokens (class, distillation) are never masked: the attention module pads the mask with the
neutral value (1 for "mul", 0 for "add") on their rows and columns.

Adding a family = one subclass of :class:`LocalityMask` decorated with ``@register_mask("name")``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "LocalityMask",
    "GaussianMixtureMask",
    "ElementwiseMask",
    "ManhattanDecayMask",
    "MASKS",
    "register_mask",
    "build_mask",
    "mask_names",
    "grid_offsets",
]

MASKS: dict[str, type[LocalityMask] | None] = {"none": None}


def register_mask(name: str) -> Callable[[type[LocalityMask]], type[LocalityMask]]:
    def add(cls: type[LocalityMask]) -> type[LocalityMask]:
        if name in MASKS:
            raise ValueError(f"mask {name!r} is registered twice")
        MASKS[name] = cls
        return cls

    return add


def mask_names() -> list[str]:
    return list(MASKS)


def grid_offsets(grid: int) -> tuple[Tensor, Tensor]:
    """Key-minus-query offsets (dy, dx), each (N, N), for a grid x grid token grid in row-major order."""
    index = torch.arange(grid * grid)
    row, col = index // grid, index % grid
    return row[None, :] - row[:, None], col[None, :] - col[:, None]


class LocalityMask(nn.Module):
    """Base class: holds the layer's squared patch distances ``d2`` (N, N) and its head count."""

    combine: Literal["mul", "add"]

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.grid, self.num_heads = grid, num_heads
        dy, dx = grid_offsets(grid)
        # Non-persistent: derived from the grid, so checkpoints stay independent of it.
        self.register_buffer("d2", (dy**2 + dx**2).float(), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def extra_repr(self) -> str:
        return f"grid={self.grid}, heads={self.num_heads}, combine={self.combine}"


@register_mask("gmm")
class GaussianMixtureMask(LocalityMask):
    """Per head, a mixture of K isotropic Gaussians of the patch distance (the paper's GMM).

    M[h, i, j] = sum_k alpha[k, h] * exp(-d2[i, j] / (2 * (sigma[k, h]^2 + 1e-5)))

    Evaluated directly: the official code computes exp(-d2) first and raises it to a power, which
    underflows to exactly 0 in float32 for every pair with d2 >= 104.
    """

    combine = "mul"

    def __init__(self, grid: int, num_heads: int, num_kernels: int = 5) -> None:
        super().__init__(grid, num_heads)
        self.num_kernels = num_kernels
        # The official initialisation: alpha ~ N(0, 2^2), sigma ~ N(10, 10^2), unconstrained.
        self.alpha = nn.Parameter(torch.randn(num_kernels, num_heads) * 2.0)
        self.sigma = nn.Parameter(torch.randn(num_kernels, num_heads) * 10.0 + 10.0)

    def forward(self) -> Tensor:
        var = self.sigma**2 + 1e-5  # (K, H)
        gauss = torch.exp(-self.d2 / (2.0 * var[:, :, None, None]))  # (K, H, N, N)
        return (self.alpha[:, :, None, None] * gauss).sum(0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernels={self.num_kernels}"


@register_mask("elm")
class ElementwiseMask(LocalityMask):
    """One learnable N x N matrix per layer, shared by the heads (the paper's ELM).

    Initialised to 0 and multiplying the logits, as the official code does: attention starts uniform.
    """

    combine = "mul"

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__(grid, num_heads)
        self.weight = nn.Parameter(torch.zeros(grid * grid, grid * grid))

    def forward(self) -> Tensor:
        return self.weight[None]


@register_mask("rmt")
class ManhattanDecayMask(LocalityMask):
    """RMT's fixed Manhattan decay, a bias: log(gamma_h) * (|dx| + |dy|), gamma_h = 1 - 2^-(a + b h / H).

    No parameters. A prior beyond the paper, and the reference user of the additive (fused) path.
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


def build_mask(name: str, grid: int, num_heads: int, **kwargs) -> LocalityMask | None:
    """The mask ``name`` for one layer with a grid x grid token grid and ``num_heads`` heads."""
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; valid masks: {', '.join(MASKS)}")
    cls = MASKS[name]
    return None if cls is None else cls(grid, num_heads, **kwargs)
