"""Real faults against a cell's outputs: SIGKILL at each of its writes (strace's fault injection), a
full file system (a small tmpfs), hostile pickles where a results folder keeps its checkpoint, and
finished cells re-run with bad values. After each, the earlier outputs are byte-identical, no
temporary file is left, and a re-run ends with the uninterrupted run's numbers.

The earlier outputs are a finished smoke cell of one recipe (lr 5e-4); the faulted runs train the
same cell with another (lr 1e-3), which must not replace them unless it completes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import in_ci

pytestmark = [pytest.mark.faults, pytest.mark.slow]

GMMVIT = [sys.executable, "-m", "gmmvit.cli"]
OUTPUTS = ("metrics.json", "history.csv", "mask_params.pt")
CLOCK = ("wall_time_s", "train_images_per_s")


def train(out: Path, *sets: str, prefix: list[str] = (), extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [*prefix, *GMMVIT, "train", "--dataset", "digits", "--model", "vit", "--mask", "gmm", "--seed", "0",
           "--recipe", "smoke", "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"GMMVIT_THREADS": "1"})


def need_strace() -> None:
    """strace injects the kills: skip without it, except under CI=true (.ci/run installs it)."""
    if shutil.which("strace") is None:
        if in_ci():
            pytest.fail("strace is not installed (Debian's strace; .ci/run installs it)")
        pytest.skip("strace (Debian's strace) is not installed")


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def leftovers(out: Path) -> list[str]:
    """Temporary files anywhere under the cell's folder (the staging folder included)."""
    return [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name]


def numbers(out: Path) -> tuple[dict, list[list[str]]]:
    """The record and every epoch's numbers, without what depends on the clock."""
    record = json.loads((out / "metrics.json").read_text())
    rows = [line.split(",")[:-1] for line in (out / "history.csv").read_text().splitlines()]  # - images_per_s
    return {k: v for k, v in record.items() if k not in CLOCK}, rows


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """A finished cell of the first recipe: the outputs every fault must leave as they were."""
    out = tmp_path_factory.mktemp("earlier") / "cell"
    run = train(out, "epochs=1")
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The second recipe run straight through: what every recovered run must end with."""
    out = tmp_path_factory.mktemp("straight") / "cell"
    run = train(out, "epochs=2", "lr=1.0e-3")
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def copy_of(cell: Path, where: Path) -> Path:
    shutil.copytree(cell, where)
    return where


def test_sigkill_at_every_write_keeps_the_earlier_outputs_and_recovers(earlier, uninterrupted, tmp_path):
    """A smoke run of 2 epochs syncs 6 files (history and checkpoint per epoch, then mask parameters
    and the record); it is killed at each of those fsyncs in turn."""
    need_strace()
    kills = 0
    for n in range(1, 7):
        out = copy_of(earlier, tmp_path / f"kill{n}")
        before = snapshot(out)
        run = train(out, "epochs=2", "lr=1.0e-3",
                    prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                            "-e", f"inject=fsync:signal=KILL:when={n}"])
        assert run.returncode != 0, f"fsync {n} was not reached: {run.stdout[-2000:]}"
        kills += 1
        assert snapshot(out) == before, f"killed at fsync {n}, the earlier outputs changed"
        again = train(out, "epochs=2", "lr=1.0e-3")
        assert again.returncode == 0, again.stdout + again.stderr
        assert numbers(out) == numbers(uninterrupted), f"killed at fsync {n}, the re-run ended elsewhere"
        assert leftovers(out) == [] and not (out / ".staging").exists()
        # from fsync 3 on, an epoch's checkpoint is on disk: the re-run resumes from it (after the
        # last epoch's, it only writes the outputs); killed at fsync 2, the checkpoint was half-written
        assert ("resuming" in again.stdout) == (n >= 3), again.stdout
        assert "removed" in again.stdout, again.stdout  # the temp file the kill left, cleared at the start
    assert kills == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_full_disk_keeps_the_earlier_outputs_and_says_so_in_one_line(earlier, uninterrupted, tmp_path):
    """A 40 MB tmpfs holds the earlier outputs and one staged checkpoint (~32 MB), not a second copy
    of it: the run fails at the checkpoint's write, in one line, and leaves nothing behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine refuses to mount a tmpfs")
    try:
        out = copy_of(earlier, disk / "cell")
        before = snapshot(out)
        run = train(out, "epochs=2", "lr=1.0e-3")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no space left" in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert snapshot(out) == before and leftovers(out) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


class RunsCode:
    """A pickle that runs a command when loaded: what a hostile results folder could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_checkpoint_runs_nothing_and_is_moved_aside(earlier, uninterrupted, tmp_path):
    out = copy_of(earlier, tmp_path / "cell")
    marker = tmp_path / "code-ran"
    (out / ".staging").mkdir()
    (out / ".staging" / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": 1, "x": RunsCode(marker)}))
    run = train(out, "epochs=2", "lr=1.0e-3")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert "refused" in run.stdout and "resuming" not in run.stdout
    assert numbers(out) == numbers(uninterrupted)


@pytest.mark.parametrize("bad, says", [
    ("eval_batch_size=0", "eval_batch_size must be at least 1"),
    ("lr=-1", "lr must be above 0"),
    ("limit_train=1", "holds out none"),  # a quarter of 1 image held out: none, never a switch to test
])
def test_a_bad_rerun_of_a_finished_cell_changes_nothing(earlier, tmp_path, bad, says):
    out = copy_of(earlier, tmp_path / "cell")
    before = snapshot(out)
    run = train(out, "epochs=2", bad)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("args, says", [
    (["--threads", "-1", "--numerics", "native"], "--threads must be at least 1"),
    (["--out", "{file}"], "a file is where a folder should be"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, args, says):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cmd = [*GMMVIT, "train", "--dataset", "digits", "--model", "vit", "--recipe", "smoke",
           *[arg.format(file=a_file) for arg in args]]
    if "--out" not in args:
        cmd += ["--out", str(tmp_path / "cell")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows where it came from


@pytest.mark.parametrize("option", ["--img-size=0", "--num-classes=0", "--mask-kernels=0"])
def test_measure_refuses_sizes_below_one(option):
    run = subprocess.run([*GMMVIT, "measure", "--model", "vit", "--mask", "gmm", option],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "must be at least" in run.stderr and "Traceback" not in run.stderr


def test_a_report_killed_at_each_write_leaves_the_last_one_whole(tmp_path):
    """`gmmvit report` killed by SIGKILL at each of its file syncs in turn: the previous set of
    tables and plots stays byte-identical (temporary files aside), and the next report, which
    removes those, equals an uninterrupted one."""
    from test_report import change_record, reported, snapshot

    need_strace()

    metrics, out, before = reported(tmp_path)
    change_record(metrics[0])
    command = [*GMMVIT[:-1], "gmmvit.report", str(tmp_path / "runs"), "--out-dir"]
    straight = tmp_path / "straight"
    assert subprocess.run([*command, str(straight)], capture_output=True, timeout=300).returncode == 0
    writes = len(snapshot(straight))  # one fsync per file of the set
    assert writes >= 10
    for n in range(1, writes + 1):
        run = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                              "-e", f"inject=fsync:signal=KILL:when={n}", *command, str(out)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode != 0, f"fsync {n} of {writes} was not reached"
        kept = {name: data for name, data in snapshot(out).items() if ".tmp-" not in Path(name).name}
        assert kept == before, f"killed at fsync {n} of {writes}, the last report changed"
    assert subprocess.run([*command, str(out)], capture_output=True, timeout=300).returncode == 0
    assert snapshot(out) == snapshot(straight)  # whole again, and no temporary file left


def test_a_one_class_folder_is_refused_before_training(tmp_path):
    """A folder of one class would train and record 100.00%: refused in one line instead."""
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "one" / split / "cats").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 90, 40, 200)).save(tmp_path / "one" / split / "cats" / f"{i}.png")
    run = subprocess.run([*GMMVIT, "train", "--dataset", "one", "--dataset-kind", "folder", "--dataset-path",
                          str(tmp_path / "one"), "--model", "vit", "--recipe", "smoke", "--out", str(tmp_path / "cell")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "a classifier needs at least 2" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "cell" / "metrics.json").exists()
