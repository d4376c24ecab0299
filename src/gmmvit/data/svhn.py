"""The ``svhn`` dataset: the cropped-digits .mat files of the Street View House Numbers (train and
test), fetched one file at a time from the official folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetError, DatasetSpec, ImageDataset, no_options, register_dataset
from .cache import files_key, load_cached
from .download import download, join_url


@dataclass(frozen=True)
class SvhnSpec(DatasetSpec):
    files: tuple[str, str] = ("train_32x32.mat", "test_32x32.mat")
    md5: tuple[str, str] = ("", "")

    def expected_files(self) -> tuple[str, ...]:
        return self.files

    def download_urls(self) -> tuple[str, ...]:
        return tuple(join_url(self.url or "", f) for f in self.files)

    def source_kind(self) -> str:
        return f"the folder holding {' and '.join(self.files)}"

    def unpacked_by_hand(self, where: Path) -> str:
        return f"download {' and '.join(self.download_urls())} into {where}"

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        import scipy.io

        try:
            mat = scipy.io.loadmat(path, variable_names=("X", "y"))
            x, y = mat["X"], mat["y"]
        except Exception as err:  # scipy raises many types (ValueError, MatReadError, ...) for bad files
            raise DatasetError(f"cannot read {path}: {type(err).__name__}: {err}") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise DatasetError(f"{path}: expected X (32, 32, 3, N) and y (N, 1), got "
                               f"{x.shape} and {y.shape}")
        labels = torch.from_numpy(y.reshape(-1).astype(np.int64))
        labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
            raise DatasetError(f"{path}: labels outside 0..10")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))
        return images, labels

    def load(self, root: Path, **options: Any) -> ImageDataset:
        no_options(self.name, options)
        assert self.folder is not None and self.mean is not None and self.std is not None
        folder = root / self.folder
        self._require_files(root)
        key = files_key(folder, [[folder / f for f in self.files]], 32, self.name)
        def decode() -> tuple[torch.Tensor, ...]:
            return (*self._read(folder / self.files[0]), *self._read(folder / self.files[1]))

        arrays, facts = load_cached(folder, key, 32, decode, name=self.name)
        return ImageDataset(self.name, *arrays, 10, self.mean, self.std, self.autoaugment,
                            tuple(str(d) for d in range(10)),
                            known_fingerprint=facts.fingerprint if facts else None)

    def warm_cache(self, root: Path, progress: bool) -> None:
        self.load(root)  # writes the decoded cache the training jobs read

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        assert self.folder is not None
        staged = tmp / self.folder
        staged.mkdir()
        for file, md5 in zip(self.files, self.md5):
            download(join_url(source, file), staged / file, progress, md5 if official else None)
        return staged

    def verify(self, folder: Path) -> dict[str, int]:
        train_x, _ = self._read(folder / self.files[0])
        test_x, _ = self._read(folder / self.files[1])
        return {"classes": 10, "train": len(train_x), "test": len(test_x)}


register_dataset(SvhnSpec(
    "svhn", mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), autoaugment="svhn",
    url="http://ufldl.stanford.edu/housenumbers/", folder="svhn",
    md5=("e26dedcc434d2e4c54c9b2d4a06d8373", "eb5a983be6a315427106f1b164d9cef3"),
))
