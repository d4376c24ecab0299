"""Image trees on disk: one folder per class, scanned, decoded to uint8 RGB arrays at one size and
cached. Used by the kinds that read image files (tinyimagenet, folder)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .base import DatasetError
from .cache import CacheFacts, files_key, load_cached
from .progress import on_terminal, stage

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_MANY_FILES = 500  # below this, decoding is too quick for a progress bar to help


def _decode_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # grayscale, palette and RGBA files all become RGB
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetError(f"cannot decode image {path}: {err}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_images(paths: Sequence[Path], size: int, desc: str, progress: bool) -> torch.Tensor:
    """The image files as uint8 (N, 3, size, size), resized where they are not size x size."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads give a real speed-up; as many as the job was
    # granted (torch reads OMP_NUM_THREADS, which Snakemake and SLURM jobs set), not the machine's.
    workers = max(1, min(8, torch.get_num_threads()))
    in_log = progress and not on_terminal()
    line = stage(f"decoding {desc}: {len(paths)} images at {size}px") if in_log else nullcontext()
    with line, ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc=desc, unit="img", file=sys.stderr,
        disable=not progress or in_log or len(paths) < _MANY_FILES, leave=False,
    ) as bar:
        for i, array in enumerate(pool.map(lambda p: _decode_one(p, size), paths, chunksize=64)):
            out[i] = array
            bar.update()
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _scan_split(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files (searched recursively, like torchvision's ImageFolder)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        c: sorted(p for p in (split_dir / c).rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for c in classes
    }


def scan_tree(train_dir: Path, eval_dir: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Class name -> image files of the training and the evaluation split, checked to match."""
    train, evaluation = _scan_split(train_dir), _scan_split(eval_dir)
    if not train:
        raise DatasetError(f"{train_dir} has no class folders (expected one subfolder per class)")
    if set(train) != set(evaluation):
        only_train = sorted(set(train) - set(evaluation))
        only_eval = sorted(set(evaluation) - set(train))
        raise DatasetError(
            f"class folders differ between {train_dir} and {eval_dir}: "
            f"only in {train_dir.name}/: {_preview(only_train)}; "
            f"only in {eval_dir.name}/: {_preview(only_eval)}")
    empty = [c for c, files in train.items() if not files]
    if empty:
        raise DatasetError(f"no images in training class folder(s) {_preview(empty)} under {train_dir} "
                           f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not any(evaluation.values()):
        raise DatasetError(f"no images under {eval_dir}")
    return train, evaluation


def _preview(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_tree(name: str, classes: Sequence[str], split: dict[str, list[Path]], size: int,
               desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [p for c in classes for p in split[c]]
    labels = torch.tensor([i for i, c in enumerate(classes) for _ in split[c]], dtype=torch.int64)
    return decode_images(paths, size, f"{name} {desc}", progress), labels


def _tree_key(root: Path, classes: Sequence[str], splits: Sequence[dict[str, list[Path]]],
              size: int) -> str:
    groups = [[path for cls in classes for path in split[cls]] for split in splits]
    return files_key(root, groups, size, f"classes {list(classes)}")


def load_tree_cached(name: str, root: Path, classes: Sequence[str], train: dict[str, list[Path]],
                     evaluation: dict[str, list[Path]], size: int, eval_desc: str, progress: bool
                     ) -> tuple[tuple[torch.Tensor, ...], CacheFacts | None]:
    """An image tree's arrays through the cache (:func:`gmmvit.data.cache.load_cached`)."""
    def decode() -> tuple[torch.Tensor, ...]:
        return (*_load_tree(name, classes, train, size, "train", progress),
                *_load_tree(name, classes, evaluation, size, eval_desc, progress))

    counts = (sum(len(train[c]) for c in classes), sum(len(evaluation[c]) for c in classes))
    return load_cached(root, _tree_key(root, classes, (train, evaluation), size), size, decode,
                       counts, name)
