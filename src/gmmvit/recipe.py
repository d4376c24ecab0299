"""The training recipe: a frozen, typed set of keys, and the pieces built from it with libraries
(torchvision.transforms.v2 augmentation and batch mixing, timm's cosine schedule, torch's AdamW).

Built-in recipes: ``paper`` (the published recipe, exactly), ``demo`` (the default grid on a 2-core
CPU, tuned by measurement, see README), ``smoke`` (seconds, for tests). A recipes YAML file maps
names to ``{base: <built-in>, key: value, ...}``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torchvision.transforms import v2

from .registry import recipe_keys


@dataclass(frozen=True)
class Recipe:
    # schedule: an "epoch" is passes_per_epoch shuffled passes over the training set (the official
    # code's "100 epochs x 3"); lr stepped every iteration: linear warm-up from min_lr, cosine to min_lr
    epochs: int = 100
    passes_per_epoch: int = 3
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05  # on every parameter, mask parameters included (official)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (the paper does not clip)
    # regularisation
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    # per-image augmentation, in this order, then normalisation and random erasing
    hflip: bool = True
    crop_padding: int = 4  # random crop after zero padding; 0 = off
    autoaugment: bool = True  # with the dataset's policy (CIFAR10 / SVHN / IMAGENET)
    random_erasing: float = 0.25
    # per-batch mixing: with probability mix_prob, CutMix or Mixup (50/50)
    mix_prob: float = 0.5
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 1.0
    # model
    mask_kernels: int = 5  # K of the GMM mask
    # data
    limit_train: int = 0  # a class-stratified, seeded subset of N training images (0 = all)
    limit_test: int = 0  # the same for the test split
    img_size: int = 0  # resize to this size; 0 = the dataset's own
    # epoch selection: hold out this fraction of the training images (per class, the same for
    # every cell of a dataset) and report test top-1 at the best validation epoch; 0 = no hold-out,
    # the best test epoch is reported instead (the paper's way)
    val_fraction: float = 0.0
    # reproducibility: deterministic kernels where the device has them (cuDNN, cuBLAS)
    deterministic: bool = True
    # speed (all off by default, so the built-in recipes compute exactly what they always did):
    # DataLoader worker processes that augment the batches, one thread each; 0 = in the training
    # process, on the training RNG. From 1 on, each batch is augmented from its own seed, drawn from
    # the cell's shuffle generator: the same numbers for 1, 2 or 16 workers (not those of 0).
    workers: int = 0
    amp: bool = False  # bf16 autocast of the training and evaluation forward passes (no loss scaling)
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions (no effect on the CPU)
    compile: bool = False  # torch.compile the model for the training steps

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool}[f.type]
            if isinstance(value, bool) and f.type != "bool" or not isinstance(value, expected):
                raise TypeError(f"recipe key {f.name!r} must be {f.type}, got {value!r}")
        # every value checked before a run touches anything (a bad one fails at once, not an epoch in)
        for name in ("epochs", "passes_per_epoch", "batch_size", "eval_batch_size", "mask_kernels"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe key {name} must be at least 1, got {getattr(self, name)}")
        for name in ("crop_padding", "limit_train", "limit_test", "img_size", "min_lr", "warmup_epochs",
                     "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe key {name} must be at least 0, got {getattr(self, name)}")
        for name in ("lr", "mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"recipe key {name} must be above 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"recipe key {name} must lie in [0, 1), got {getattr(self, name)}")
        if not all(math.isfinite(getattr(self, f.name)) for f in fields(self) if f.type == "float"):
            raise ValueError("recipe keys must be finite numbers (no nan or inf)")
        if not 0 <= self.mix_prob <= 1 or not 0 <= self.random_erasing <= 1:
            raise ValueError("recipe probabilities mix_prob and random_erasing must lie in [0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"recipe key val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"recipe key workers must be >= 0, got {self.workers}")

    def replace(self, **changes: Any) -> Recipe:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(
                f"unknown recipe key(s) {', '.join(sorted(unknown))}; valid keys: "
                + ", ".join(f.name for f in fields(self))
            )
        # Accept integers for float keys (YAML writes 1 for 1.0) but nothing looser.
        for f in fields(self):
            if f.name in changes and f.type == "float" and isinstance(changes[f.name], int) \
                    and not isinstance(changes[f.name], bool):
                changes[f.name] = float(changes[f.name])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BUILTIN_RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),
    # Tuned by measurement on this project's 2-core CPU: see README "The demo recipe".
    "demo": Recipe(
        epochs=3,
        passes_per_epoch=1,
        batch_size=16,  # more steps per image: what short runs need most (measured, see README)
        lr=1e-3,
        warmup_epochs=0.5,
        grad_clip=1.0,  # keeps the multiplicative masks' early steps bounded
        drop_path=0.0,
        hflip=False,  # digits are not mirror-symmetric
        crop_padding=2,
        autoaugment=False,
        random_erasing=0.0,
        mix_prob=0.0,
        val_fraction=0.1,  # 144 of the 1,437 training digits select the reported epoch
    ),
    "smoke": Recipe(
        epochs=2, passes_per_epoch=1, batch_size=16, eval_batch_size=64, lr=5e-4, warmup_epochs=0.5,
        grad_clip=1.0, limit_train=64, limit_test=32, val_fraction=0.25,
    ),
}


def _parse_value(text: str) -> Any:
    """`--set key=value`: 5 -> int, 1e-3 -> float (YAML 1.1 would keep "1e-3" a string), else YAML."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def resolve_recipe(
    name: str,
    recipes_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    dataset: str | None = None,
) -> Recipe:
    """Built-in or file-defined recipe ``name``, then ``overrides``, then ``key=value`` sets.

    ``recipes_file``: YAML of ``name: {base: <built-in>, key: value, ...}``, or a workflow config
    (config.yaml) whose ``recipes:`` section has that form. A recipe's ``description`` is prose,
    and its ``per_dataset: {<dataset>: {key: value}}`` applies to ``dataset`` only, as in the workflow.
    """
    defined: dict[str, dict] = {}
    if recipes_file is not None:
        defined = yaml.safe_load(Path(recipes_file).read_text()) or {}
        if isinstance(defined.get("recipes"), dict) and "grids" in defined:  # a workflow config
            defined = defined["recipes"]
    if name in defined:
        spec = defined[name] or {}
        base = spec.get("base", name if name in BUILTIN_RECIPES else "paper")
        if base not in BUILTIN_RECIPES:
            raise ValueError(f"recipe {name!r}: unknown base {base!r}; "
                             f"built-in: {', '.join(BUILTIN_RECIPES)}")
        recipe = BUILTIN_RECIPES[base].replace(**recipe_keys(spec, dataset))
    elif name in BUILTIN_RECIPES:
        recipe = BUILTIN_RECIPES[name]
    else:
        known = sorted(set(BUILTIN_RECIPES) | set(defined))
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(known)}")
    recipe = recipe.replace(**(overrides or {}))
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        recipe = recipe.replace(**{key.strip(): _parse_value(value)})
    return recipe


# ---------------------------------------------------------------- augmentation and mixing


OFFICIAL_GREY = (128, 128, 128)  # the official AutoAugment's fill of rotations, shears, translations


class OfficialRandomErasing(v2.RandomErasing):
    """Random erasing sampled as the official code (Zhong et al.'s reference implementation) does:
    up to ``tries`` draws of an area fraction uniform in ``scale`` and an aspect ratio h/w uniform in
    ``ratio``; the first box that fits inside the image is filled with ``value``, per channel.

    torchvision draws the ratio log-uniformly (as many wide boxes as tall ones) and tries 10 times;
    the official uniform draw makes three boxes in four taller than wide (mean h/w 1.77 against 1.24
    at 32 px, by Monte Carlo). Only the box sampler is replaced: the probability ``p``, the fill and the
    erasing itself remain torchvision's.
    """

    def __init__(
        self,
        p: float,
        value: tuple[float, ...],
        scale: tuple[float, float] = (0.02, 0.4),
        ratio: tuple[float, float] = (0.3, 1 / 0.3),
        tries: int = 100,
    ) -> None:
        super().__init__(p=p, scale=scale, ratio=ratio, value=value)
        self.tries = tries

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # Written by hand because v2.RandomErasing has no option for a uniform ratio or the number of
        # tries; the rest follows its own make_params (same rounding, fit test and corner draw).
        _, height, width = v2.query_chw(flat_inputs)
        for _ in range(self.tries):
            area = height * width * torch.empty(()).uniform_(*self.scale).item()
            ratio = torch.empty(()).uniform_(*self.ratio).item()
            h, w = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return dict(i=top, j=left, h=h, w=w, v=torch.tensor(self.value)[:, None, None])
        return dict(i=0, j=0, h=height, w=width, v=None)  # no box fitted: the image is left as is


def train_transform(recipe: Recipe, mean, std, policy: str | None, img_size: int) -> v2.Compose:
    """Per-image augmentation on uint8 (3, H, W) tensors, in the official order."""
    steps: list[nn.Module] = []
    if recipe.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if recipe.crop_padding:
        steps.append(v2.RandomCrop(img_size, padding=recipe.crop_padding))
    if recipe.autoaugment and policy is not None:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=OFFICIAL_GREY))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if recipe.random_erasing:
        # The official quirk: the dataset's mean numbers are written into the already normalised
        # tensor (not the normalised mean, which would be 0).
        steps.append(OfficialRandomErasing(p=recipe.random_erasing, value=tuple(mean)))
    return v2.Compose(steps)


def eval_transform(mean, std) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class BatchMixer:
    """With probability ``p`` per batch, CutMix or Mixup (50/50, torchvision's); otherwise one-hot
    targets, so the loss always sees soft (B, C) targets."""

    def __init__(self, recipe: Recipe, num_classes: int) -> None:
        self.p, self.num_classes = recipe.mix_prob, num_classes
        self.mix = v2.RandomChoice(
            [v2.CutMix(alpha=recipe.cutmix_alpha, num_classes=num_classes),
             v2.MixUp(alpha=recipe.mixup_alpha, num_classes=num_classes)]
        )

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.p > 0 and torch.rand(()).item() < self.p:
            return self.mix(images, labels)
        return images, F.one_hot(labels, self.num_classes).float()


# ---------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, recipe: Recipe, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; ``fused``: torch's single-kernel implementation (portable numerics: it avoids MKL's
    vector square root, whose bits depend on the CPU; the default implementation stays for native)."""
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                             **({"fused": True} if fused else {}))


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
) -> CosineLRScheduler:
    """Stepped every iteration: linear from min_lr to lr over the warm-up, then the half-cosine
    (over the whole run, as the official code's timm scheduler) down to min_lr."""
    total = recipe.epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=recipe.min_lr,
        warmup_t=round(recipe.warmup_epochs * steps_per_epoch),
        warmup_lr_init=recipe.min_lr,
        t_in_epochs=False,
    )


def soft_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def steps_per_epoch(num_train: int, recipe: Recipe) -> int:
    """Full batches per epoch (drop_last, as the official loader: 1,171 on CIFAR); at least one."""
    return max(1, (num_train * recipe.passes_per_epoch) // recipe.batch_size)


__all__ = [
    "Recipe", "BUILTIN_RECIPES", "resolve_recipe", "train_transform", "eval_transform", "BatchMixer",
    "OfficialRandomErasing",
    "build_optimizer", "build_scheduler", "soft_cross_entropy", "steps_per_epoch",
]
