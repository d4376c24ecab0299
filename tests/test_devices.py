"""Device slots on a many-GPU box (gmmvit.devices), on CPU with a faked device count: concurrent
claimants are real processes, as concurrent train jobs are."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmmvit.devices import FAKE_GPU_COUNT_VAR, DeviceSlot, claim_device_slot, slot_order

# Claims a slot, prints it and the device it was given, then holds it until stdin closes or it is killed.
CLAIMANT = """
import os, sys
from gmmvit.devices import claim_device_slot
slot = claim_device_slot(sys.argv[1], int(sys.argv[2]), poll_seconds=0.1, log=lambda m: None)
print(slot, os.environ["CUDA_VISIBLE_DEVICES"], os.environ["GMMVIT_DEVICE_SLOT"], flush=True)
sys.stdin.read()
"""


def start_claimant(folder: Path, cells_per_gpu: int, gpus: int = 2) -> subprocess.Popen:
    env = os.environ | {FAKE_GPU_COUNT_VAR: str(gpus)}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.Popen([sys.executable, "-c", CLAIMANT, str(folder), str(cells_per_gpu)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def claimed(process: subprocess.Popen, timeout: float) -> list[str] | None:
    """The claimant's "slot device slot-variable" line, or None if it has none within `timeout`."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().split() if ready else None


def test_slots_spread_over_devices_first() -> None:
    assert slot_order(["0", "1"], 2) == [DeviceSlot("0", 0), DeviceSlot("1", 0),
                                         DeviceSlot("0", 1), DeviceSlot("1", 1)]


def test_four_jobs_get_four_slots_a_fifth_waits_and_a_killed_jobs_slot_is_freed(tmp_path: Path) -> None:
    holders = [start_claimant(tmp_path, cells_per_gpu=2) for _ in range(4)]
    fifth = None
    try:
        lines = [claimed(p, timeout=30) for p in holders]
        assert all(lines), lines
        assert sorted(line[0] for line in lines) == ["0:0", "0:1", "1:0", "1:1"]  # four distinct slots
        for slot, device, recorded in lines:
            assert device == slot.split(":")[0] and recorded == slot  # the job sees only its device
        fifth = start_claimant(tmp_path, cells_per_gpu=2)
        assert claimed(fifth, timeout=2) is None  # every slot is held: it waits
        victim = holders.pop(2)
        victim.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel frees the lock
        victim.wait()
        line = claimed(fifth, timeout=10)
        assert line is not None and line[0] == lines[2][0], (line, lines[2])
    finally:
        for process in holders + [fifth]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_no_claim_under_slurm_or_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_GPU_COUNT_VAR, "2")
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # SLURM already gave this job its devices
    assert claim_device_slot(tmp_path / "slots") is None
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(FAKE_GPU_COUNT_VAR, "0")
    assert claim_device_slot(tmp_path / "slots") is None
    assert not (tmp_path / "slots").exists()


def test_claims_honour_devices_the_environment_already_narrowed(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES=2,3 (say, one snakemake per half of the box): slots on 2 and 3 only."""
    monkeypatch.delenv(FAKE_GPU_COUNT_VAR, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("GMMVIT_DEVICE_SLOT", raising=False)
    import gmmvit.devices as devices

    try:
        first = claim_device_slot(tmp_path, 1, log=lambda m: None)
        assert first == DeviceSlot("2", 0) and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    finally:
        while devices._held:  # release this process's claim for the tests that follow
            devices._held.pop().close()


@pytest.mark.slow
def test_train_command_records_its_slot(tmp_path: Path) -> None:
    """`gmmvit train --device-slots` claims before training and the cell's record says which slot."""
    import json

    env = os.environ | {FAKE_GPU_COUNT_VAR: "2"}
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(
        [sys.executable, "-m", "gmmvit.cli", "train", "--dataset", "digits", "--model", "vit", "--mask", "none",
         "--recipe", "smoke", "--set", "epochs=1", "--set", "limit_train=32", "--set", "limit_test=16",
         "--threads", "1", "--out", str(tmp_path / "cell"), "--device-slots", str(tmp_path / "slots"),
         "--cells-per-gpu", "2"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    record = json.loads((tmp_path / "cell/metrics.json").read_text())
    assert record["device_slot"] == "0:0" and record["gpu_ids"] == "0"
    assert "GPU slot 0:0 (device 0) claimed" in out.stdout
