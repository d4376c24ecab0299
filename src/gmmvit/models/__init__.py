"""Model registry: the paper's five small-dataset Vision Transformers, each able to carry any mask.

``build_model("vit", mask="gmm-k3", img_size=32, num_classes=10)`` builds one. A model lives in its
own module, ``models/<name>.py``, whose builder ``(mask_factory, img_size, num_classes,
**overrides) -> nn.Module`` is registered with ``@register_model("<name>")`` (the module's name) and
imported the first time the model is asked for: the file layout carries the model's identity, so the
workflow makes a cell depend on its model's module (and what that imports) and on no other model.
``mask_factory(grid, num_heads)`` returns a fresh mask for one layer (or None), so every masked
layer owns its own parameters.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..attention import init_masked_attention
from ..masks import build_mask, parse_mask_spec
from ..registry import model_names

ModelBuilder = Callable[..., nn.Module]
_BUILDERS: dict[str, ModelBuilder] = {}  # filled as model modules are imported


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under ``name``, which must be the name of its module."""

    def add(fn: ModelBuilder) -> ModelBuilder:
        module = fn.__module__.rsplit(".", 1)[-1]
        if module != name:
            raise ValueError(f"model {name!r} must live in models/{name}.py (found in {module}.py): "
                             "the workflow finds a model's code by its name")
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return add


def model_builder(name: str) -> ModelBuilder:
    """The builder of model ``name``, importing its module on first use."""
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
    importlib.import_module(f"{__name__}.{name}")
    return _BUILDERS[name]


def build_model(
    name: str,
    mask: str = "none",
    img_size: int = 32,
    num_classes: int = 10,
    mask_kwargs: dict | None = None,
    **overrides,
) -> nn.Module:
    """Build model ``name`` with the mask spec ``mask`` (e.g. ``gmm`` or ``gmm-k3``) in its attention
    layers (placement per the paper).

    ``mask_kwargs`` are defaults for the mask's constructor (e.g. the recipe's ``num_kernels``); the
    spec's own options (``-k3``) override them. ``overrides`` go to the builder (e.g.
    ``drop_path_rate=0.0``). Masks that prescribe their attention's initial weights (GPSA's
    identity v) apply them once the builder's own initialisation has run. The model carries
    ``paper_depth`` (depth as the paper counts it) and ``mask_name`` (the spec).
    """
    builder = model_builder(name)
    parse_mask_spec(mask)  # an unknown spec fails here, naming the valid ones, before any layer is built
    mask_kwargs = dict(mask_kwargs or {})

    def mask_factory(grid: int, num_heads: int):
        return build_mask(mask, grid, num_heads, **mask_kwargs)

    model = builder(mask_factory, img_size=img_size, num_classes=num_classes, **overrides)
    init_masked_attention(model)  # after the builder's own init, which redraws every Linear
    model.mask_name = mask
    return model
