"""The recipe: exact paper values, key validation, schedule, mixing, augmentation policy."""

from __future__ import annotations

import math

import pytest
import torch
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
                     "RandomErasing"]
    assert tf.transforms[2].policy == v2.AutoAugmentPolicy(policy)
    assert tf.transforms[1].padding == [4, 4, 4, 4] and tf.transforms[-1].p == 0.25
    out = tf(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError):
        Recipe(mix_prob=1.5)
    with pytest.raises(TypeError):
        Recipe(epochs=2.5)
