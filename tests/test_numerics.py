"""Portable numerics: the same bits on CPUs of other makes, proven on emulated ones.

tests/portability_probe.py trains a smoke-sized cell per attention path (the fused kernel, a "mul"
mask, an "add" mask) through the real data pipeline. Run on this machine and under
../shared/tools/emulate-cpu as an Intel Haswell and an AMD EPYC-Rome (qemu-user: each sees that
CPU's vendor, model, features and cache sizes through CPUID, so MKL and ATen pick their code paths
as they would there), ``portable`` must give equal weights and histories everywhere, and ``native``
must not: the second half shows that the first measures something.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import pytest

from conftest import in_ci

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "portability_probe.py"
EMULATE = REPO.parent / "shared" / "tools" / "emulate-cpu"
CPUS = {"Haswell-v4": "GenuineIntel", "EPYC-Rome": "AuthenticAMD"}


def emulation_missing() -> str | None:
    if platform.machine() != "x86_64":
        return f"CPU emulation of x86-64 makes needs an x86-64 host, not {platform.machine()}"
    if not EMULATE.is_file():
        return f"{EMULATE} is not there (the project's shared tools)"
    if shutil.which("qemu-x86_64") is None:
        return "qemu-x86_64 is not installed (Debian's qemu-user)"
    return None


def start(out: Path, numerics: str, masks: str, cpu: str | None = None) -> subprocess.Popen:
    command = [sys.executable, str(PROBE), "--numerics", numerics, "--masks", masks, "--out", str(out)]
    if cpu:  # through bash: a copied shared/ may have lost the script's execute bit
        command = ["bash", str(EMULATE), cpu, *command]
    log = open(out.with_suffix(".log"), "w")
    # the probe's numerics set their own environment; nothing of this process's may leak in
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


QEMU_CRASH = "qemu: uncaught target signal"


def finish(process: subprocess.Popen, out: Path, rerun: Callable[[], subprocess.Popen] | None = None) -> dict:
    """The probe's results. An emulated run that qemu itself lost to a signal (qemu-user crashes now
    and then under load: seen once, a segfault before the probe printed a line, in 40-odd runs) is
    started once more by ``rerun``; a second crash, or any other failure, fails the test."""
    code = process.wait(timeout=900)
    log = out.with_suffix(".log").read_text()
    if code < 0 and QEMU_CRASH in log and rerun is not None:
        print(f"{out.name}: {log.strip().splitlines()[-1]} (exit {code}); running it once more")
        shutil.rmtree(out, ignore_errors=True)
        return finish(rerun(), out)
    assert code == 0, log[-3000:]
    return json.loads((out / "probe.json").read_text())


def history(result: dict) -> list[list[str]]:
    """Every epoch's numbers but the speed column (wall time is not a result)."""
    rows = [line.split(",") for line in result["history"].splitlines()]
    speed = rows[0].index("images_per_s")
    return [row[:speed] + row[speed + 1:] for row in rows]


@pytest.mark.slow
@pytest.mark.numerics
def test_portable_numerics_give_the_same_bits_on_intel_and_amd_and_native_does_not(tmp_path: Path) -> None:
    if reason := emulation_missing():
        if in_ci():
            pytest.fail(f"CI must test portability across CPU makes: {reason}")
        pytest.skip(reason)
    runs = {("host", "portable"): (None, "portable", "none,gmm,rmt"),
            ("host", "native"): (None, "native", "gmm")}
    runs |= {(cpu, "portable"): (cpu, "portable", "none,gmm,rmt") for cpu in CPUS}
    runs |= {(cpu, "native"): (cpu, "native", "gmm") for cpu in CPUS}
    # all at once: the emulated runs take minutes of CPU each, the host's a few seconds
    def begin(key):
        cpu, numerics, masks = runs[key]
        return start(tmp_path / f"{key[0]}-{key[1]}", numerics, masks, cpu)

    started = {key: begin(key) for key in runs}
    got = {key: finish(process, tmp_path / f"{key[0]}-{key[1]}", rerun=partial(begin, key))
           for key, process in started.items()}

    for cpu, vendor in CPUS.items():  # the emulation took: the records name the emulated CPU
        for numerics in ("portable", "native"):
            assert got[cpu, numerics]["gmm"]["cpu"]["vendor"] == vendor
    host = got["host", "portable"]
    assert {r["cpu_capability"] for r in host.values()} == {"AVX2"}
    assert {r["mkl_branch"] for r in host.values()} == {"COMPATIBLE"}
    for cpu in CPUS:
        for mask, expected in host.items():
            emulated = got[cpu, "portable"][mask]
            assert history(emulated) == history(expected), (cpu, mask)
            assert emulated["weights_sha256"] == expected["weights_sha256"], (cpu, mask)
    # native: the kernels follow the make; an Intel and an AMD AVX2 CPU end with other weights
    haswell, epyc = (got[cpu, "native"]["gmm"]["weights_sha256"] for cpu in CPUS)
    assert haswell != epyc
    assert got["host", "native"]["gmm"]["mkl_branch"] != "COMPATIBLE"


def test_a_run_qemu_lost_to_a_signal_runs_once_more_and_a_second_loss_fails(tmp_path: Path) -> None:
    out = tmp_path / "EPYC-Rome-portable"

    def crash() -> subprocess.Popen:  # what a qemu crash leaves: its line in the log, a signal
        log = open(out.with_suffix(".log"), "w")
        return subprocess.Popen(["sh", "-c", f"echo '{QEMU_CRASH} 11 (Segmentation fault)'; kill -SEGV $$"],
                                stdout=log, stderr=subprocess.STDOUT)

    def succeed() -> subprocess.Popen:
        out.mkdir(exist_ok=True)
        (out / "probe.json").write_text('{"gmm": {}}')
        return subprocess.Popen(["true"], stdout=open(out.with_suffix(".log"), "w"))

    assert finish(crash(), out, rerun=succeed) == {"gmm": {}}
    with pytest.raises(AssertionError, match="uncaught target signal"):
        finish(crash(), out, rerun=crash)
    with pytest.raises(AssertionError):  # a crash with no rerun offered (a host run) fails at once
        finish(crash(), out)
