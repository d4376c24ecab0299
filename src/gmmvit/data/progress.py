"""How a long data step shows its progress: a bar on a terminal, one line per step in a log.
Used by downloading (download.py) and image decoding (decode.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def stage(text: str) -> Iterator[None]:
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
