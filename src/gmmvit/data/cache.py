"""The decoded-once cache of every on-disk dataset: its arrays memory-mapped from
``<folder>/.gmmvit-cache/<size>px/``, so a training job starts at once instead of decoding the source.

Decoding Tiny-ImageNet's 100,000 JPEGs takes about a minute, unpickling CIFAR's batches or reading
SVHN's .mat files a second or two; the cached arrays are memory-mapped, so a job starts at once and
reads pages as it uses them. The cache sits beside the originals: four .npy arrays and
``cache.json``, written last, which holds the key of the source it was made from (every source
file's relative path, size and mtime, the image size and the format version), each array's size and
mtime, and what a job would otherwise compute from the arrays at every start: their fingerprint and
the training images' per-channel mean and std (which the folder dataset normalises with). A partial
cache (no cache.json), a stale one (files added, removed or touched), a foreign one (another source's
key, arrays of the wrong shape), one whose arrays changed after it was written (size or mtime) or one
of an earlier format is rebuilt, never used. `prepare` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .base import channel_stats, fingerprint_arrays
from .lock import exclusive

CACHE_DIR = ".gmmvit-cache"
CACHE_FORMAT = 3  # 3: + channel mean and std; 2: memory-mapped, with fingerprint (1, 2 are rebuilt)
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


class CacheFacts(NamedTuple):
    """What the decoded cache stores about its arrays, so a job does not compute it again."""

    fingerprint: str  # fingerprint_arrays of (train_x, train_y, test_x, test_y)
    mean: tuple[float, float, float]  # the training images' channel mean and std (channel_stats)
    std: tuple[float, float, float]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> CacheFacts:
        return cls(fingerprint_arrays(tensors), *channel_stats(tensors[0]))

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> CacheFacts | None:
        """The facts in a cache.json, or None when any is missing or malformed (rebuild)."""
        fingerprint, mean, std = meta.get("fingerprint"), meta.get("mean"), meta.get("std")
        triples = [v for v in (mean, std) if isinstance(v, list) and len(v) == 3
                   and all(isinstance(x, float) for x in v)]
        if not isinstance(fingerprint, str) or len(triples) != 2:
            return None
        return cls(fingerprint, tuple(mean), tuple(std))  # type: ignore[arg-type]


def files_key(root: Path, groups: Sequence[Sequence[Path]], size: int, what: str) -> str:
    """The cache key of source files (relative path, size, mtime), in groups (splits, classes)."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}, {size}px, {what}".encode())
    for group in groups:
        digest.update(b"group")
        for path in group:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _array_stats(folder: Path) -> dict[str, list[int]]:
    """Each cached array's file size and mtime."""
    stats = {name: (folder / f"{name}.npy").stat() for name in _CACHE_ARRAYS}
    return {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}


def _read_cache(folder: Path, key: str, counts: Sequence[int] | None, size: int
                ) -> tuple[tuple[torch.Tensor, ...], CacheFacts] | None:
    """The cached (train_x, train_y, test_x, test_y) and their facts, or None: rebuild.
    ``counts``: the (train, test) sizes the source has, when known without decoding it."""
    try:
        meta = json.loads((folder / "cache.json").read_text())
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            return None
        if (facts := CacheFacts.from_json(meta)) is None:
            return None
        if meta.get("arrays") != _array_stats(folder):  # an array rewritten after the cache was
            return None
        # Copy-on-write mapping: pages are read when used, and the tensors are writable in memory.
        arrays = [np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                  for name in _CACHE_ARRAYS]
    except (OSError, ValueError):  # absent, partial or unreadable: rebuild
        return None
    n_train, n_test = counts or (len(arrays[1]), len(arrays[3]))
    shapes = [(n_train, 3, size, size), (n_train,), (n_test, 3, size, size), (n_test,)]
    dtypes = [np.uint8, np.int64, np.uint8, np.int64]
    if any(a.shape != s or a.dtype != d for a, s, d in zip(arrays, shapes, dtypes)):
        return None
    return tuple(torch.from_numpy(a) for a in arrays), facts


def _write_cache(folder: Path, key: str, tensors: Sequence[torch.Tensor], facts: CacheFacts) -> None:
    # Staged in a temporary folder and renamed: a reader sees a whole cache or none, and a job that
    # has the old arrays mapped keeps reading them (new files, never rewritten in place).
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, tensor in zip(_CACHE_ARRAYS, tensors):
            np.save(staging / f"{name}.npy", tensor.numpy())
        meta = {"key": key, "format": CACHE_FORMAT, "arrays": _array_stats(staging),
                **facts._asdict()}
        (staging / "cache.json").write_text(json.dumps(meta) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cached(root: Path, key: str, size: int, decode: Callable[[], tuple[torch.Tensor, ...]],
                counts: Sequence[int] | None = None, name: str = ""
                ) -> tuple[tuple[torch.Tensor, ...], CacheFacts | None]:
    """A dataset's (train_x, train_y, test_x, test_y) and their facts: read from ``root``'s decoded
    cache when it is current, else ``decode()``d from the source files and cached for the next job
    (facts None when ``root`` is read-only or the cache could not be written)."""
    folder = root / CACHE_DIR / f"{size}px"
    if (cached := _read_cache(folder, key, counts, size)) is not None:
        return cached
    with ExitStack() as stack:
        try:  # one job decodes, concurrent jobs of the same source wait and then read its cache
            (root / CACHE_DIR).mkdir(exist_ok=True)
            stack.enter_context(exclusive(root / CACHE_DIR / f".{size}px.lock"))
            writable = True
        except OSError:  # a read-only source: decode every time
            writable = False
        if writable and (cached := _read_cache(folder, key, counts, size)) is not None:
            return cached
        arrays = decode()
        if writable:
            try:
                facts = CacheFacts.of(arrays)
                _write_cache(folder, key, arrays, facts)
                return arrays, facts
            except OSError as err:
                print(f"{name}: could not cache the decoded images in {folder}: {err}", file=sys.stderr)
    return arrays, None
