"""Datasets, each loaded whole into memory as uint8 tensors: one module per kind, the shared parts
in modules of their own, and this package's names for what callers use.

``digits`` (scikit-learn's bundled handwritten digits) needs no files and is the offline default.
``cifar10``, ``cifar100``, ``svhn`` and ``tinyimagenet`` use torchvision's on-disk layouts under a
data root and are fetched by :func:`prepare_dataset`; ``folder`` reads any ``train/`` + ``val/``
(or ``test/``) tree of class folders, under whatever name the user gives it (``load_dataset(...,
name=...)``). Preparation is atomic and marked complete last (prepare.py); the workflow can use
:func:`marker_path` as a rule output. Progress is a bar on a terminal and one line per step in a log.

The rooms:

- ``base.py``: the dataset in memory (:class:`ImageDataset`), the spec a kind subclasses
  (:class:`DatasetSpec`), the errors, and the registry, which imports a kind's module by name the
  first time the kind is asked for;
- one module per kind, named in ``gmmvit.registry.DATASET_MODULES``: ``digits.py``, ``cifar.py``
  (cifar10 and cifar100), ``svhn.py``, ``tinyimagenet.py``, ``folder.py``;
- shared by some kinds: ``cache.py`` (the decoded, memory-mapped cache), ``decode.py`` (image trees),
  ``download.py`` (fetching and unpacking), ``progress.py``, ``lock.py``; and ``prepare.py``, which
  only ``gmmvit prepare`` runs.

A training cell's code (what the workflow makes its inputs, and whose hash ``gmmvit train`` records)
is this package's ``__init__.py`` and ``base.py``, its kind's module and what that imports: editing
the SVHN reader retrains no digits cell. So this file imports ``base`` only; the names of other
modules it offers are looked up when first used.

Adding a dataset = one :class:`DatasetSpec` subclass in a new module ``data/<module>.py`` that calls
:func:`register_dataset`, and its kind's entry in ``gmmvit.registry.DATASET_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    DATASETS,
    MARKER_NAME,
    DatasetError,
    DatasetSpec,
    DownloadError,
    ImageDataset,
    IncompleteDownload,
    dataset_names,
    fingerprint_arrays,
    is_prepared,
    load_dataset,
    marker_path,
    needs_download,
    prepared_record,
    register_dataset,
)

__all__ = [
    "ImageDataset",
    "DatasetSpec",
    "DatasetError",
    "DownloadError",
    "IncompleteDownload",
    "DATASETS",
    "MARKER_NAME",
    "CACHE_DIR",
    "dataset_names",
    "fingerprint_arrays",
    "load_dataset",
    "prepare_dataset",
    "needs_download",
    "is_prepared",
    "prepared_record",
    "marker_path",
    "register_dataset",
]

# Names this package offers from modules a training cell does not run: imported on first use, so
# importing gmmvit.data (as train.py does) neither runs them nor, read by gmmvit.registry's import
# scan, makes them part of every cell's code.
_ELSEWHERE = {"prepare_dataset": "prepare", "CACHE_DIR": "cache"}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(f"{__name__}.{_ELSEWHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ELSEWHERE))
