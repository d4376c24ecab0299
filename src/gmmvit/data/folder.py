"""The ``folder`` dataset: any ``train/`` + ``val/`` (or ``test/``) tree of class folders of your
own images, read in place under the name you give it, decoded at the size you ask for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .base import DatasetError, DatasetSpec, ImageDataset, channel_stats, register_dataset
from .decode import load_tree_cached, scan_tree


@dataclass(frozen=True)
class FolderSpec(DatasetSpec):
    """Any ``train/`` + ``val/`` (or ``test/``) tree with one subfolder per class."""

    # A folder has no download instructions that its kind's name must appear in, so its progress
    # lines and errors can carry the user's name.
    takes_user_name: ClassVar[bool] = True

    def validate(self, path: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
        if not path.is_dir():
            raise DatasetError(f"folder dataset: {path} is not a directory")
        train_dir = path / "train"
        eval_dir = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
        if not train_dir.is_dir() or eval_dir is None:
            present = (("train/", train_dir.is_dir()), ("val/ or test/", eval_dir is not None))
            missing = [sub for sub, ok in present if not ok]
            raise DatasetError(f"folder dataset: {path} has no {' and no '.join(missing)}; expected "
                               "train/<class>/<images> and val/<class>/<images> (or test/)")
        return scan_tree(train_dir, eval_dir)

    def check_in_place(self, root: Path) -> None:
        self.validate(root)

    def load(self, root: Path, *, path: str | Path | None = None, img_size: int = 32,
             progress: bool = True) -> ImageDataset:
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}")
        tree = Path(path) if path is not None else root
        train, evaluation = self.validate(tree)
        classes = tuple(train)
        (train_x, train_y, test_x, test_y), facts = load_tree_cached(
            self.name, tree, classes, train, evaluation, img_size, "test", progress)
        # Normalised by its own training images' statistics (stored with the cache: a full pass over
        # the images otherwise, seconds at Tiny-ImageNet's size, at every job's start).
        mean, std = (facts.mean, facts.std) if facts else channel_stats(train_x)
        return ImageDataset(self.name, train_x, train_y, test_x, test_y, len(classes), mean, std,
                            self.autoaugment, classes,
                            known_fingerprint=facts.fingerprint if facts else None)


register_dataset(FolderSpec("folder", mean=None, std=None, autoaugment="imagenet"))
