"""Model registry: the paper's five small-dataset Vision Transformers, each able to carry any mask.

``build_model("vit", mask="gmm", img_size=32, num_classes=10)`` builds one. A builder is a function
``(mask_factory, img_size, num_classes, **overrides) -> nn.Module`` registered with
``@register_model(name)``; ``mask_factory(grid, num_heads)`` returns a fresh mask for one layer (or
None), so every masked layer owns its own parameters.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..masks import MASKS, build_mask

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = fn
        return fn

    return add


def model_names() -> list[str]:
    return list(MODELS)


def build_model(
    name: str,
    mask: str = "none",
    img_size: int = 32,
    num_classes: int = 10,
    mask_kwargs: dict | None = None,
    **overrides,
) -> nn.Module:
    """Build model ``name`` with ``mask`` in its attention layers (placement per the paper).

    ``overrides`` go to the builder (e.g. ``drop_path_rate=0.0``). The model carries
    ``paper_depth`` (depth as the paper counts it) and ``mask_name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; valid masks: {', '.join(MASKS)}")
    mask_kwargs = dict(mask_kwargs or {})

    def mask_factory(grid: int, num_heads: int):
        return build_mask(mask, grid, num_heads, **mask_kwargs)

    model = MODELS[name](mask_factory, img_size=img_size, num_classes=num_classes, **overrides)
    model.mask_name = mask
    return model


# Importing the builders registers them.
from . import cait, pit, swin, t2t, vit  # noqa: E402,F401
