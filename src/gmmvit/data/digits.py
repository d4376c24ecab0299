"""The ``digits`` dataset: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 RGB
with a fixed split; it needs no files and is the offline default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetSpec, ImageDataset, channel_stats, no_options, register_dataset


@dataclass(frozen=True)
class DigitsSpec(DatasetSpec):
    """scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 RGB; a fixed split."""

    img_size: int = 32
    test_size: int = 360

    def load(self, root: Path, **options: Any) -> ImageDataset:
        no_options(self.name, options)
        import torch.nn.functional as F
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        pixels = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
        pixels = F.interpolate(pixels, size=(self.img_size, self.img_size), mode="bilinear",
                               align_corners=False)
        images = pixels.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        labels = torch.from_numpy(bunch.target).to(torch.int64)
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=self.test_size,
                                               random_state=0, stratify=bunch.target)
        # Original order within each split, so the split is a fixed set in a fixed order.
        train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
        train_images = images[train_idx].contiguous()
        mean, std = channel_stats(train_images)
        return ImageDataset(self.name, train_images, labels[train_idx], images[test_idx].contiguous(),
                            labels[test_idx], 10, mean, std, self.autoaugment,
                            tuple(str(d) for d in range(10)))


register_dataset(DigitsSpec("digits", mean=None, std=None, autoaugment=None))
