"""One GPU slot per concurrent train job on a box with several GPUs.

Snakemake counts `gpu` as a resource but hands out no device ids, so every job would use cuda:0.
Here each train job claims a free slot (device, k), k < cells_per_gpu, by taking an exclusive
fcntl lock on the slot's file under a shared folder, and keeps the file open for its whole life:
the kernel drops the lock when the process ends, however it ends (even SIGKILL), so a dead job
never holds a slot. The claim sets CUDA_VISIBLE_DEVICES to the slot's device, so it must run before
torch initialises CUDA (this module imports no torch).

No claim is made under SLURM (SLURM hands each job its own devices, and a lock folder on a shared
filesystem would tie jobs on different nodes together) or where no GPU is found.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Tests only: pretend the machine has this many GPUs (no GPU is touched; CUDA_VISIBLE_DEVICES
# still names the faked device, which torch on a CPU-only machine ignores).
FAKE_GPU_COUNT_VAR = "GMMVIT_FAKE_GPU_COUNT"
SLOT_VAR = "GMMVIT_DEVICE_SLOT"  # "<device>:<k>", recorded in the cell's metrics.json


@dataclass(frozen=True)
class DeviceSlot:
    device: str  # the physical device id, as CUDA_VISIBLE_DEVICES names it
    k: int       # which of the device's cells_per_gpu places

    def __str__(self) -> str:
        return f"{self.device}:{self.k}"


_held: list[IO[bytes]] = []  # open lock files: the locks live as long as these stay open


def visible_devices() -> list[str]:
    """The GPU ids this process may use: the faked count (tests), CUDA_VISIBLE_DEVICES when the
    environment narrowed them already, else nvidia-smi's list; [] without GPUs."""
    if os.environ.get(FAKE_GPU_COUNT_VAR, "").isdigit():
        return [str(i) for i in range(int(os.environ[FAKE_GPU_COUNT_VAR]))]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in (s.strip() for s in os.environ["CUDA_VISIBLE_DEVICES"].split(",")) if d]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"\d+", line.strip())]


def slot_order(devices: list[str], cells_per_gpu: int) -> list[DeviceSlot]:
    """Every device's first place before any device's second: jobs spread over the GPUs first."""
    return [DeviceSlot(device, k) for k in range(cells_per_gpu) for device in devices]


def try_claim(folder: Path, slot: DeviceSlot) -> IO[bytes] | None:
    """The slot's lock file, locked and open, or None if another live process holds it."""
    handle = open(folder / f"gpu{slot.device}-{slot.k}.lock", "a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    # for people looking at the folder; the lock, not this text, is what counts
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle


def claim_device_slot(folder: str | Path, cells_per_gpu: int = 1, poll_seconds: float = 2.0,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> DeviceSlot | None:
    """Claim a free (device, k) slot for this process, waiting while all are taken, and point
    CUDA_VISIBLE_DEVICES at its device. None (and nothing changed) under SLURM or without GPUs."""
    if os.environ.get("SLURM_JOB_ID"):
        return None
    devices = visible_devices()
    if not devices:
        return None
    if cells_per_gpu < 1:
        raise ValueError(f"cells_per_gpu must be at least 1, not {cells_per_gpu}")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("claim_device_slot must run before torch initialises CUDA: "
                           "CUDA_VISIBLE_DEVICES is read only then")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slots = slot_order(devices, cells_per_gpu)
    waiting_since = None
    while True:
        for slot in slots:
            handle = try_claim(folder, slot)
            if handle is not None:
                _held.append(handle)
                os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
                os.environ[SLOT_VAR] = str(slot)
                if waiting_since is not None:
                    log(f"claimed GPU slot {slot} after waiting {time.monotonic() - waiting_since:.0f} s")
                return slot
        if waiting_since is None:
            waiting_since = time.monotonic()
            log(f"all {len(slots)} GPU slots ({len(devices)} devices x {cells_per_gpu}) under {folder} "
                "are taken; waiting for one (run fewer jobs at once: --resources gpu=<devices x "
                "cells_per_gpu>)")
        time.sleep(poll_seconds)
