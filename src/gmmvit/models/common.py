"""Helpers shared by the model builders: input checks and the official code's initialisation."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


def check_divides(what: str, size: int, divisor: int, divisor_name: str) -> None:
    if size % divisor:
        raise ValueError(f"{what} {size} is not divisible by the {divisor_name} {divisor}")


def resolve_patch_size(img_size: int, patch_size: int | None, tokens_per_side: int) -> int:
    """The patch size: given, or the one that keeps the paper's fixed token grid (tokens_per_side
    patches a side at any image size); either way it must divide the image."""
    if patch_size is None:
        check_divides("image size", img_size, tokens_per_side, "token grid side")
        patch_size = img_size // tokens_per_side
    check_divides("image size", img_size, patch_size, "patch size")
    return patch_size


def official_init(model: nn.Module, embeddings: list[nn.Parameter] = ()) -> None:
    """The initialisation of the official ViT / PiT / CaiT: xavier-normal Linear and Conv weights,
    zero biases, LayerNorm (1, 0), and position embeddings / class tokens drawn from N(0, 1).

    Mask parameters are left as their own classes initialised them.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for p in embeddings:
            p.normal_(0.0, 1.0)


def init_as_linear_patch_embed(conv: nn.Conv2d) -> None:
    """Xavier-normal as the official ViT's Linear over flattened (p1 p2 c) patches would draw it.

    A Conv2d with kernel = stride = patch computes the same map, but xavier reads the conv weight's
    own fans (in*p*p, out*p*p): at patch 4, dim 192 that is std 0.025 against the Linear's 0.091.
    The draw is i.i.d., so the Linear's (p1 p2 c) input order does not matter.
    """
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    std = (2.0 / (fan_in + conv.out_channels)) ** 0.5
    with torch.no_grad():
        conv.weight.normal_(0.0, std)
        if conv.bias is not None:
            conv.bias.zero_()


def share_drop_path(model: nn.Module, rate: float) -> None:
    """The official ViT / PiT / CaiT use one DropPath of constant rate in every block (no ramp):
    replace every DropPath (or its Identity placeholder named drop_path*) with one shared module."""
    shared = DropPath(rate) if rate > 0 else nn.Identity()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name.startswith("drop_path") and isinstance(child, (DropPath, nn.Identity)):
                setattr(parent, child_name, shared)
