"""Fetching a dataset's files: downloads (or copies from a local path) with a size and md5 check,
and archives unpacked safely. Used by the downloadable kinds' ``fetch`` and by prepare.py."""

from __future__ import annotations

import http.client
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from contextlib import nullcontext
from pathlib import Path

from torchvision.datasets.utils import calculate_md5
from tqdm import tqdm

from .base import DatasetError, DownloadError, IncompleteDownload
from .progress import on_terminal, stage

_CHUNK = 1 << 20


class UnsafeMember(tarfile.TarError):
    """An archive member that would be written outside the folder it is unpacked into."""


# tarfile's "data" filter refuses such members (absolute, "..", links out, devices) with these
UNSAFE = (UnsafeMember, *((tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()))


def shown(source: str) -> str:
    """A source as the user gave it: a local path rather than the file:// URL it was turned into."""
    parsed = urllib.parse.urlparse(source)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source


def join_url(base: str, file: str) -> str:
    return base.rstrip("/") + "/" + file


def download(url: str, dest: Path, progress: bool, md5: str | None = None) -> None:
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
            in_log = progress and not on_terminal()
            verb = "copying" if url.startswith("file:") else "downloading"
            with stage(f"{verb} {shown(url)}{size}") if in_log else nullcontext(), tqdm(
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
        raise DownloadError(f"download of {shown(url)} failed: {reason}") from None
    again = "Nothing was kept; download it again."
    if total is not None and written != total:
        raise IncompleteDownload(f"download of {url} is truncated: received {written} of {total} "
                                 f"bytes (Content-Length). {again}")
    if md5 is not None and (digest := calculate_md5(dest)) != md5:
        raise IncompleteDownload(f"download of {url} is corrupt or incomplete: md5 {digest}, "
                                 f"expected {md5}. {again}")


def unpack(archive: Path, dest: Path, url: str) -> None:
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
                            raise UnsafeMember(f"member {member.name!r} would be written outside {dest}")
                    tf.extractall(dest)
    except UNSAFE as err:
        # not a cut download: a crafted archive. Sending the user to download it again would not help.
        raise DatasetError(
            f"the archive {shown(url)} is unsafe: {err}. Nothing was unpacked or kept. It is not an "
            "archive gmmvit would trust: get the official one (or one from a mirror you trust).") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        raise IncompleteDownload(
            f"the archive {shown(url)} is incomplete or corrupt ({type(err).__name__}: {err}), "
            "as a download cut short would be. Nothing was kept; download it again (or, for a "
            "local file, copy it again).") from None


def top_folder(extracted: Path, folder: str, url: str) -> Path:
    candidate = extracted / folder
    if candidate.is_dir():
        return candidate
    found = sorted(p.name for p in extracted.iterdir())
    raise DatasetError(f"the archive has no {folder}/ folder (it contains: "
                       f"{', '.join(found) or 'nothing'})")
