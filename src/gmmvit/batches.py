"""The images a cell trains and is evaluated on: the seeded subsets and validation hold-out of its
dataset, and the loader that shuffles and augments the training batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from torchvision.transforms.v2.functional import resize

from .data import ImageDataset
from .errors import UserError
from .recipe import Recipe
from .splits import hold_out, stratified_indices


class Splits(NamedTuple):
    """uint8 images (N, C, H, W) and labels of each split, at the size the cell trains at."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    img_size: int


def split_data(data: ImageDataset, recipe: Recipe) -> Splits:
    """The recipe's subsets, validation hold-out and image size. Subsets and the hold-out are seeded
    and stratified by class, the same for every cell of the dataset (datasets are stored
    class-sorted: "the first N" would be a few classes)."""
    if data.num_classes < 2:
        raise UserError(f"dataset {data.name!r} has {data.num_classes} class: a classifier needs at least 2")
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    if recipe.limit_train:
        keep = stratified_indices(train_y, min(recipe.limit_train, len(train_y)))
        train_x, train_y = train_x[keep], train_y[keep]
    if recipe.limit_test:
        keep = stratified_indices(test_y, min(recipe.limit_test, len(test_y)))
        test_x, test_y = test_x[keep], test_y[keep]
    keep, held = hold_out(train_y, recipe.val_fraction)
    if recipe.val_fraction and len(held) == 0:
        # never a silent switch to selecting the epoch on the test set
        raise UserError(f"recipe val_fraction {recipe.val_fraction} of {len(train_y)} training images holds "
                        "out none: raise limit_train or val_fraction, or set val_fraction 0 to select the "
                        "epoch on the test set (the paper's way)")
    if len(keep) == 0 or len(test_y) == 0:
        raise UserError(f"dataset {data.name!r} leaves {len(keep)} training and {len(test_y)} test images "
                        "under this recipe: each split needs at least one")
    val_x, val_y = train_x[held], train_y[held]
    train_x, train_y = train_x[keep], train_y[keep]
    img_size = recipe.img_size or data.img_size
    if img_size != data.img_size:  # the recipe's img_size: resize once, in memory
        train_x, val_x, test_x = (resize(x, [img_size, img_size], antialias=True)
                                  for x in (train_x, val_x, test_x))
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, img_size)


class AugmentedImages(Dataset):
    """uint8 images in memory, augmented per image as tensors when fetched."""

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        # A whole batch at once, on one thread: on a 32x32 image torch's intra-op threads cost far
        # more than they save (measured: AutoAugment & co. 5.7 ms per image on 2 threads, 0.18 on 1).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self[i] for i in indices]
        finally:
            torch.set_num_threads(threads)


class BatchSeededImages(AugmentedImages):
    """The training images for worker processes: a batch arrives as (index, batch_seed) pairs and is
    augmented from torch's CPU RNG seeded with its batch seed. Its augmentation then depends neither
    on which worker draws it nor on what that worker drew before, so any worker count >= 1 gives the
    same numbers, and a resumed run (fresh workers) the same as an uninterrupted one."""

    def __getitems__(self, pairs: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        seeds = {seed for _, seed in pairs}
        if len(seeds) != 1:
            raise ValueError(f"a batch must carry one seed, got {len(seeds)}")
        # fork_rng puts the RNG back afterwards: harmless in a worker, and in the training process
        # (a test, a benchmark) the training RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seeds.pop())
            return super().__getitems__([index for index, _ in pairs])


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """The batches of ``batches`` (shuffled from the cell's generator), each index paired with one
    seed per batch, drawn from the same generator once the epoch's order is drawn."""

    def __init__(self, batches: BatchSampler, generator: torch.Generator) -> None:
        self.batches, self.generator = batches, generator

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        # The whole epoch is drawn at its first batch, so the generator's state after the epoch
        # (what the checkpoint saves) does not depend on how far the loader has prefetched.
        order = list(self.batches)
        seeds = torch.randint(0, 2**62, (len(order),), generator=self.generator).tolist()
        for batch, seed in zip(order, seeds):
            yield [(index, seed) for index in batch]


def training_loader(images: Tensor, labels: Tensor, transform, recipe: Recipe, shuffle: torch.Generator,
                    device: torch.device) -> DataLoader:
    """The training batches: ``passes_per_epoch`` shuffled passes an epoch, full batches only (unless
    the set is smaller than one batch).

    ``workers == 0``: augmented in this process from the training RNG, the loader every recipe has
    always used (its numbers unchanged). ``workers >= 1``: the same image order, augmented in
    persistent worker processes (one thread each: torch's worker loop sets it) from per-batch seeds.
    """
    num_samples = len(labels) * recipe.passes_per_epoch
    sampler = RandomSampler(range(len(labels)), num_samples=num_samples, generator=shuffle)
    drop_last = num_samples >= recipe.batch_size
    pin = device.type == "cuda"  # page-locked batches: the copies to the GPU can be asynchronous
    if recipe.workers == 0:
        return DataLoader(AugmentedImages(images, labels, transform), batch_size=recipe.batch_size,
                          sampler=sampler, drop_last=drop_last, pin_memory=pin)
    return DataLoader(
        BatchSeededImages(images, labels, transform),
        batch_sampler=SeededBatches(BatchSampler(sampler, recipe.batch_size, drop_last), shuffle),
        num_workers=recipe.workers, persistent_workers=True, pin_memory=pin,
        # The loader draws its workers' base seed whenever it makes an iterator (after a resume, at
        # another epoch): from this generator, not the training RNG, which it would shift. The
        # batches do not use the base seed: they are seeded by SeededBatches.
        generator=torch.Generator().manual_seed(0),
    )


__all__ = ["AugmentedImages", "BatchSeededImages", "SeededBatches", "Splits", "split_data", "training_loader"]
