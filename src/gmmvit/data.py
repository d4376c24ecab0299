"""Dataset registry: every dataset is loaded whole into memory as uint8 tensors.

``digits`` (scikit-learn's bundled handwritten digits) needs no files and is the offline default.
``cifar10``, ``cifar100``, ``svhn`` and ``tinyimagenet`` use torchvision's on-disk layouts under a
data root and are fetched by :func:`prepare_dataset`; ``folder`` reads any ``train/`` + ``val/``
(or ``test/``) tree of class folders, under whatever name the user gives it (``load_dataset(...,
name=...)``).

Preparation is atomic: download, unpack and verification happen in ``root/.prepare-<name>-XXXX``,
the result is renamed into place and the marker ``<final folder>/.gmmvit-prepared.json`` is written
last, so the marker's presence means "complete and verified". The workflow can use
:func:`marker_path` as a rule output. A failed download says what else works (``--url``, the
``GMMVIT_<NAME>_URL`` variable, unpacking by hand). Progress is a bar on a terminal and one line
per step in a log.

Adding a dataset = one :class:`DatasetSpec` subclass instance in :data:`DATASETS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torchvision.datasets.utils import calculate_md5
from tqdm import tqdm

try:  # POSIX only; without it concurrent prepares of one dataset are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ImageDataset",
    "DatasetSpec",
    "DatasetError",
    "DownloadError",
    "IncompleteDownload",
    "DATASETS",
    "MARKER_NAME",
    "TINYIMAGENET_EXPECTED",
    "dataset_names",
    "load_dataset",
    "prepare_dataset",
    "needs_download",
    "is_prepared",
    "prepared_record",
    "marker_path",
]

MARKER_NAME = ".gmmvit-prepared.json"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Read at verification time (not copied into the spec) so tests can monkeypatch it.
TINYIMAGENET_EXPECTED: dict[str, int] = {"classes": 200, "train": 100_000, "val": 10_000}

_CHUNK = 1 << 20
_MANY_FILES = 500  # below this, decoding is too quick for a progress bar to help


class DatasetError(RuntimeError):
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


# --------------------------------------------------------------------------------------------
# Registry


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

    @property
    def needs_download(self) -> bool:
        return self.url is not None

    def load(self, root: Path, **options: Any) -> ImageDataset:
        raise NotImplementedError

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


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def dataset_names() -> list[str]:
    """Registered names, in registry order (the offline default ``digits`` first)."""
    return list(DATASETS)


def needs_download(name: str) -> bool:
    return _spec(name).needs_download


def marker_path(name: str, root: str | Path = "data") -> Path | None:
    """Where the "prepared" marker of a downloadable dataset lives; None if it needs no download."""
    spec = _spec(name)
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
    spec = _spec(name)
    marker = marker_path(name, root)
    if marker is not None:
        return marker.is_file()
    if isinstance(spec, FolderSpec):
        try:
            spec.validate(Path(root))
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
    spec = _spec(kind)
    if name is not None and isinstance(spec, FolderSpec):
        # A folder has no download instructions that its kind's name must appear in, so its
        # progress lines and errors can carry the user's name.
        spec = dataclasses.replace(spec, name=name)
    data = spec.load(Path(root), **options)
    return data if name is None else dataclasses.replace(data, name=name)


def prepare_dataset(
    name: str,
    root: str | Path = "data",
    url: str | None = None,
    progress: bool = True,
    *,
    expected: Mapping[str, int] | None = None,
) -> Path:
    """Make ``name`` loadable from ``root`` and return its folder.

    Source: ``url`` if given, else ``$GMMVIT_<NAME>_URL``, else the official URL (the only case in
    which md5 sums are checked). ``url`` may also be a local path. For ``svhn`` it is a base URL to
    which the file names are appended. ``expected`` overrides the verified counts
    (keys ``classes``, ``train`` and ``val``/``test``).
    """
    spec = _spec(name)
    root = Path(root)
    if spec.folder is None:
        if isinstance(spec, FolderSpec):
            spec.validate(root)
        return root
    wanted = dict(spec.expected_counts())
    if expected:
        unknown = set(expected) - {"classes", "train", spec.eval_split}
        if unknown:
            raise ValueError(f"{name}: unknown expected count(s) {sorted(unknown)}; "
                             f"use classes, train, {spec.eval_split}")
        wanted.update(expected)

    final = root / spec.folder
    marker = final / MARKER_NAME
    if marker.is_file():  # before locking, so a prepared read-only data root works
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".prepare-{name}.lock"):
        if marker.is_file():  # prepared by a concurrent run while we waited for the lock
            return final
        if final.is_dir() and not any(final.iterdir()):
            # Snakemake creates the marker's parent folder before running the prepare job.
            final.rmdir()
        if final.exists():
            # E.g. data fetched earlier by torchvision, or a crash between rename and marker:
            # adopt it if it verifies, but never delete what may be the user's own files.
            try:
                spec.adopt(final, f"existing folder {final}")
                counts = spec.verify(final)
                _check_counts(spec, counts, wanted, f"existing folder {final}")
            except DatasetError as err:
                raise DatasetError(f"{err}\n  {final} exists but is not a complete {name} dataset; "
                                   "remove it and prepare again.") from None
            _write_marker(final, name, counts, source=str(final), md5_checked=False)
            spec.warm_cache(root, progress)
            return final

        for stale in root.glob(f".prepare-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        source, official = _source(spec, url)
        tmp = Path(tempfile.mkdtemp(prefix=f".prepare-{name}-", dir=root))
        try:
            try:
                staged = spec.fetch(tmp, source, official, progress)
                counts = spec.verify(staged)
            except DownloadError as err:
                raise DatasetError(f"{name}: {err}\n{spec.other_sources_help(root)}") from None
            except IncompleteDownload as err:
                raise DatasetError(f"{name}: {err}") from None
            except DatasetError as err:
                # The staging folder is gone once this returns: name the source and the folder
                # the user will look in instead.
                detail = _staging_as_final(str(err), tmp, spec.folder, final)
                raise DatasetError(f"{name}: the data from {_shown(source)} is not a valid {name} "
                                   f"dataset, so nothing was put in {final}: {detail}") from None
            _check_counts(spec, counts, wanted, source)
            os.replace(staged, final)
            _write_marker(final, name, counts, source=source, md5_checked=official)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        spec.warm_cache(root, progress)
    return final


# --------------------------------------------------------------------------------------------
# Preparation helpers


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    # Holding the lock is what makes any leftover .prepare-<name>-* directory provably stale.
    with open(lock_file, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _source(spec: DatasetSpec, url: str | None) -> tuple[str, bool]:
    override = url or os.environ.get(f"GMMVIT_{spec.name.upper()}_URL") or None
    if override is None:
        assert spec.url is not None
        return spec.url, True
    if "://" not in override:  # a local file or folder, e.g. on an offline cluster
        override = Path(override).expanduser().resolve().as_uri()
    return override, False


def _join_url(base: str, file: str) -> str:
    return base.rstrip("/") + "/" + file


def _check_counts(spec: DatasetSpec, found: Mapping[str, int], wanted: Mapping[str, int],
                  origin: str) -> None:
    wrong = {k: (v, found.get(k)) for k, v in wanted.items() if found.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: expected {v}, found {f}" for k, (v, f) in wrong.items())
        raise DatasetError(f"{spec.name}: unexpected counts in data from {origin}: {detail}")


def _write_marker(final: Path, name: str, counts: Mapping[str, int], source: str,
                  md5_checked: bool) -> None:
    info = {"dataset": name, "counts": dict(counts), "source": source,
            "md5_checked": md5_checked, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = final / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, final / MARKER_NAME)


def _shown(source: str) -> str:
    """A source as the user gave it: a local path rather than the file:// URL it was turned into."""
    parsed = urllib.parse.urlparse(source)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source


def _staging_as_final(message: str, tmp: Path, folder: str | None, final: Path) -> str:
    # Fetching stages the dataset folder as tmp/unpacked/<folder> (archives) or tmp/<folder>.
    staged = re.escape(str(tmp)) + r"(?:/unpacked)?" + (re.escape(f"/{folder}") if folder else "")
    return re.sub(staged, lambda _: str(final), message)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def _stage(text: str) -> Iterator[None]:
    """One log line for a step, "text ... done in 41 s": the progress-bar stand-in for logs, where
    every redraw of a bar would be kept (tens of KB per Snakemake job log)."""
    print(f"{text} ...", end="", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _download(url: str, dest: Path, progress: bool, md5: str | None = None) -> None:
    # Not torchvision.datasets.utils.download_url: it always draws a bar (into logs too), silently
    # retries an https URL over plain http, ignores a short Content-Length, and reports a failure as
    # "File not found or corrupted." without the URL; its md5 helper is used below.
    label = Path(urllib.parse.urlparse(url).path).name or dest.name
    written = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            size = f" ({total / 2**20:.1f} MB)" if total is not None else ""
            in_log = progress and not _on_terminal()
            verb = "copying" if url.startswith("file:") else "downloading"
            with _stage(f"{verb} {_shown(url)}{size}") if in_log else nullcontext(), tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=label, disable=not progress or in_log, leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        err.close()  # it owns the response's socket
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"download of {_shown(url)} failed: {reason}") from None
    again = "Nothing was kept; download it again."
    if total is not None and written != total:
        raise IncompleteDownload(f"download of {url} is truncated: received {written} of {total} "
                                 f"bytes (Content-Length). {again}")
    if md5 is not None and (digest := calculate_md5(dest)) != md5:
        raise IncompleteDownload(f"download of {url} is corrupt or incomplete: md5 {digest}, "
                                 f"expected {md5}. {again}")


def _unpack(archive: Path, dest: Path, url: str) -> None:
    # Not torchvision.datasets.utils.extract_archive: it extracts tar files without tarfile's
    # "data" filter, so a member named ../x or /x from a mirror could write outside ``dest``.
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)  # ZipFile sanitises absolute and ".." member names itself
        else:
            with tarfile.open(archive, "r:gz") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    for member in tf.getmembers():
                        if member.name.startswith("/") or ".." in Path(member.name).parts:
                            raise tarfile.TarError(f"unsafe member {member.name}")
                    tf.extractall(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        raise IncompleteDownload(
            f"the archive {_shown(url)} is incomplete or corrupt ({type(err).__name__}: {err}), "
            "as a download cut short would be. Nothing was kept; download it again (or, for a "
            "local file, copy it again).") from None


def _top_folder(extracted: Path, folder: str, url: str) -> Path:
    candidate = extracted / folder
    if candidate.is_dir():
        return candidate
    found = sorted(p.name for p in extracted.iterdir())
    raise DatasetError(f"the archive has no {folder}/ folder (it contains: "
                       f"{', '.join(found) or 'nothing'})")


# --------------------------------------------------------------------------------------------
# Image helpers


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
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


def _decode_images(paths: Sequence[Path], size: int, desc: str, progress: bool) -> torch.Tensor:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads give a real speed-up; as many as the job was
    # granted (torch reads OMP_NUM_THREADS, which Snakemake and SLURM jobs set), not the machine's.
    workers = max(1, min(8, torch.get_num_threads()))
    in_log = progress and not _on_terminal()
    line = _stage(f"decoding {desc}: {len(paths)} images at {size}px") if in_log else nullcontext()
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


def _scan_tree(train_dir: Path, eval_dir: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
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
    return _decode_images(paths, size, f"{name} {desc}", progress), labels


# --------------------------------------------------------------------------------------------
# Decoded-once cache of every on-disk dataset: decoding Tiny-ImageNet's 100,000 JPEGs takes about a
# minute, unpickling CIFAR's batches or reading SVHN's .mat files a second or two; the cached arrays
# are memory-mapped, so a job starts at once and reads pages as it uses them. The cache sits beside
# the originals in ``<folder>/.gmmvit-cache/<size>px/``: four .npy arrays and ``cache.json``, written
# last, which holds the key of the source it was made from (every source file's relative path, size
# and mtime, the image size and the format version), each array's size and mtime, and what a job
# would otherwise compute from the arrays at every start: their fingerprint and the training images'
# per-channel mean and std (which the folder dataset normalises with). A partial cache (no
# cache.json), a stale one (files added, removed or touched), a foreign one (another source's key,
# arrays of the wrong shape), one whose arrays changed after it was written (size or mtime) or one
# of an earlier format is rebuilt, never used. `prepare` writes it.

CACHE_DIR = ".gmmvit-cache"
CACHE_FORMAT = 3  # 3: + channel mean and std; 2: memory-mapped, with fingerprint (1, 2 are rebuilt)
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


class CacheFacts(NamedTuple):
    """What the decoded cache stores about its arrays, so a job does not compute it again."""

    fingerprint: str  # fingerprint_arrays of (train_x, train_y, test_x, test_y)
    mean: tuple[float, float, float]  # the training images' channel mean and std (_channel_stats)
    std: tuple[float, float, float]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> CacheFacts:
        return cls(fingerprint_arrays(tensors), *_channel_stats(tensors[0]))

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> CacheFacts | None:
        """The facts in a cache.json, or None when any is missing or malformed (rebuild)."""
        fingerprint, mean, std = meta.get("fingerprint"), meta.get("mean"), meta.get("std")
        triples = [v for v in (mean, std) if isinstance(v, list) and len(v) == 3
                   and all(isinstance(x, float) for x in v)]
        if not isinstance(fingerprint, str) or len(triples) != 2:
            return None
        return cls(fingerprint, tuple(mean), tuple(std))  # type: ignore[arg-type]


def _files_key(root: Path, groups: Sequence[Sequence[Path]], size: int, what: str) -> str:
    """The cache key of source files (relative path, size, mtime), in groups (splits, classes)."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}, {size}px, {what}".encode())
    for group in groups:
        digest.update(b"group")
        for path in group:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _tree_key(root: Path, classes: Sequence[str], splits: Sequence[dict[str, list[Path]]],
              size: int) -> str:
    groups = [[path for cls in classes for path in split[cls]] for split in splits]
    return _files_key(root, groups, size, f"classes {list(classes)}")


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


def _load_cached(root: Path, key: str, size: int, decode: Callable[[], tuple[torch.Tensor, ...]],
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
            stack.enter_context(_exclusive(root / CACHE_DIR / f".{size}px.lock"))
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


def _load_tree_cached(name: str, root: Path, classes: Sequence[str], train: dict[str, list[Path]],
                      evaluation: dict[str, list[Path]], size: int, eval_desc: str, progress: bool
                      ) -> tuple[tuple[torch.Tensor, ...], CacheFacts | None]:
    """An image tree's arrays through the cache (:func:`_load_cached`)."""
    def decode() -> tuple[torch.Tensor, ...]:
        return (*_load_tree(name, classes, train, size, "train", progress),
                *_load_tree(name, classes, evaluation, size, eval_desc, progress))

    counts = (sum(len(train[c]) for c in classes), sum(len(evaluation[c]) for c in classes))
    return _load_cached(root, _tree_key(root, classes, (train, evaluation), size), size, decode,
                        counts, name)


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class DigitsSpec(DatasetSpec):
    """scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 RGB; a fixed split."""

    img_size: int = 32
    test_size: int = 360

    def load(self, root: Path, **options: Any) -> ImageDataset:
        _no_options(self.name, options)
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
        mean, std = _channel_stats(train_images)
        return ImageDataset(self.name, train_images, labels[train_idx], images[test_idx].contiguous(),
                            labels[test_idx], 10, mean, std, self.autoaugment,
                            tuple(str(d) for d in range(10)))


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
        _no_options(self.name, options)
        assert self.folder is not None
        self._require_files(root)
        folder = root / self.folder
        key = _files_key(folder, [[folder / f for f in self.expected_files()]], 32, self.name)
        arrays, facts = _load_cached(folder, key, 32, lambda: self._read(folder)[:4], name=self.name)
        assert self.mean is not None and self.std is not None
        return ImageDataset(self.name, *arrays, self.num_classes, self.mean, self.std,
                            self.autoaugment, self._class_names(folder),
                            known_fingerprint=facts.fingerprint if facts else None)

    def warm_cache(self, root: Path, progress: bool) -> None:
        self.load(root)  # writes the decoded cache the training jobs read

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        assert self.folder is not None
        archive = tmp / "download.tar.gz"
        _download(source, archive, progress, self.md5 if official else None)
        _unpack(archive, tmp / "unpacked", source)
        archive.unlink()
        return _top_folder(tmp / "unpacked", self.folder, source)

    def verify(self, folder: Path) -> dict[str, int]:
        missing = [f for f in self.expected_files() if not (folder / f).is_file()]
        if missing:
            raise DatasetError(f"{folder.name}/ lacks {', '.join(missing)}")
        train_x, _, test_x, _, names = self._read(folder)
        return {"classes": len(names), "train": len(train_x), "test": len(test_x)}


@dataclass(frozen=True)
class SvhnSpec(DatasetSpec):
    files: tuple[str, str] = ("train_32x32.mat", "test_32x32.mat")
    md5: tuple[str, str] = ("", "")

    def expected_files(self) -> tuple[str, ...]:
        return self.files

    def download_urls(self) -> tuple[str, ...]:
        return tuple(_join_url(self.url or "", f) for f in self.files)

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
        _no_options(self.name, options)
        assert self.folder is not None and self.mean is not None and self.std is not None
        folder = root / self.folder
        self._require_files(root)
        key = _files_key(folder, [[folder / f for f in self.files]], 32, self.name)
        def decode() -> tuple[torch.Tensor, ...]:
            return (*self._read(folder / self.files[0]), *self._read(folder / self.files[1]))

        arrays, facts = _load_cached(folder, key, 32, decode, name=self.name)
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
            _download(_join_url(source, file), staged / file, progress, md5 if official else None)
        return staged

    def verify(self, folder: Path) -> dict[str, int]:
        train_x, _ = self._read(folder / self.files[0])
        test_x, _ = self._read(folder / self.files[1])
        return {"classes": 10, "train": len(train_x), "test": len(test_x)}


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
        train, val = _scan_tree(folder / "train", folder / "val")
        classes = tuple(train)
        (train_x, train_y, test_x, test_y), facts = _load_tree_cached(
            self.name, folder, classes, train, val, self.img_size, "val", progress)
        return ImageDataset(self.name, train_x, train_y, test_x, test_y, len(classes), self.mean,
                            self.std, self.autoaugment, classes,
                            known_fingerprint=facts.fingerprint if facts else None)

    def fetch(self, tmp: Path, source: str, official: bool, progress: bool) -> Path:
        assert self.folder is not None
        archive = tmp / "download.zip"
        _download(source, archive, progress)  # no published md5 for this archive
        _unpack(archive, tmp / "unpacked", source)
        archive.unlink()
        staged = _top_folder(tmp / "unpacked", self.folder, source)
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
        train, val = _scan_tree(folder / "train", folder / "val")
        return {"classes": len(train), "train": sum(map(len, train.values())),
                "val": sum(map(len, val.values()))}


@dataclass(frozen=True)
class FolderSpec(DatasetSpec):
    """Any ``train/`` + ``val/`` (or ``test/``) tree with one subfolder per class."""

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
        return _scan_tree(train_dir, eval_dir)

    def load(self, root: Path, *, path: str | Path | None = None, img_size: int = 32,
             progress: bool = True) -> ImageDataset:
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}")
        tree = Path(path) if path is not None else root
        train, evaluation = self.validate(tree)
        classes = tuple(train)
        (train_x, train_y, test_x, test_y), facts = _load_tree_cached(
            self.name, tree, classes, train, evaluation, img_size, "test", progress)
        # Normalised by its own training images' statistics (stored with the cache: a full pass over
        # the images otherwise, seconds at Tiny-ImageNet's size, at every job's start).
        mean, std = (facts.mean, facts.std) if facts else _channel_stats(train_x)
        return ImageDataset(self.name, train_x, train_y, test_x, test_y, len(classes), mean, std,
                            self.autoaugment, classes,
                            known_fingerprint=facts.fingerprint if facts else None)


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise TypeError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DigitsSpec("digits", mean=None, std=None, autoaugment=None),
        CifarSpec(
            "cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            autoaugment="cifar10", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            folder="cifar-10-batches-py", num_classes=10,
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch",
            meta_file="batches.meta", label_key="labels", names_key="label_names",
            md5="c58f30108f718f92721af3b95e74349a",
        ),
        CifarSpec(
            "cifar100", mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
            autoaugment="cifar10", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            folder="cifar-100-python", num_classes=100, train_files=("train",), test_file="test",
            meta_file="meta", label_key="fine_labels", names_key="fine_label_names",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
        SvhnSpec(
            "svhn", mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), autoaugment="svhn",
            url="http://ufldl.stanford.edu/housenumbers/", folder="svhn",
            md5=("e26dedcc434d2e4c54c9b2d4a06d8373", "eb5a983be6a315427106f1b164d9cef3"),
        ),
        TinyImageNetSpec(
            "tinyimagenet", mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
            autoaugment="imagenet", url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            folder="tiny-imagenet-200",
        ),
        FolderSpec("folder", mean=None, std=None, autoaugment="imagenet"),
    )
}
