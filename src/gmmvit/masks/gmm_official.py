"""GMM as the official code evaluates it in float32, underflow included (bug-compatible)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import register_mask
from .gmm import GaussianMixtureMask


@register_mask("gmm_official")
class OfficialGaussianMixtureMask(GaussianMixtureMask):
    """The paper's GMM, evaluated the official code's way, to reproduce its numbers bug for bug.

    E = exp(-d2) ** 0.5                          once, in float32
    M[h] = sum_k alpha[k, h] * E ** (1 / (sigma[k, h]^2 + 1e-5))      k = 0, 1, ... in order
    attention = softmax(z * M)                                  combine: mul
    parameters per layer: 2 * K * H, initialised as GMM's.

    Mathematically E ** (1 / v) = exp(-d2 / (2 v)), the clean ``gmm``; in float32 exp(-d2) is 0
    for d2 >= 104 (below the smallest subnormal), so those pairs get M = 0 whatever sigma is: a
    third of the pairs of a 16x16 grid (PiT's first stage, T2T's token layers). For 88 <= d2 < 104,
    exp(-d2) is subnormal and E loses precision (up to a few tenths of a percent after the power).
    """

    def __init__(self, grid: int, num_heads: int, num_kernels: int = 5) -> None:
        super().__init__(grid, num_heads, num_kernels)
        # float32 on purpose: the underflow is the point of this family. The square root is taken
        # correctly rounded (math.sqrt of the float32 value, rounded back): torch.sqrt goes through
        # MKL's vector math, whose last bit depends on the CPU (gmmvit.numerics).
        e = torch.exp(-self.d2_values.float())
        self.register_buffer("e_half", torch.tensor([math.sqrt(v) for v in e.tolist()],
                                                    dtype=torch.float32), persistent=False)  # (U,)

    def profile(self) -> Tensor:
        inv_var = 1.0 / (self.sigma**2 + 1e-5)  # (K, H)
        terms = (self.alpha[k, :, None] * self.e_half ** inv_var[k, :, None]
                 for k in range(self.num_kernels))
        mask = next(terms)
        for term in terms:  # summed in kernel order, one term at a time
            mask = mask + term
        return mask
