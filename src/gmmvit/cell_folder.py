"""A cell's output folder: every file written atomically, a run staged apart and swapped in whole,
and checkpoints loaded without running code.

``--out`` holds a finished cell: ``metrics.json`` (its record), ``history.csv``, ``mask_params.pt``
(and ``checkpoint.pt`` when kept). A run works in ``--out/.staging/``: its history and checkpoint
(resume reads them), then the finished set, whose record is written there as ``record.json``. Only
then is the set moved into ``--out``, the record last. So a run that fails or is killed before
that leaves ``--out`` exactly as it was; one killed during the move is finished by the next start;
a reader sees a cell's old record or its new one, never half of each.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "test_loss", "test_top1", "lr",
                   "images_per_s"]
OUTPUTS = ("history.csv", "mask_params.pt", "checkpoint.pt")  # moved in before the record
_TEMP = re.compile(r"\..+\.tmp-(\d+)")  # atomic_write_bytes' temporary files: .<name>.tmp-<pid>


class CellFolderError(UserError):
    """--out cannot hold the cell (a file in its place, no permission, no space)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files that a killed process left in ``folder`` (their writer is gone)."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _TEMP.fullmatch(path.name)
        if match and path.is_file() and not _pid_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, then renamed. On any
    failure (a full disk, a signal) the temporary file is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` that cannot run code: tensors and plain containers only (weights_only). Mapped
    to the CPU: RNG states must be CPU tensors whatever the device, and model and optimiser copy to
    their own device when loaded."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_history(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, text.getvalue().encode())


def _environment_error(error: OSError, path: Path) -> CellFolderError:
    if error.errno == errno.ENOSPC:
        why = "no space left on the device; free some and run again (the earlier outputs are intact)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a writable --out"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a file is where a folder should be; --out must name a folder"
    else:
        why = error.strerror or str(error)
    return CellFolderError(f"{path}: {why}")


class CellFolder:
    """The cell's ``--out`` and its staging folder; see the module docstring."""

    def __init__(self, out: str | Path, log: Callable[[str], None] = print) -> None:
        self.out = Path(out)
        self.staging = self.out / ".staging"
        self.log = log

    def open(self) -> None:
        """Make the folders, finish a move that a kill interrupted, and clear dead writers' temps."""
        for folder in (self.out, self.staging):
            if folder.exists() and not folder.is_dir():
                raise CellFolderError(f"{folder}: a file is where a folder should be; --out must name a folder")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise _environment_error(error, folder) from None
        if (self.staging / "record.json").exists():
            self.log(f"finishing the interrupted move of {self.staging}'s finished outputs into {self.out}")
            self._move_in()
            self.staging.mkdir()
        for folder in (self.out, self.staging):
            for path in remove_stale_temps(folder):
                self.log(f"removed {path}, left by a process that was killed while writing it")

    # ---- during the run

    def read_checkpoint(self, accept: Callable[[dict], str | None]) -> dict | None:
        """The staged checkpoint, if it loads as plain data and ``accept`` finds nothing wrong with
        its identity (it returns why not). A checkpoint that is not plain data (a pickle that would
        run code, or a broken file) is moved aside to ``checkpoint.pt.refused``, never executed."""
        path = self.staging / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            state = safe_torch_load(path)
            if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
                raise pickle.UnpicklingError("not a gmmvit checkpoint")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as error:
            os.replace(path, path.with_name("checkpoint.pt.refused"))
            self.log(f"refused {path}: it is not a checkpoint of plain tensors and data "
                     f"({str(error).splitlines()[0][:120]}); moved aside to checkpoint.pt.refused, "
                     "starting afresh")
            return None
        why_not = accept(state)
        if why_not:
            self.log(f"ignoring {path}: {why_not}; starting afresh")
            return None
        return state

    def save_progress(self, history: list[dict], checkpoint: dict) -> None:
        """After each epoch: the history so far and the state to resume from."""
        try:
            write_history(self.staging / "history.csv", history)
            atomic_torch_save(checkpoint, self.staging / "checkpoint.pt")
        except OSError as error:
            raise _environment_error(error, self.staging) from None

    # ---- the end

    def commit(self, record_json: bytes, history: list[dict], mask_params: dict, keep_checkpoint: bool) -> None:
        """Stage the finished set (the record last: it marks the set complete), then move it in."""
        try:
            write_history(self.staging / "history.csv", history)  # also when a resumed run had no epoch left
            atomic_torch_save(mask_params, self.staging / "mask_params.pt")
            if keep_checkpoint:  # read by _move_in, which may run again after a kill
                atomic_write_bytes(self.staging / "keep-checkpoint", b"")
            atomic_write_bytes(self.staging / "record.json", record_json)
            self._move_in()
        except OSError as error:
            raise _environment_error(error, self.out) from None

    def _move_in(self) -> None:
        """Staging -> --out, renames within one file system: the old record goes first (from here
        until the new one lands the cell has no record, so no reader pairs old and new files), the
        new record last. Idempotent: a kill anywhere is finished by running it again."""
        (self.out / "metrics.json").unlink(missing_ok=True)
        keep = (self.staging / "keep-checkpoint").exists()
        for name in OUTPUTS:
            staged, final = self.staging / name, self.out / name
            if name == "checkpoint.pt" and not keep:
                # ~60 MB a cell (12 GB over the paper grid); the record is what counts. Any earlier
                # run's kept checkpoint belongs to no record now; the staged one goes with the folder.
                final.unlink(missing_ok=True)
            elif staged.exists():
                os.replace(staged, final)
        os.replace(self.staging / "record.json", self.out / "metrics.json")
        shutil.rmtree(self.staging)


__all__ = ["HISTORY_COLUMNS", "CellFolder", "CellFolderError", "atomic_torch_save", "atomic_write_bytes",
           "remove_stale_temps", "safe_torch_load", "write_history"]
