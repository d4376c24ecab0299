"""Parameters and MACs of a model: fvcore's operator count, and the paper's module-hook convention.

fvcore counts, per image, the multiply-accumulates of Linear layers, convolutions and matrix products
(matmul, bmm, mm, addmm, einsum; biases not counted), the attention products q.k^T and attn.v
(through our handle of scaled_dot_product_attention, which fvcore lacks), norms at fvcore's rough
estimate of 5 per element with an affine (4 without), and 1 per input element of upsampling and
adaptive average pooling. It skips softmax, activations (GELU), residual additions and every other
element-wise operation (the masks' arithmetic included); the JSON key ``macs_all`` holds that total.
"""

from __future__ import annotations

import math

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from .masks import LocalityMask
from .models import build_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_mask_parameters(model: nn.Module) -> int:
    return sum(
        p.numel() for m in model.modules() if isinstance(m, LocalityMask) for p in m.parameters()
    )


def _sdpa_macs(inputs, outputs) -> int:
    # fvcore has no handle for this operator and would silently count it as 0.
    # q (..., L, E) k (..., S, E) v (..., S, Ev): q k^T is L*S*E MACs, attn v is L*S*Ev.
    q, k, v = (inp.type().sizes() for inp in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def macs_by_operator(model: nn.Module, img_size: int) -> dict[str, int]:
    """fvcore's MACs of one image per operator kind (``linear``, ``conv``, ``matmul``,
    ``layer_norm``, ``scaled_dot_product_attention``, ...); the operators fvcore skips (module
    docstring) are absent."""
    x = torch.zeros(1, 3, img_size, img_size)
    analysis = FlopCountAnalysis(model, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return {op: int(macs) for op, macs in analysis.by_operator().items()}


def macs_all_operators(model: nn.Module, img_size: int) -> int:
    """fvcore's MACs of one image: the operators it counts, attention products included (module
    docstring); not softmax, activations or other element-wise operations."""
    return sum(macs_by_operator(model, img_size).values())


def macs_paper_convention(model: nn.Module, img_size: int) -> int:
    """MACs as the paper counts them (ptflops-style module hooks, one image):

    Linear: in * out per token, + out once for the bias; Conv: per output position, bias included;
    LayerNorm: 2 per element. Attention products, softmax, activations and the mask's own
    operations are not counted, which is why masked and unmasked models show the same figure.
    """
    total = 0

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        tokens = inputs[0].numel() // module.in_features
        total += tokens * module.in_features * module.out_features
        total += module.out_features if module.bias is not None else 0

    def conv_hook(module: nn.Conv2d | nn.Conv1d, inputs, output) -> None:
        nonlocal total
        positions = output.numel() // module.out_channels
        kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
        total += positions * module.out_channels * (kernel + (module.bias is not None))

    def norm_hook(module: nn.LayerNorm, inputs, output) -> None:
        nonlocal total
        total += inputs[0].numel() * (2 if module.elementwise_affine else 1)

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.LayerNorm):
            hooks.append(module.register_forward_hook(norm_hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in hooks:
            h.remove()
    return total


def measure(model: str, mask: str = "none", img_size: int = 32, num_classes: int = 10, **kwargs) -> dict:
    """One flat record: trainable parameters, MACs both ways (``macs_all``: fvcore's count, see the
    module docstring; ``macs_paper``: the paper's convention), depth as the paper counts it."""
    net = build_model(model, mask=mask, img_size=img_size, num_classes=num_classes, **kwargs).eval()
    return {
        "model": model,
        "mask": mask,
        "img_size": img_size,
        "num_classes": num_classes,
        "params": count_parameters(net),
        "mask_params": count_mask_parameters(net),
        "macs_all": macs_all_operators(net, img_size),
        "macs_paper": macs_paper_convention(net, img_size),
        "depth": net.paper_depth,
    } | ({"mask_kwargs": kwargs["mask_kwargs"]} if kwargs.get("mask_kwargs") else {})
