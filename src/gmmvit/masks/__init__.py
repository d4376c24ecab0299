"""Locality masks for attention: one module per family, one registry (see :mod:`.base`).

Families (module = registered name; formula, how it combines with the scaled logits z, parameters
per masked layer with H heads over N patch tokens; "mix" mixes a positional attention into the
content attention, ConViT's GPSA):

    gmm           z * sum_k alpha_kh exp(-d2 / (2 (sigma_kh^2 + 1e-5)))    mul   2 K H
    gmm_add       z + the same mixture                                      add   2 K H
    gmm_official  z * the official code's float32 evaluation of it          mul   2 K H
    elm           z * W (one N x N matrix shared by the heads)              mul   N^2
    rmt           z + log(gamma_h) (|dx| + |dy|)                            add   0
    alibi2d       z - m_h sqrt(dx^2 + dy^2)                                 add   0
    temperature   z * tau_h / s   (= q.k tau_h)                             mul   H
    lsa           temperature, and each token's own logit blocked (-inf)    mul   H
    gpsa          (1 - g_h) softmax(z) + g_h softmax_j(w_h . r_ij + b_h),   mix   5 H
                  r_ij = (dx, dy, dx^2 + dy^2), g_h = sigmoid(lambda_h)

``build_mask("gmm-k3", grid, heads)`` builds one layer's mask; ``mask_names()`` lists them all
without importing any family. The family classes are also attributes of this package, loaded on
first access (``gmmvit.masks.GaussianMixtureMask``).
"""

from __future__ import annotations

from .base import (
    NO_MASK,
    SPEC_SYNTAX,
    LocalityMask,
    allowed_specs,
    build_mask,
    family_names,
    grid_offsets,
    kernel_families,
    mask_class,
    mask_options,
    mask_names,
    parse_mask_spec,
    register_mask,
    squared_distances,
)

__all__ = [
    "NO_MASK",
    "SPEC_SYNTAX",
    "LocalityMask",
    "allowed_specs",
    "build_mask",
    "family_names",
    "grid_offsets",
    "kernel_families",
    "mask_class",
    "mask_options",
    "mask_names",
    "parse_mask_spec",
    "register_mask",
    "squared_distances",
]


def __getattr__(name: str) -> type[LocalityMask]:
    # A family's class by its class name, e.g. GaussianMixtureMask: importing every family is fine
    # here (a process that asks for a class by name runs models); the workflow never does.
    for family in family_names():
        cls = mask_class(family)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
