"""What every dataset kind shares: the in-memory dataset, the spec a kind subclasses, the errors,
and the registry of kinds, whose modules are imported by name on first use.

A kind lives in its own module, ``gmmvit/data/<module>.py`` (``gmmvit.registry.DATASET_MODULES``
maps each kind to it, without importing torch), and registers its spec there. So the file layout
carries a kind's identity: a training cell's code is its dataset kind's module and what that imports,
and editing one kind's reader retrains no other kind's cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import urllib.parse
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..registry import DATASET_MODULES

MARKER_NAME = ".gmmvit-prepared.json"


class DatasetError(UserError, RuntimeError):
    """A user-facing data problem: missing files, failed download, bad folder layout."""


class DownloadError(DatasetError):
    """The source could not be reached or refused the request: another source may help."""


class IncompleteDownload(DatasetError):
    """The bytes arrived but are cut short or damaged: fetching them again may help."""


@dataclass(frozen=True)
class ImageDataset:
    """A whole dataset in memory; images are uint8 (N, 3, H, W) with H == W."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    autoaugment: str | None
    classes: tuple[str, ...]
    # The fingerprint of these very arrays when it is already known: the decoded cache stores it
    # with the arrays it hashed, which saves hashing 1.3 GB (Tiny-ImageNet) at every job's start.
    known_fingerprint: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Catch a broken loader here rather than as a shape error deep inside training.
        for split in ("train", "test"):
            images: torch.Tensor = getattr(self, f"{split}_images")
            labels: torch.Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"{self.name}: {split} images must be uint8 (N, 3, H, W), got "
                                 f"{images.dtype} {tuple(images.shape)}")
            if images.shape[2] != images.shape[3]:
                raise ValueError(f"{self.name}: {split} images are not square: {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must be int64 ({images.shape[0]},), "
                                 f"got {labels.dtype} {tuple(labels.shape)}")
        if self.train_images.shape[2:] != self.test_images.shape[2:]:
            raise ValueError(f"{self.name}: train and test image sizes differ")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")

    @property
    def img_size(self) -> int:
        return int(self.train_images.shape[-1])

    def fingerprint(self) -> str:
        """Which data this is: blake2b over the shapes and bytes of both splits' images and labels."""
        return self.known_fingerprint or fingerprint_arrays(
            (self.train_images, self.train_labels, self.test_images, self.test_labels))


def fingerprint_arrays(tensors: Sequence[torch.Tensor]) -> str:
    """blake2b over (train images, train labels, test images, test labels), shapes included."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().data)  # hashed in place, not copied to bytes first
    return digest.hexdigest()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The per-channel mean and std of uint8 (N, 3, H, W) images scaled to 0..1."""
    # Chunked float64 sums: a float copy of a large dataset would not fit in memory.
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    # A channel that never varies (e.g. an all-green folder) would divide by zero when normalised:
    # centre it and leave its scale alone.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The spec a kind subclasses


@dataclass(frozen=True)
class DatasetSpec:
    """How to load (and, for downloadable datasets, prepare) one dataset."""

    name: str
    mean: tuple[float, float, float] | None  # None: computed from the training images
    std: tuple[float, float, float] | None
    autoaugment: str | None
    url: str | None = None  # official source; None means nothing to download
    folder: str | None = None  # final folder under the data root
    # Name of the evaluation split in the count dict (Tiny-ImageNet calls it "val").
    eval_split: ClassVar[str] = "test"
    # Whether a load under a name of the user's own runs under that name (its progress lines and
    # errors carry it): only for data that has no download instructions its kind's name must be in.
    takes_user_name: ClassVar[bool] = False

    @property
    def needs_download(self) -> bool:
        return self.url is not None

    def load(self, root: Path, **options: Any) -> ImageDataset:
        raise NotImplementedError

    def check_in_place(self, root: Path) -> None:
        """For data read in place (nothing to download): raise DatasetError when ``root`` does not
        hold it (default: nothing to check)."""

    # The hooks below are only used for downloadable datasets.

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        """Download and unpack into ``tmp``; return the folder that becomes ``root/self.folder``."""
        raise NotImplementedError

    def verify(self, folder: Path) -> dict[str, int]:
        """Check a staged folder and return its counts ({"classes", "train", eval_split})."""
        raise NotImplementedError

    def expected_counts(self) -> Mapping[str, int]:
        return {}

    def expected_files(self) -> tuple[str, ...]:
        return ()

    def download_urls(self) -> tuple[str, ...]:
        return (self.url,) if self.url else ()

    def _require_files(self, root: Path) -> None:
        assert self.folder is not None
        files = self.expected_files()
        missing = [f for f in files if not (root / self.folder / f).is_file()]
        if missing:
            partial = len(missing) < len(files)
            raise self.missing_error(root, f"missing: {', '.join(missing)}" if partial else "")

    def adopt(self, folder: Path, origin: str) -> None:
        """Finish the layout of a folder unpacked by hand before verifying it (default: nothing)."""

    def warm_cache(self, root: Path, progress: bool) -> None:
        """Decode once at prepare time what every training job would decode (default: nothing)."""

    def source_kind(self) -> str:
        """What ``--url`` must point at, in words (default: the official archive's file name)."""
        assert self.url is not None
        return Path(urllib.parse.urlparse(self.url).path).name

    def unpacked_by_hand(self, where: Path) -> str:
        """How to put the data in place without ``prepare`` downloading it."""
        return (f"unpack {self.source_kind()} into {where.parent} so that {where} holds "
                f"{', '.join(self.expected_files())}")

    def other_sources_help(self, root: Path) -> str:
        """What to do when the official source cannot be reached (offline, firewall, dead link)."""
        assert self.folder is not None
        command = f"gmmvit prepare {self.name} --data-root {root}"
        return (
            "  To prepare it without that address, any of these works:\n"
            f"  - a mirror or a copy on disk: {command} --url <URL or local path of "
            f"{self.source_kind()}>\n"
            f"  - the same for snakemake's prepare job: set GMMVIT_{self.name.upper()}_URL="
            "<that URL or path> in snakemake's environment\n"
            f"  - by hand: {self.unpacked_by_hand(root / self.folder)}; then run {command}"
            " (it verifies the folder and downloads nothing)"
        )

    def missing_error(self, root: Path, detail: str = "", problem: str = "dataset not found in"
                      ) -> DatasetError:
        assert self.folder is not None and self.url is not None
        where = root / self.folder
        files = ", ".join(self.expected_files())
        return DatasetError(
            f"{self.name}: {problem} {where}"
            + (f" ({detail})" if detail else "")
            + f".\n  Expected there: {files}"
            + f"\n  Prepare it with: gmmvit prepare {self.name} --data-root {root}"
            + f"\n  It downloads {' and '.join(self.download_urls())}"
            + f" (set GMMVIT_{self.name.upper()}_URL to use a mirror)."
        )


def no_options(name: str, options: Mapping[str, Any]) -> None:
    """For the kinds whose ``load`` takes no options."""
    if options:
        raise TypeError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")


# --------------------------------------------------------------------------------------------
# The registry of kinds

_REGISTERED: dict[str, DatasetSpec] = {}  # filled as kind modules are imported


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a kind's spec; it must live in the module gmmvit.registry.DATASET_MODULES names."""
    module = type(spec).__module__.rsplit(".", 1)[-1]
    if DATASET_MODULES.get(spec.name) != module:
        raise ValueError(f"dataset {spec.name!r} is defined in data/{module}.py, but "
                         f"gmmvit.registry.DATASET_MODULES maps it to {DATASET_MODULES.get(spec.name)!r}: "
                         "the workflow finds a dataset's code through that map")
    if spec.name in _REGISTERED and _REGISTERED[spec.name] != spec:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    _REGISTERED[spec.name] = spec
    return spec


def dataset_spec(kind: str) -> DatasetSpec:
    """The spec of dataset ``kind``, importing its module on first use."""
    if kind not in DATASET_MODULES:
        raise ValueError(f"unknown dataset {kind!r}; valid names: {', '.join(DATASET_MODULES)}")
    importlib.import_module(f"{__package__}.{DATASET_MODULES[kind]}")
    return _REGISTERED[kind]


class _Datasets(MutableMapping[str, DatasetSpec]):
    """Name -> spec of every registered dataset, in registry order; looking a name up imports its
    kind's module (listing the names imports none). A registered kind's spec may be replaced (a test
    pointing a kind at its own server); kinds are neither added nor removed here."""

    def __getitem__(self, kind: str) -> DatasetSpec:
        if kind not in DATASET_MODULES:
            raise KeyError(kind)
        return dataset_spec(kind)

    def __setitem__(self, kind: str, spec: DatasetSpec) -> None:
        self[kind]  # the kind's module first: its own registration must not meet the replacement
        _REGISTERED[kind] = spec

    def __delitem__(self, kind: str) -> None:
        raise TypeError(f"dataset {kind!r} cannot be removed: gmmvit.registry.DATASET_MODULES lists it")

    def __contains__(self, kind: object) -> bool:
        return kind in DATASET_MODULES

    def __iter__(self) -> Iterator[str]:
        return iter(DATASET_MODULES)

    def __len__(self) -> int:
        return len(DATASET_MODULES)


DATASETS: MutableMapping[str, DatasetSpec] = _Datasets()


def dataset_names() -> list[str]:
    """Registered names, in registry order (the offline default ``digits`` first)."""
    return list(DATASETS)


def needs_download(name: str) -> bool:
    return dataset_spec(name).needs_download


def marker_path(name: str, root: str | Path = "data") -> Path | None:
    """Where the "prepared" marker of a downloadable dataset lives; None if it needs no download."""
    spec = dataset_spec(name)
    if spec.folder is None:
        return None
    return Path(root) / spec.folder / MARKER_NAME


def prepared_record(name: str, root: str | Path = "data") -> dict[str, Any] | None:
    """What ``prepare`` wrote in the marker (counts, source, md5_checked, ...); None if not prepared."""
    marker = marker_path(name, root)
    if marker is None or not marker.is_file():
        return None
    return json.loads(marker.read_text())


def is_prepared(name: str, root: str | Path = "data") -> bool:
    spec = dataset_spec(name)
    marker = marker_path(name, root)
    if marker is not None:
        return marker.is_file()
    try:
        spec.check_in_place(Path(root))
    except DatasetError:
        return False
    return True


def load_dataset(kind: str, root: str | Path = "data", *, name: str | None = None,
                 **options: Any) -> ImageDataset:
    """Load a registered dataset (``kind``) whole; ``name`` is what the result is called (default:
    ``kind``), e.g. the config's name of one of several image folders.

    Options: ``folder`` takes ``path`` (default: root), ``img_size`` (default 32) and ``progress``;
    ``tinyimagenet`` takes ``progress``; the others take none.
    """
    spec = dataset_spec(kind)
    if name is not None and spec.takes_user_name:
        spec = dataclasses.replace(spec, name=name)
    data = spec.load(Path(root), **options)
    return data if name is None else dataclasses.replace(data, name=name)
