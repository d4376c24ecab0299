"""The ``tinyimagenet`` dataset: Tiny-ImageNet's 200 classes of 64 px JPEGs, fetched as the official
zip, whose flat val/images/ ``prepare`` sorts into class folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .base import DatasetError, DatasetSpec, ImageDataset, register_dataset
from .decode import load_tree_cached, scan_tree
from .download import download, top_folder, unpack

# Read at verification time (not copied into the spec) so tests can monkeypatch it.
TINYIMAGENET_EXPECTED: dict[str, int] = {"classes": 200, "train": 100_000, "val": 10_000}


@dataclass(frozen=True)
class TinyImageNetSpec(DatasetSpec):
    img_size: int = 64
    eval_split: ClassVar[str] = "val"

    def expected_counts(self) -> Mapping[str, int]:
        return TINYIMAGENET_EXPECTED

    def expected_files(self) -> tuple[str, ...]:
        return ("train/<wnid>/images/*.JPEG", "val/<wnid>/*.JPEG")

    def unpacked_by_hand(self, where: Path) -> str:
        # prepare sorts the zip's flat val/images/ into class folders itself (see adopt).
        return (f"unpack {self.source_kind()} into {where.parent} so that {where} holds train/ and "
                "val/ as in the zip (val/images/ and val/val_annotations.txt)")

    def load(self, root: Path, *, progress: bool = True) -> ImageDataset:
        assert self.folder is not None and self.mean is not None and self.std is not None
        folder = root / self.folder
        if not (folder / "train").is_dir() or not (folder / "val").is_dir():
            raise self.missing_error(root)
        if (folder / "val" / "images").is_dir():
            raise self.missing_error(root, "val/images/ is not yet sorted into class folders",
                                     problem="dataset not yet prepared in")
        train, val = scan_tree(folder / "train", folder / "val")
        classes = tuple(train)
        (train_x, train_y, test_x, test_y), facts = load_tree_cached(
            self.name, folder, classes, train, val, self.img_size, "val", progress)
        return ImageDataset(self.name, train_x, train_y, test_x, test_y, len(classes), self.mean,
                            self.std, self.autoaugment, classes,
                            known_fingerprint=facts.fingerprint if facts else None)

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        assert self.folder is not None
        archive = tmp / "download.zip"
        download(source, archive, progress)  # no published md5 for this archive
        unpack(archive, tmp / "unpacked", source)
        archive.unlink()
        staged = top_folder(tmp / "unpacked", self.folder, source)
        self._sort_val(staged / "val", source)
        return staged

    def warm_cache(self, root: Path, progress: bool) -> None:
        self.load(root, progress=progress)  # writes the decoded cache the training jobs read

    def adopt(self, folder: Path, origin: str) -> None:
        # The official zip unpacked by hand: sorting in place is what the user wants, and it
        # can resume after an interruption because already-moved files are skipped.
        if (folder / "val" / "images").is_dir():
            self._sort_val(folder / "val", origin)

    @staticmethod
    def _sort_val(val: Path, origin: str) -> None:
        annotations = val / "val_annotations.txt"
        if not annotations.is_file():
            raise DatasetError(f"tinyimagenet: data from {origin} lacks val/val_annotations.txt")
        for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DatasetError(f"{annotations}:{line_no}: expected 'filename<TAB>wnid...', got {line!r}")
            file, wnid = fields[0].strip(), fields[1].strip()
            image = val / "images" / file
            if (val / wnid / file).is_file() and not image.exists():
                continue  # moved by an earlier, interrupted run
            if not image.is_file():
                raise DatasetError(f"{annotations}:{line_no}: {file} is not in val/images/")
            (val / wnid).mkdir(exist_ok=True)
            os.replace(image, val / wnid / file)
        shutil.rmtree(val / "images", ignore_errors=True)

    def verify(self, folder: Path) -> dict[str, int]:
        for sub in ("train", "val"):
            if not (folder / sub).is_dir():
                raise DatasetError(f"{folder.name}/ has no {sub}/ folder")
        if (folder / "val" / "images").is_dir():
            raise DatasetError(f"{folder / 'val' / 'images'} is not sorted into class folders")
        train, val = scan_tree(folder / "train", folder / "val")
        return {"classes": len(train), "train": sum(map(len, train.values())),
                "val": sum(map(len, val.values()))}


register_dataset(TinyImageNetSpec(
    "tinyimagenet", mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
    autoaugment="imagenet", url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    folder="tiny-imagenet-200",
))
