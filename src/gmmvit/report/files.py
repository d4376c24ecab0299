"""Where the report meets the file system: its one error, said in one line, and its outputs written
as a set, each to a temporary file beside it and renamed into place only once all are complete."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError


class ReportError(UserError, ValueError):
    """A user's mistake or a failure of the environment, for one line: the file or option, and what
    to do. Also a ValueError, which is what the report raised for them before it had its own."""


_FREE = "free some space and run the report again"
_WRITABLE = "make it writable, or choose another --out-dir"
_MOVE = "move it away, or choose another --out-dir"
_OS_ERRORS = {  # errno -> (what went wrong, what to do about it when writing)
    errno.ENOSPC: ("no space left on the device", _FREE),
    errno.EDQUOT: ("the disk quota is exceeded", _FREE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("permission denied", _WRITABLE),
    errno.EROFS: ("the file system is read-only", "choose another --out-dir"),
    errno.ENOTDIR: ("a file is where a folder should be", _MOVE),
    errno.EEXIST: ("a file is where a folder should be", _MOVE),
    errno.EISDIR: ("a folder is where a file should be", _MOVE),
    errno.ENOENT: ("no such file or folder", None),
}


def os_error(err: OSError, doing: str, path: str | Path) -> ReportError:
    """``err`` as one line: what the report was doing ("read", "write", ...) to which file, why it
    failed and what to do; any but a read adds that the previous report is as it was."""
    cause, fix = _OS_ERRORS.get(err.errno, (err.strerror or str(err), None))
    if doing == "read":
        fix = "make it readable" if err.errno in (errno.EACCES, errno.EPERM) else None
    return ReportError(f"cannot {doing} {path}: {cause}" + (f"; {fix}" if fix else "")
                       + ("" if doing == "read" else "; the previous report is as it was"))


class OutputSet:
    """The report's files under ``out_dir``, written all or none.

    ``write(name, data)`` writes one to its temporary file (``.<name>.tmp-<pid>`` in the folder it
    goes to, so the rename is atomic); ``temp_path(name)`` gives that file to a writer that opens it
    itself (a figure's ``savefig``). Leaving the ``with`` block without an error syncs them and renames
    each into place, ``last`` at the end; leaving it with one removes them, and every earlier output
    is as it was. Entering removes the temporary files a killed report left in ``folders``. An
    OSError (a full disk, no permission) becomes a ReportError naming the file.
    """

    def __init__(self, out_dir: str | Path, folders: Iterable[str] = (".",), last: Iterable[str] = ()):
        self.out_dir = Path(out_dir)
        self.folders = tuple(folders)
        self.last = tuple(last)
        self._staged: dict[str, Path] = {}  # name under out_dir -> its temporary file, in write order
        self._made: list[Path] = []  # folders this set created: removed again, if empty, on failure
        self._writing: str | None = None

    def __enter__(self) -> OutputSet:
        # Imported here, not above: cell_folder imports torch, and `gmmvit report --help` must not.
        from ..cell_folder import remove_stale_temps  # one naming of temporary files

        self._folder(self.out_dir)
        for folder in self.folders:
            try:
                remove_stale_temps(self.out_dir / folder)
            except OSError as err:
                raise os_error(err, "clean up", self.out_dir / folder) from err
        return self

    def temp_path(self, name: str) -> Path:
        """Where output ``name`` (relative to out_dir, e.g. "plots/accuracy.png") is written first."""
        final = self.out_dir / name
        self._folder(final.parent)
        self._staged[name] = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self._writing = name
        return self._staged[name]

    def write(self, name: str, data: bytes) -> None:
        self.temp_path(name).write_bytes(data)

    def write_text(self, name: str, text: str) -> None:
        self.write(name, text.encode("utf-8"))

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            try:
                self._commit()
                return
            except OSError as err:
                error = err
        temps = {str(t) for t in self._staged.values()}
        self._discard()
        if isinstance(error, OSError):
            if error.filename and str(error.filename) not in temps:  # not ours: a file being read
                raise os_error(error, "read", error.filename) from error
            raise os_error(error, "write", self.out_dir / (self._writing or "")) from error

    def _commit(self) -> None:
        for name, temp in self._staged.items():  # every file complete and on disk ...
            self._writing = name
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
        order = [n for n in self._staged if n not in self.last] + [n for n in self.last if n in self._staged]
        # ... before any of them replaces its previous version. A rename within one folder does not
        # fail for want of space; should one fail otherwise, the files renamed before it are new.
        for name in order:
            self._writing = name
            os.replace(self._staged[name], self.out_dir / name)
        self._staged.clear()

    def _folder(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.is_dir()][::-1]
        try:
            for folder in missing:
                folder.mkdir()
                self._made.append(folder)
        except OSError as err:
            self._discard()
            raise os_error(err, "create the folder", path) from err

    def _discard(self) -> None:
        for temp in self._staged.values():
            try:
                temp.unlink(missing_ok=True)
            except OSError:  # nothing more to do: the error that brought us here is the one to say
                pass
        self._staged.clear()
        for folder in reversed(self._made):
            try:
                folder.rmdir()  # only if empty: never what was there before
            except OSError:
                pass
        self._made.clear()
