"""The ``cifar10`` and ``cifar100`` datasets: torchvision's on-disk layout of the python pickles,
read without running code from them, and fetched from the official tar.gz archives."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetError, DatasetSpec, ImageDataset, no_options, register_dataset
from .cache import files_key, load_cached
from .download import download, top_folder, unpack


class _RestrictedUnpickler(pickle.Unpickler):
    # The CIFAR pickles only need numpy's array reconstruction; refusing everything else means
    # a file from a mirror cannot run code.
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = _RestrictedUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a CIFAR batch (unpickled a {type(raw).__name__})")
    # Python 2 pickles read with latin1 give str keys; ones written by Python 3 may have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


@dataclass(frozen=True)
class CifarSpec(DatasetSpec):
    num_classes: int = 10
    train_files: tuple[str, ...] = ()
    test_file: str = ""
    meta_file: str = ""
    label_key: str = ""
    names_key: str = ""
    md5: str | None = None

    def expected_files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)

    def _read(self, folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            tuple[str, ...]]:
        def split(files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = [], []
            for file in files:
                batch = _read_pickle(folder / file)
                try:
                    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    label = np.asarray(batch[self.label_key], dtype=np.int64).reshape(-1)
                except (KeyError, ValueError) as err:
                    raise DatasetError(f"{folder / file} is not a {self.name} batch: {err}") from None
                if len(data) != len(label):
                    raise DatasetError(f"{folder / file}: {len(data)} images but {len(label)} labels")
                images.append(data)
                labels.append(label)
            # CIFAR rows are channel-major (1024 R, 1024 G, 1024 B), so a reshape is already NCHW.
            return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

        train_x, train_y = split(self.train_files)
        test_x, test_y = split([self.test_file])
        names = self._class_names(folder)
        for labels in (train_y, test_y):
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise DatasetError(f"{folder}: labels outside 0..{self.num_classes - 1}")
        return train_x, train_y, test_x, test_y, names

    def _class_names(self, folder: Path) -> tuple[str, ...]:
        names = tuple(str(n) for n in _read_pickle(folder / self.meta_file).get(self.names_key, ()))
        if len(names) != self.num_classes:
            raise DatasetError(f"{folder / self.meta_file}: expected {self.num_classes} class names "
                               f"under {self.names_key!r}, found {len(names)}")
        return names

    def load(self, root: Path, **options: Any) -> ImageDataset:
        no_options(self.name, options)
        assert self.folder is not None
        self._require_files(root)
        folder = root / self.folder
        key = files_key(folder, [[folder / f for f in self.expected_files()]], 32, self.name)
        arrays, facts = load_cached(folder, key, 32, lambda: self._read(folder)[:4], name=self.name)
        assert self.mean is not None and self.std is not None
        return ImageDataset(self.name, *arrays, self.num_classes, self.mean, self.std,
                            self.autoaugment, self._class_names(folder),
                            known_fingerprint=facts.fingerprint if facts else None)

    def warm_cache(self, root: Path, progress: bool) -> None:
        self.load(root)  # writes the decoded cache the training jobs read

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        assert self.folder is not None
        archive = tmp / "download.tar.gz"
        download(source, archive, progress, self.md5 if official else None)
        unpack(archive, tmp / "unpacked", source)
        archive.unlink()
        return top_folder(tmp / "unpacked", self.folder, source)

    def verify(self, folder: Path) -> dict[str, int]:
        missing = [f for f in self.expected_files() if not (folder / f).is_file()]
        if missing:
            raise DatasetError(f"{folder.name}/ lacks {', '.join(missing)}")
        train_x, _, test_x, _, names = self._read(folder)
        return {"classes": len(names), "train": len(train_x), "test": len(test_x)}


register_dataset(CifarSpec(
    "cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    autoaugment="cifar10", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    folder="cifar-10-batches-py", num_classes=10,
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch",
    meta_file="batches.meta", label_key="labels", names_key="label_names",
    md5="c58f30108f718f92721af3b95e74349a",
))
register_dataset(CifarSpec(
    "cifar100", mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    autoaugment="cifar10", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    folder="cifar-100-python", num_classes=100, train_files=("train",), test_file="test",
    meta_file="meta", label_key="fine_labels", names_key="fine_label_names",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
))
