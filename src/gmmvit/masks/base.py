"""What every mask family shares: the base class, the token grid's offsets, the registry and the
mask spec a grid lists.

A family lives in its own module, ``gmmvit/masks/<family>.py``, and registers its class under that
same name; the module is imported the first time the family is asked for. So the file layout
carries a family's identity: the workflow makes a cell's training job depend on the module of its
family (and what that module imports), and adding a family retrains nothing that exists.

Mask spec (what a grid, ``gmmvit train --mask`` and ``gmmvit measure --mask`` take):

    <family>          e.g. gmm: the family with its defaults (K from the recipe's mask_kernels)
    <family>-k<K>     e.g. gmm-k3: a family with K Gaussians, for those whose constructor takes
                      ``num_kernels`` (gmm, gmm_add, gmm_official); K >= 1
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ..registry import NO_MASK, family_names, mask_names

SPEC_SYNTAX = "<family> or <family>-k<K>"
_SPEC = re.compile(r"(?P<family>[a-z0-9_]+)(?:-k(?P<kernels>[1-9][0-9]*))?")

_REGISTERED: dict[str, type[LocalityMask]] = {}  # filled as family modules are imported


def grid_offsets(grid: int) -> tuple[Tensor, Tensor]:
    """Key-minus-query offsets (dy, dx), each (N, N), for a grid x grid token grid in row-major order."""
    index = torch.arange(grid * grid)
    row, col = index // grid, index % grid
    return row[None, :] - row[:, None], col[None, :] - col[:, None]


def squared_distances(grid: int) -> Tensor:
    """d2[i, j] = dy^2 + dx^2 in grid units, (N, N), float32."""
    dy, dx = grid_offsets(grid)
    return (dy**2 + dx**2).float()


def distinct_squared_distances(grid: int) -> tuple[Tensor, Tensor]:
    """The distinct values of :func:`squared_distances` ascending, (U,) float32, and each token
    pair's index into them, (N, N) int64. A mask that is a function of d2 is evaluated on the U
    values and gathered: a 16x16 grid has 65,536 pairs and 136 distinct squared distances."""
    values, index = torch.unique(squared_distances(grid), return_inverse=True)
    return values, index


class LocalityMask(nn.Module):
    """One attention layer's mask over its N = grid * grid patch tokens (row-major).

    ``forward()`` returns a per-head (H, N, N) tensor, or (1, N, N) when shared by the heads, or
    (H, 1, 1) when constant over the token pairs (a per-head temperature). ``combine`` says how
    :class:`gmmvit.attention.MaskedAttention` applies it to the scaled logits z = q.k / sqrt(d):

    - ``"mul"``: z * M (the official GMM and ELM);
    - ``"add"``: z + M, a bias that goes through ``scaled_dot_product_attention``'s ``attn_mask``,
      so the fused kernels stay in use;
    - ``"mix"``: M is a positional attention P (rows sum to 1) that the family's ``gate()`` g_h
      mixes in: (1 - g_h) softmax(z) + g_h P (ConViT's GPSA). The attention computes it as
      (1 - g) SDPA(q, k, v) + g (P @ v), so the content part stays on the fused kernels too.

    A family may also block token pairs from the softmax (``blocked()``, LSA's own-token logit),
    may want the layer's logit scale (``set_logit_scale``, called once by the attention module),
    and may prescribe the attention's own initial weights (``init_attention``: GPSA's identity v).
    Special tokens' rows and columns are never masked: the attention pads every term with its
    neutral value (factor 1, bias 0, not blocked; for a mixture, g = 0 on their rows and P = 0 on
    their columns, so their rows take the content attention alone).
    """

    combine: Literal["mul", "add", "mix"]

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.grid, self.num_heads = grid, num_heads

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def blocked(self) -> Tensor | None:
        """Boolean (1 or H, N, N): token pairs the softmax must not see (logit -inf). None: none."""
        return None

    def set_logit_scale(self, scale: float) -> None:
        """The attention's logit scale s (z = s * q.k); only masks that learn a temperature use it."""

    def init_attention(self, attention: nn.Module) -> None:
        """Initialise weights of the attention that applies this mask, where the family prescribes
        them (GPSA: v starts as the identity); nothing by default. Called by the attention when it
        is built, and again by :func:`gmmvit.attention.init_masked_attention` after the host model's
        own initialisation, which redraws every Linear."""

    def extra_repr(self) -> str:
        return f"grid={self.grid}, heads={self.num_heads}, combine={self.combine}"


# ---------------------------------------------------------------- registry


def register_mask(name: str) -> Callable[[type[LocalityMask]], type[LocalityMask]]:
    """Register a family class under ``name``, which must be the name of its module."""

    def add(cls: type[LocalityMask]) -> type[LocalityMask]:
        module = cls.__module__.rsplit(".", 1)[-1]
        if module != name:
            raise ValueError(f"mask family {name!r} must live in masks/{name}.py (found in {module}.py): "
                             "the workflow finds a family's code by its name")
        if name in _REGISTERED and _REGISTERED[name] is not cls:
            raise ValueError(f"mask {name!r} is registered twice")
        _REGISTERED[name] = cls
        return cls

    return add


def mask_class(name: str) -> type[LocalityMask] | None:
    """The class of family ``name`` (None for ``none``), importing its module on first use."""
    if name == NO_MASK:
        return None
    if name not in family_names():
        raise ValueError(f"unknown mask {name!r}; {allowed_specs()}")
    importlib.import_module(f"{__package__}.{name}")
    return _REGISTERED[name]


def takes_kernels(family: str) -> bool:
    """Whether ``family`` has a K (its constructor takes ``num_kernels``); imports that family only."""
    cls = mask_class(family)
    return cls is not None and "num_kernels" in inspect.signature(cls).parameters


def kernel_families() -> list[str]:
    """Families with a K: the ones a ``-k<K>`` spec fits (imports every family)."""
    return [name for name in family_names() if takes_kernels(name)]


def allowed_specs() -> str:
    kernels = kernel_families()
    return (f"valid masks: {', '.join(mask_names())}, or <family>-k<K> with K >= 1 for "
            f"{', '.join(kernels)} (e.g. {kernels[0]}-k3)")


def parse_mask_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"gmm-k3"`` -> ``("gmm", {"num_kernels": 3})``; ``"elm"`` -> ``("elm", {})``."""
    match = _SPEC.fullmatch(spec)
    if not match or match["family"] not in mask_names():
        raise ValueError(f"unknown mask {spec!r}; {allowed_specs()}")
    family, kernels = match["family"], match["kernels"]
    if kernels is None:
        return family, {}
    if not takes_kernels(family):  # only this family's module is imported: a cell loads its own code
        raise ValueError(f"mask {spec!r}: {family} has no K; {allowed_specs()}")
    return family, {"num_kernels": int(kernels)}


def mask_options(spec: str, default_kernels: int) -> dict[str, int]:
    """The constructor options of ``spec``: its own K, else ``default_kernels`` for a family with a K
    (the recipe's ``mask_kernels``), else none."""
    family, options = parse_mask_spec(spec)
    if takes_kernels(family):
        return {"num_kernels": default_kernels} | options
    return options


def build_mask(spec: str, grid: int, num_heads: int, **kwargs) -> LocalityMask | None:
    """The mask ``spec`` (a family, or ``family-k<K>``) for one layer with a grid x grid token grid
    and ``num_heads`` heads; ``kwargs`` are defaults that the spec's own options override."""
    family, options = parse_mask_spec(spec)
    cls = mask_class(family)
    return None if cls is None else cls(grid, num_heads, **(kwargs | options))
