"""The lock that serialises jobs writing the same data files: concurrent prepares of one dataset,
concurrent jobs filling one decoded cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX only; without it concurrent prepares of one dataset are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if absent) for the duration of the block."""
    # Holding the lock is what makes any leftover .prepare-<name>-* directory provably stale.
    with open(lock_file, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
