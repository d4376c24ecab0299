"""The recipe: exact paper values, key validation, schedule, mixing, augmentation policy."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms import v2

from gmmvit.data import DATASETS
from gmmvit.recipe import (
    BUILTIN_RECIPES,
    BatchMixer,
    Recipe,
    build_optimizer,
    build_scheduler,
    resolve_recipe,
    steps_per_epoch,
    train_transform,
)


def test_paper_recipe_is_the_published_one():
    r = BUILTIN_RECIPES["paper"]
    assert (r.lr, r.weight_decay, r.batch_size, r.epochs, r.passes_per_epoch) == (1e-3, 0.05, 128, 100, 3)
    assert (r.warmup_epochs, r.min_lr, r.label_smoothing, r.drop_path) == (10, 1e-6, 0.1, 0.1)
    assert (r.hflip, r.crop_padding, r.autoaugment, r.random_erasing) == (True, 4, True, 0.25)
    assert (r.mix_prob, r.mixup_alpha, r.cutmix_alpha, r.grad_clip, r.mask_kernels) == (0.5, 1.0, 1.0, 0.0, 5)
    assert steps_per_epoch(50_000, r) == 1_171  # CIFAR: 3 passes of 50,000 at batch 128


def test_unknown_and_mistyped_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid keys: epochs"):
        resolve_recipe("paper", overrides={"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="epochs"):
        resolve_recipe("paper", sets=["epochs=ten"])
    with pytest.raises(ValueError, match="valid recipes: demo, paper, smoke"):
        resolve_recipe("fast")


def test_recipes_file_base_overrides_and_sets(tmp_path):
    f = tmp_path / "recipes.yaml"
    f.write_text("short:\n  base: paper\n  epochs: 7\n  lr: 1\n")
    r = resolve_recipe("short", f, overrides={"batch_size": 64}, sets=["lr=2e-4", "hflip=false"])
    assert (r.epochs, r.batch_size, r.lr, r.hflip, r.weight_decay) == (7, 64, 2e-4, False, 0.05)
    assert isinstance(resolve_recipe("short", f).lr, float)  # YAML's 1 becomes 1.0


def test_recipes_file_may_be_the_workflow_config():
    """`gmmvit train --recipes config.yaml --recipe laptop` gives the recipe the workflow's cells get:
    the description is prose, per_dataset applies to its dataset only."""
    config = Path(__file__).parents[1] / "config.yaml"
    laptop = resolve_recipe("laptop", config, dataset="cifar10")
    assert (laptop.epochs, laptop.limit_train, laptop.val_fraction, laptop.mix_prob) == (16, 5000, 0.1, 0.0)
    assert resolve_recipe("demo", config) == BUILTIN_RECIPES["demo"]


def test_recipes_file_per_dataset_overrides_apply_to_their_dataset(tmp_path):
    f = tmp_path / "recipes.yaml"
    f.write_text("short:\n  base: paper\n  description: a few epochs\n  epochs: 7\n"
                 "  per_dataset:\n    svhn: {epochs: 3}\n    cifar100:\n")  # cifar100: null, no keys
    assert resolve_recipe("short", f, dataset="svhn").epochs == 3
    assert resolve_recipe("short", f, dataset="cifar100").epochs == 7
    assert resolve_recipe("short", f, dataset="cifar10").epochs == 7
    assert resolve_recipe("short", f).epochs == 7


def test_schedule_per_step_warmup_then_cosine():
    recipe = BUILTIN_RECIPES["paper"]
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, recipe)
    n = 100  # steps per epoch
    sched = build_scheduler(opt, recipe, n)
    total, warm = 100 * n, 10 * n

    def lr(step: int) -> float:
        sched.step_update(step)
        return opt.param_groups[0]["lr"]

    assert lr(0) == pytest.approx(1e-6)
    assert lr(warm // 2) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-6)
    # after the warm-up: the half-cosine over the whole run (the official timm scheduler)
    for step in (warm, total // 2, total - 1):
        expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * step / total))
        assert lr(step) == pytest.approx(expected, rel=1e-6)
    assert lr(total) == pytest.approx(1e-6, rel=1e-3)


def test_mixing_probability_and_soft_targets():
    torch.manual_seed(0)
    mixer = BatchMixer(BUILTIN_RECIPES["paper"], num_classes=10)
    images = torch.rand(8, 3, 32, 32)
    labels = torch.arange(8)
    mixed = 0
    for _ in range(1000):
        out, target = mixer(images, labels)
        assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))
        mixed += not torch.equal(out, images)
    assert 0.45 < mixed / 1000 < 0.55
    never = BatchMixer(BUILTIN_RECIPES["paper"].replace(mix_prob=0.0), 10)
    out, target = never(images, labels)
    assert torch.equal(out, images) and torch.equal(target.argmax(1), labels)


@pytest.mark.parametrize(
    "dataset,policy",
    [("cifar10", "cifar10"), ("cifar100", "cifar10"), ("svhn", "svhn"), ("tinyimagenet", "imagenet")],
)
def test_autoaugment_policy_per_dataset(dataset, policy):
    spec = DATASETS[dataset]
    tf = train_transform(BUILTIN_RECIPES["paper"], (0.5,) * 3, (0.25,) * 3, spec.autoaugment, 32)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomHorizontalFlip", "RandomCrop", "AutoAugment", "ToDtype", "Normalize",
                     "OfficialRandomErasing"]
    assert tf.transforms[2].policy == v2.AutoAugmentPolicy(policy)
    assert tf.transforms[1].padding == [4, 4, 4, 4] and tf.transforms[-1].p == 0.25
    assert tf.transforms[-1].tries == 100  # torchvision tries 10 (no measurable difference at 32 px)
    out = tf(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError):
        Recipe(mix_prob=1.5)
    with pytest.raises(TypeError):
        Recipe(epochs=2.5)


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def test_autoaugment_fills_with_the_official_grey():
    torch.manual_seed(0)
    tf = train_transform(BUILTIN_RECIPES["paper"], CIFAR10_MEAN, CIFAR10_STD, "cifar10", 32)
    autoaugment = tf.transforms[2]
    black = torch.zeros(3, 32, 32, dtype=torch.uint8)
    # The CIFAR-10 policy rotates, shears or translates in about one draw in six (34 of these 200):
    # what moves in from outside a black image is the fill, grey (128) and never 0.
    grey = sum(bool((autoaugment(black) == 128).all(0).any()) for _ in range(200))
    assert grey >= 10


def _erased_boxes(draws: int, size: int = 32) -> tuple[list[tuple[int, int]], int]:
    """(h, w) of every box the paper recipe's erasing draws on a sentinel image, and the erased count."""
    torch.manual_seed(0)
    erasing = train_transform(BUILTIN_RECIPES["paper"], CIFAR10_MEAN, CIFAR10_STD, None, size).transforms[-1]
    sentinel = torch.full((3, size, size), -9.0)  # no normalised CIFAR pixel, nor a mean number
    fill = torch.tensor(CIFAR10_MEAN)[:, None]
    boxes = []
    for _ in range(draws):
        out = erasing(sentinel)
        changed = (out != -9.0).any(0)
        if not changed.any():
            continue
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and changed.sum() == h * w
        # the official quirk: the dataset's mean numbers, written into the normalised tensor
        assert torch.equal(out[:, changed], fill.expand(3, h * w))
        boxes.append((h, w))
    return boxes, len(boxes)


def official_erasing_boxes(n: int, size: int = 32, seed: int = 0) -> list[tuple[int, int]]:
    """The official sampler (PAPER.md), written out: up to 100 tries of an area fraction uniform
    in [0.02, 0.4] and an aspect ratio uniform (not log-uniform) in [0.3, 1/0.3]; the first box
    that fits is erased. The (h, w) of n erased boxes."""
    rng, boxes = random.Random(seed), []
    while len(boxes) < n:
        for _ in range(100):
            area = rng.uniform(0.02, 0.4) * size * size
            ratio = rng.uniform(0.3, 1 / 0.3)
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if h < size and w < size:
                boxes.append((h, w))
                break
    return boxes


def box_statistics(boxes: list[tuple[int, int]], size: int = 32) -> tuple[float, float, float]:
    """Mean area fraction, mean h / w, share of boxes taller than wide."""
    n = len(boxes)
    return (sum(h * w for h, w in boxes) / n / size**2, sum(h / w for h, w in boxes) / n,
            sum(h > w for h, w in boxes) / n)


def test_random_erasing_samples_boxes_as_the_official_code():
    # The official sampler's statistics, from 200,000 boxes of its transcription above (standard
    # errors 0.0002, 0.002, 0.001): mean area fraction about 0.20, mean h/w about 1.77, 3 in 4
    # boxes taller than wide. torchvision's own sampler (log-uniform ratio) gives h/w 1.24 and
    # half the boxes taller: the thresholds below tell the two apart.
    area, ratio, taller = box_statistics(official_erasing_boxes(200_000))
    draws = 4000
    boxes, erased = _erased_boxes(draws)
    assert abs(erased / draws - 0.25) < 0.03  # standard error 0.007
    areas = [h * w / 32**2 for h, w in boxes]
    assert all(0.015 <= a <= 0.42 for a in areas)  # [0.02, 0.4] up to the rounding of h and w
    assert max(areas) > 0.36  # about one box in ten when the area reaches 0.4
    ours = box_statistics(boxes)  # about 1,000 boxes: standard errors 0.0035, 0.03, 0.014
    assert abs(ours[0] - area) < 0.02, (ours, area)
    assert abs(ours[1] - ratio) < 0.15, (ours, ratio)  # log-uniform: 0.5 away
    assert abs(ours[2] - taller) < 0.08, (ours, taller)  # log-uniform: 0.27 away


def test_schema_recipe_keys_are_the_recipe_dataclass():
    schema = yaml.safe_load(
        (Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text()
    )["$defs"]
    keys = {f.name for f in dataclasses.fields(Recipe)}
    assert set(schema["recipe_keys"]["properties"]) == keys
    recipe = schema["recipe"]
    assert set(recipe["propertyNames"]["enum"]) == keys | {"base", "description", "per_dataset"}
    assert set(recipe["properties"]["per_dataset"]["additionalProperties"]["propertyNames"]["enum"]) == keys


def test_speed_keys_are_off_in_every_builtin_recipe():
    # workers, amp, tf32 and compile change how a run computes: off unless a recipe asks, so the
    # built-in recipes give the numbers they always gave
    for name, recipe in BUILTIN_RECIPES.items():
        assert (recipe.workers, recipe.amp, recipe.tf32, recipe.compile) == (0, False, False, False), name
    r = resolve_recipe("paper", sets=["workers=2", "amp=true", "tf32=yes", "compile=false"])
    assert (r.workers, r.amp, r.tf32, r.compile) == (2, True, True, False)
    with pytest.raises(ValueError, match="workers"):
        Recipe(workers=-1)
    with pytest.raises(TypeError, match="workers"):
        resolve_recipe("paper", sets=["workers=1.5"])
    with pytest.raises(TypeError, match="amp"):
        resolve_recipe("paper", overrides={"amp": 1})
