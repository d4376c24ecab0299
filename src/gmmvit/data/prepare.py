"""Making a downloadable dataset loadable: fetched, unpacked and verified in a staging folder, renamed
into place, and marked prepared last. Used by ``gmmvit prepare`` (and its workflow rule), no cell.

Preparation is atomic: download, unpack and verification happen in ``root/.prepare-<name>-XXXX``,
the result is renamed into place and the marker ``<final folder>/.gmmvit-prepared.json`` is written
last, so the marker's presence means "complete and verified". A failed download says what else works
(``--url``, the ``GMMVIT_<NAME>_URL`` variable, unpacking by hand).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .base import MARKER_NAME, DatasetError, DatasetSpec, DownloadError, IncompleteDownload, dataset_spec
from .download import shown
from .lock import exclusive


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
    spec = dataset_spec(name)
    root = Path(root)
    if spec.folder is None:
        spec.check_in_place(root)
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
    with exclusive(root / f".prepare-{name}.lock"):
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
                raise DatasetError(f"{name}: the data from {shown(source)} is not a valid {name} "
                                   f"dataset, so nothing was put in {final}: {detail}") from None
            _check_counts(spec, counts, wanted, source)
            os.replace(staged, final)
            _write_marker(final, name, counts, source=source, md5_checked=official)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        spec.warm_cache(root, progress)
    return final


def _source(spec: DatasetSpec, url: str | None) -> tuple[str, bool]:
    override = url or os.environ.get(f"GMMVIT_{spec.name.upper()}_URL") or None
    if override is None:
        assert spec.url is not None
        return spec.url, True
    if "://" not in override:  # a local file or folder, e.g. on an offline cluster
        override = Path(override).expanduser().resolve().as_uri()
    return override, False


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


def _staging_as_final(message: str, tmp: Path, folder: str | None, final: Path) -> str:
    # Fetching stages the dataset folder as tmp/unpacked/<folder> (archives) or tmp/<folder>.
    staged = re.escape(str(tmp)) + r"(?:/unpacked)?" + (re.escape(f"/{folder}") if folder else "")
    return re.sub(staged, lambda _: str(final), message)
