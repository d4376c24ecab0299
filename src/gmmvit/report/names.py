"""How the report names what it shows: display names of models, masks and datasets, in the paper's
order, and the labels of a table row or a plot legend built from them."""

from __future__ import annotations

from collections.abc import Iterable

# Display order and names: the paper's table order first; unknown names (a new registry entry)
# follow in order of appearance, under their own name.
MODEL_NAMES = {"vit": "ViT", "swin": "Swin", "cait": "CaiT", "pit": "PiT", "t2t": "T2T"}
MASK_NAMES = {"none": "", "gmm": "GMM", "elm": "ELM", "rmt": "RMT", "gmm_add": "GMM-add",
              "gmm_official": "GMM-official", "alibi2d": "ALiBi-2D", "lsa": "LSA", "temperature": "Temp",
              "gpsa": "GPSA"}
DATASET_NAMES = {"digits": "Digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN",
                 "tinyimagenet": "Tiny-ImageNet", "folder": "Folder"}
NOT_LEARNED = "✗"


def ordered(values: Iterable[str], known: dict[str, str]) -> list[str]:
    """The distinct ``values``: those ``known`` names in its order, then the rest as they come."""
    present = list(dict.fromkeys(values))
    return [v for v in known if v in present] + [v for v in present if v not in known]


def mask_label(mask: str) -> tuple[str, str]:
    """A mask spec's display name and variant: ("GMM", "") for gmm, ("GMM", " (K=3)") for gmm-k3."""
    family, dash_k, kernels = mask.partition("-k")
    if dash_k and kernels.isdigit() and family in MASK_NAMES:
        return MASK_NAMES[family], f" (K={kernels})"
    return MASK_NAMES.get(mask, mask.upper()), ""


def row_label(model: str, mask: str) -> str:
    """GMM-ViT, or GMM-ViT (K=3) for the spec gmm-k3."""
    name = MODEL_NAMES.get(model, model)
    prefix, variant = mask_label(mask)
    return (f"{prefix}-{name}" if prefix else name) + variant
