"""GMM's additive twin: the same learnable Gaussian mixture, added to the logits (a bias)."""

from __future__ import annotations

from .base import register_mask
from .gmm import GaussianMixtureMask


@register_mask("gmm_add")
class AdditiveGaussianMixtureMask(GaussianMixtureMask):
    """The paper's mixture as a bias instead of a factor (PAPER.md: the official README says
    "added", the code multiplies; this is the "added" reading, a different prior).

    B[h, i, j] = sum_k alpha[k, h] * exp(-d2[i, j] / (2 * (sigma[k, h]^2 + 1e-5)))
    attention  = softmax(z + B)                                 combine: add (fused SDPA path)
    parameters per layer: 2 * K * H, initialised as GMM's (alpha ~ N(0, 2^2), sigma ~ N(10, 10^2))
    so that the two differ only in how they combine.
    """

    combine = "add"
