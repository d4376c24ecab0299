"""Seeded, class-stratified subsets of a labelled split: the validation hold-out and the
``limit_train`` / ``limit_test`` subsets.

Every dataset in memory is stored class-sorted or nearly so (CIFAR batches, image folders), so "the
first N images" would be a few classes only. A subset here keeps each class's share of the split
(largest remainders), draws the images of each class at random with a fixed seed, and depends only
on the labels: every cell of a dataset gets the same subset, whatever its model, mask or seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPLIT_SEED = 0  # one fixed seed: the subsets belong to the dataset, not to a cell


def class_quotas(labels: Tensor, count: int) -> dict[int, int]:
    """How many of ``count`` images each class gets: its share, rounded by largest remainders."""
    classes, sizes = torch.unique(labels, return_counts=True)
    exact = sizes.double() * count / len(labels)
    quota = exact.floor().long()
    short = count - int(quota.sum())
    # Hand the rounding remainder to the classes with the largest fractional parts (ties: lower class).
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
    for i in order[:short]:
        quota[i] += 1
    return {int(c): int(q) for c, q in zip(classes, quota)}


def stratified_indices(labels: Tensor, count: int, seed: int = SPLIT_SEED) -> Tensor:
    """Sorted indices of ``count`` images of ``labels``, stratified by class, seeded."""
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot take {count} of {len(labels)} images")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, quota in class_quotas(labels, count).items():
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    return torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.long)


def hold_out(labels: Tensor, fraction: float, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(kept, held-out) sorted indices: ``fraction`` of the images per class held out, seeded."""
    if not 0 <= fraction < 1:
        raise ValueError(f"a held-out fraction must lie in [0, 1), got {fraction}")
    held = stratified_indices(labels, round(fraction * len(labels)), seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return torch.nonzero(keep).flatten(), held


__all__ = ["SPLIT_SEED", "class_quotas", "stratified_indices", "hold_out"]
